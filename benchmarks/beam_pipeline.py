"""The Beam pipeline's cost against `attach_memory` on one machine, in alternating rounds.

Over the first `--size` Fashion-MNIST training images (default 50,000) and
the benchmarks' CNN (`benchmarks/embeddings.py`, its 32-d `pre_logits` key),
times, round after round in a rotating order:

- `attach_memory(base, "pre_logits", (x, y), ids=ids, search="exact")`: one
  process builds the whole memory (the network's pass and the exact index);
- `keras_resmem.beam.build_sharded_memory` into `--shards` shards (default
  4), with the runner `build_sharded_memory` uses by default (the
  `FnApiRunner`, in this process), once per input in `--inputs`:
  `arrays` (the same arrays, staged as `.npy` files and read a batch at a
  time) and `tfrecord` (`--shards` TFRecord files that
  `write_examples_tfrecord` wrote beforehand, untimed).

Each is run once untimed first (TensorFlow's and Beam's warm-up). Reports
the median of the rounds (and the best), the examples per second, and the
ratio pipeline / attach of the medians (target: at most 1.5 for the arrays
input). Also reports how far the pipeline's entries are from
`attach_memory`'s, per id (0 where equal bit for bit), and the load average
during the run.

Writes `results/benchmarks/beam_pipeline.{json,md}`.

    python benchmarks/beam_pipeline.py                          # ~2 minutes on 2 cores
    python benchmarks/beam_pipeline.py --size 2000 --rounds 1   # smoke run, seconds
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import _common
import keras
import numpy as np
from embeddings import ROOT, _as_float, _trained_model

import keras_resmem
from keras_resmem.beam import build_sharded_memory, write_examples_tfrecord
from keras_resmem.beam import pipeline as pipeline_lib
from keras_resmem.datasets import load_fashion_mnist
from keras_resmem.sharded import format as format_lib

INPUTS = ("arrays", "tfrecord")


def _attach_entries(base, layer, x, y, ids, batch_size):
    return keras_resmem.attach_memory(
        base, layer, (x, y), ids=ids, search="exact", batch_size=batch_size, verbose=0
    )


def _served_agreement(base, layer, manifest_path, whole, queries, search="auto"):
    """The sharded memory served in one process against `attach_memory`'s, query by query.

    `attach_memory(base, layer, shards=...)` with `search` (`"auto"`: each
    shard searched exactly, the top-k merged by exact distance; `"exact"`:
    one exact search over every shard's entries) against the memory
    `attach_memory` built from the arrays with exact search, both k=50.
    """
    served = keras_resmem.attach_memory(base, layer, shards=manifest_path, search=search, verbose=0)
    got, want = served.predict(queries, verbose=0), whole.predict(queries, verbose=0)
    got_ids, got_w = keras_resmem.diagnostics.neighbors_of(served, queries)
    want_ids, want_w = keras_resmem.diagnostics.neighbors_of(whole, queries)
    same_ids = (got_ids == want_ids).all(axis=1)
    same_row = same_ids & (got == want).all(axis=1) & (got_w == want_w).all(axis=1)
    # Where the neighbour sets differ, which is nearer in float64: the served memory's
    # neighbours not in attach_memory's, or attach_memory's not in the served memory's?
    memory = whole.get_layer("residual_memory")
    held = memory.entry_ids()
    keys = memory.keys.numpy()[np.argsort(held)].astype(np.float64)
    sorted_ids = np.sort(held)
    key_model = keras.Model(base.inputs, base.get_layer(layer).output)
    differ = np.flatnonzero([set(a) != set(b) for a, b in zip(got_ids, want_ids, strict=True)])
    served_nearer = 0
    if len(differ):
        query_keys = key_model.predict(queries[differ], verbose=0).reshape(len(differ), -1)
        rows = zip(query_keys.astype(np.float64), got_ids[differ], want_ids[differ], strict=True)
        for q, a, b in rows:
            only_a = np.searchsorted(sorted_ids, sorted(set(a) - set(b)))
            only_b = np.searchsorted(sorted_ids, sorted(set(b) - set(a)))
            far_a = np.linalg.norm(keys[only_a] - q, axis=1).max()
            near_b = np.linalg.norm(keys[only_b] - q, axis=1).min()
            served_nearer += int(far_a <= near_b)
    return {
        "search": served.get_layer("residual_memory").search_backend,
        "queries": len(queries),
        "k": int(served.get_layer("residual_memory").k),
        "rows_same_neighbor_ids_in_order": int(same_ids.sum()),
        "rows_bit_identical_prediction_ids_weights": int(same_row.sum()),
        "rows_with_other_neighbors": len(differ),
        "of_them_served_neighbors_nearer_in_float64": served_nearer,
        "max_abs_prediction_difference": float(np.abs(got - want).max()),
        "same_class_ids": int((got.argmax(-1) == want.argmax(-1)).sum()),
    }


def _max_differences(manifest_path, memory):
    """Per id, the largest |pipeline - attach_memory| of keys and outputs; ids equal?"""
    manifest = format_lib.read_manifest(manifest_path)
    shards = [format_lib.read_shard(manifest, i) for i in range(manifest.num_shards)]
    got = {name: np.concatenate([s[name] for s in shards]) for name in shards[0]}
    order = np.argsort(got["memory_ids"])
    want_ids = memory.memory_ids.numpy()
    want_order = np.argsort(want_ids)
    out = {"same_ids": bool(np.array_equal(got["memory_ids"][order], want_ids[want_order]))}
    for name in ("keys", "memory_scores"):
        diff = np.abs(got[name][order] - getattr(memory, name).numpy()[want_order])
        out[name] = float(diff.max())
    out["targets_equal"] = bool(
        np.array_equal(got["memory_targets"][order], memory.memory_targets.numpy()[want_order])
    )
    return out


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=50_000, help="training images used")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--inputs", default="arrays,tfrecord", help=f"of {INPUTS}")
    parser.add_argument(
        "--mode",
        default="in_memory",
        choices=["in_memory", "multi_threading", "multi_processing"],
        help="the FnApiRunner's direct_running_mode",
    )
    parser.add_argument("--workers", type=int, default=1, help="direct_num_workers")
    parser.add_argument(
        "--model", default=None, help="a .keras base model; default: the benchmarks' CNN"
    )
    parser.add_argument("--layer", default="pre_logits")
    parser.add_argument(
        "--queries", type=int, default=10_000, help="test images the served memories answer"
    )
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    parser.add_argument("--name", default="beam_pipeline", help="results file name")
    args = parser.parse_args(argv)
    inputs = args.inputs.split(",")
    if not set(inputs) <= set(INPUTS):
        parser.error(f"--inputs must name some of {INPUTS}; received {args.inputs!r}")

    (x_train, y_train), (x_test, _) = load_fashion_mnist()
    x = _as_float(x_train[: args.size])
    y = y_train[: args.size].astype(np.int64)
    ids = np.arange(len(x), dtype=np.int64)
    if args.model is None:
        cache = os.path.join(ROOT, "results", "benchmarks", "fmnist_pre_logits_x1_s0")
        _trained_model(cache, _as_float(x_train), y_train, epochs=4, seed=0, verbose=1)
        model_path = cache + "_model.keras"
    else:
        model_path = args.model
    base = keras.models.load_model(model_path)
    options = pipeline_lib.default_pipeline_options(
        direct_running_mode=args.mode, direct_num_workers=args.workers
    )
    work = tempfile.mkdtemp(prefix="beam_pipeline_")
    try:
        sources = {}
        if "arrays" in inputs:
            sources["arrays"] = {"x": x, "y": y, "ids": ids}
        if "tfrecord" in inputs:
            for i in range(args.shards):
                write_examples_tfrecord(
                    os.path.join(work, f"train-{i:05d}-of-{args.shards:05d}.tfrecord"),
                    x[i :: args.shards],
                    y[i :: args.shards],
                    ids[i :: args.shards],
                )
            sources["tfrecord"] = os.path.join(work, "train-*.tfrecord")

        def attach():
            return _attach_entries(base, args.layer, x, y, ids, args.batch_size)

        def pipeline(name):
            out = os.path.join(work, "memory")
            shutil.rmtree(out, ignore_errors=True)
            return build_sharded_memory(
                sources[name],
                model_path,
                args.layer,
                out,
                num_shards=args.shards,
                batch_size=args.batch_size,
                options=options,
            )

        ways = {
            "attach_memory": attach,
            **{f"pipeline_{n}": (lambda n=n: pipeline(n)) for n in sources},
        }
        differences = {}
        whole = attach()  # warm-up, and the entries to compare with
        queries = _as_float(x_test[: args.queries])
        for name in sources:
            manifest_path = pipeline(name)
            differences[name] = _max_differences(manifest_path, whole.get_layer("residual_memory"))
            if name == next(iter(sources)):
                agreement = {
                    search: _served_agreement(
                        base, args.layer, manifest_path, whole, queries, search
                    )
                    for search in ("auto", "exact")
                }
        del whole
        times = {way: [] for way in ways}
        load = [_loadavg()]
        names = list(ways)
        for r in range(args.rounds):
            for way in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                ways[way]()
                times[way].append(time.perf_counter() - start)
                print(f"round {r + 1}: {way} {times[way][-1]:.2f} s", flush=True)
            load.append(_loadavg())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(x)
    median = {way: float(np.median(t)) for way, t in times.items()}
    best = {way: float(np.min(t)) for way, t in times.items()}
    ratios = {
        name: {
            "median": median[f"pipeline_{name}"] / median["attach_memory"],
            "best": best[f"pipeline_{name}"] / best["attach_memory"],
        }
        for name in sources
    }
    first = next(iter(sources))
    results = {
        "command": "python benchmarks/beam_pipeline.py " + " ".join(argv or sys.argv[1:]),
        "size": n,
        "shards": args.shards,
        "batch_size": args.batch_size,
        "runner": {"runner": "FnApiRunner", "direct_running_mode": args.mode,
                   "direct_num_workers": args.workers},
        "rounds": args.rounds,
        "seconds": times,
        "median_s": median,
        "best_s": best,
        "examples_per_s": {way: n / t for way, t in median.items()},
        "ratios": ratios,
        "attach_s": median["attach_memory"],
        "pipeline_s": median[f"pipeline_{first}"],
        "ratio": ratios[first]["median"],
        "target_ratio_at_most_1.5": ratios[first]["median"] <= 1.5,
        "max_abs_difference_from_attach": differences,
        "served_against_attach": agreement,
        "load_average_1_5_15_min": load,
        "machine": _common.machine(),
    }  # fmt: skip
    lines = [
        f"# Beam pipeline into {args.shards} shards against attach_memory: {n:,} "
        "Fashion-MNIST images",
        "",
        f"Command: `{results['command']}`. FnApiRunner ({args.mode}, {args.workers} worker), "
        f"batch size {args.batch_size}. Medians (and bests) of {args.rounds} alternating "
        "rounds, after one untimed run of each.",
        "",
        "| way | median s | best s | examples/s (median) | / attach_memory (median) |",
        "|---|---|---|---|---|",
    ]
    for way in ways:
        ratio = median[way] / median["attach_memory"]
        lines.append(
            f"| {way} | {median[way]:.2f} | {best[way]:.2f} | "
            f"{n / median[way]:,.0f} | {ratio:.2f}x |"
        )
    lines += ["", "Entries against attach_memory's, per id (max |difference|):", ""]
    for name, d in differences.items():
        lines.append(
            f"- {name}: keys {d['keys']:.3g}, outputs {d['memory_scores']:.3g}, "
            f"same ids {d['same_ids']}, same labels {d['targets_equal']}"
        )
    lines += [
        "",
        "Served in one process (`attach_memory(..., shards=...)`) against `attach_memory`'s",
    ]
    lines += [f"exact memory, {agreement['auto']['queries']:,} test images, k=50:", ""]
    for search, a in agreement.items():
        lines.append(
            f"- search={search!r} ({a['search']}): {a['rows_same_neighbor_ids_in_order']:,} "
            "rows with the same neighbour ids in the same order, "
            f"{a['rows_bit_identical_prediction_ids_weights']:,} bit-identical in prediction, "
            f"ids and weights; {a['rows_with_other_neighbors']} with another neighbour set, in "
            f"{a['of_them_served_neighbors_nearer_in_float64']} of which the served memory's "
            "neighbours are the nearer in float64; largest prediction difference "
            f"{a['max_abs_prediction_difference']:.3g}; same class on {a['same_class_ids']:,}."
        )
    lines += [
        "",
        f"Load average (1, 5, 15 min) before and after each round: {load}. "
        f"{results['machine']['cores']} cores, {results['machine']['cpu']}.",
    ]
    _common.write_results(args.output_dir, args.name, results, lines)
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
