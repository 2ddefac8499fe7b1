"""The cost of growing a memory in place against building it again: `add_examples` of 1% more data.

Memory A: the first 59,406 Fashion-MNIST training images; B: the last 594
(1% of A). For each key layer and search backend, in alternating rounds:
`memorize(model, A)` (untimed set-up), then `add_examples(model, B)` (timed),
then `memorize(model, A + B)` (timed: the full rebuild, a pass of the network
over all 60,000 images and the index built from scratch). Both run the same
compiled network function. Reported: the median of each, and the ratio of
their medians (target: at most 0.05). The network is the benchmarks' CNN
(`benchmarks/embeddings.py`, 4 epochs); the time of a pass does not depend
on how well it is trained, but IVF's partitions do, so it is trained.

Writes `results/benchmarks/lifecycle.{json,md}`.

    python benchmarks/lifecycle.py            # ~5 minutes on 2 CPU cores
"""

import argparse
import os
import time

import _common
import numpy as np
from embeddings import ROOT, _as_float, _trained_model

import keras_resmem
from keras_resmem.datasets import load_fashion_mnist


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(base, layer, search, a, b, rounds, batch_size):
    """`{"add_s": [...], "rebuild_s": [...], ...}` for one key layer and backend."""
    (xa, ya), (xb, yb) = a, b
    x_all, y_all = np.concatenate([xa, xb]), np.concatenate([ya, yb])
    model = keras_resmem.attach_memory(base, layer, search=search, k=50, verbose=0)
    memory = model.get_layer("residual_memory")
    keras_resmem.memorize(model, (x_all, y_all), batch_size=batch_size, verbose=0)  # warm-up
    add_s, rebuild_s, retrainings = [], [], 0
    for _ in range(rounds):
        keras_resmem.memorize(model, (xa, ya), batch_size=batch_size, verbose=0)
        before = getattr(memory.search, "retrainings", 0)
        add_s.append(
            _timed(
                lambda: keras_resmem.add_examples(model, (xb, yb), batch_size=batch_size, verbose=0)
            )
        )
        retrainings += getattr(memory.search, "retrainings", 0) - before
        assert memory.memory_size == len(x_all)
        rebuild_s.append(
            _timed(
                lambda: keras_resmem.memorize(
                    model, (x_all, y_all), batch_size=batch_size, verbose=0
                )
            )
        )
    add, rebuild = float(np.median(add_s)), float(np.median(rebuild_s))
    return {
        "layer": layer,
        "key_dim": memory.key_dim,
        "search": memory.search_backend,
        "entries_before": len(xa),
        "entries_added": len(xb),
        "add_s": add_s,
        "rebuild_s": rebuild_s,
        "add_median_s": add,
        "rebuild_median_s": rebuild,
        "ratio": add / rebuild,
        "ivf_retrainings": retrainings,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="pre_logits,pool2")
    parser.add_argument("--searches", default="exact,ivf")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--output-dir", default=os.path.join(ROOT, "results", "benchmarks"), help="results folder"
    )
    args = parser.parse_args(argv)
    (x_train, y_train), _ = load_fashion_mnist()
    x = _as_float(x_train)
    cache = os.path.join(ROOT, "results", "benchmarks", "fmnist_pre_logits_x1_s0")
    base = _trained_model(cache, x, y_train, epochs=4, seed=0, verbose=1)
    split = round(len(x) / 1.01)  # B is 1% of A
    a, b = (x[:split], y_train[:split]), (x[split:], y_train[split:])
    rows = []
    for layer in args.layers.split(","):
        for search in args.searches.split(","):
            row = measure(base, layer, search, a, b, args.rounds, args.batch_size)
            rows.append(row)
            print(
                f"{layer} ({row['key_dim']}-d), {row['search']}: add_examples of "
                f"{row['entries_added']} {row['add_median_s'] * 1e3:.0f} ms, full rebuild of "
                f"{row['entries_before'] + row['entries_added']} "
                f"{row['rebuild_median_s'] * 1e3:.0f} ms, ratio {row['ratio']:.4f}"
            )
    results = {"machine": _common.machine(), "rounds": args.rounds, "rows": rows}
    lines = [
        "# add_examples of 1% against a full rebuild",
        "",
        "Command: `python benchmarks/lifecycle.py`. Medians over "
        f"{args.rounds} alternating rounds; ratio = add / rebuild (target at most 0.05).",
        "",
        "| key layer | key dim | search | add_examples (ms) | full rebuild (ms) | ratio | "
        "IVF retrainings |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['layer']} | {row['key_dim']} | {row['search']} | "
            f"{row['add_median_s'] * 1e3:.1f} | {row['rebuild_median_s'] * 1e3:.1f} | "
            f"{row['ratio']:.4f} | {row['ivf_retrainings']} |"
        )
    _common.write_results(args.output_dir, "lifecycle", results, lines)


if __name__ == "__main__":
    main()
