"""Queries per second through the `ResidualMemory` layer, as a user's model runs it.

`benchmarks/scale.py` times the searchers alone. This times the whole layer
(search, exact distances of the neighbours, gathering their residuals, the
ResMem sum) in a model of the memory layer alone, `[embeddings, logits] ->
prediction`, for each library backend with its default settings:

- `predict_on_batch` at batch 256 and at batch 1 (Keras' compiled predict
  function, as `model.predict` runs it, without its per-call data handling);
- an eager call, `model([embeddings, logits])`, at batch 1.

The memory holds the first `--size` cached Fashion-MNIST `pre_logits`
entries (`benchmarks/embeddings.py`), built with `ResidualMemory.memorize`;
the queries are the test images. ResMem accuracy on the queries timed at
batch 256 is printed too, as a check that the figures time the right thing.
`--label` names the run in the results, so that two versions of the library
can be compared on one machine:

    python benchmarks/layer_throughput.py --label after
    PYTHONPATH=<checkout of an older commit> python benchmarks/layer_throughput.py --label before

Appends one JSON line per backend to `results/benchmarks/layer_throughput.jsonl`
and rewrites `results/benchmarks/layer_throughput.md` from all its lines.
"""

import argparse
import json
import os
import time

import _common
import numpy as np
import tensorflow as tf
from _build_rss import memory_model
from embeddings import ROOT, fashion_mnist_memory

import keras_resmem


def measure(search, arrays, args):
    n = args.size
    memory = keras_resmem.ResidualMemory(
        k=args.k, sigma=args.sigma, temperature=args.temperature, search=search
    )
    start = time.perf_counter()
    memory.memorize(arrays["keys"][:n], arrays["key_logits"][:n], arrays["key_labels"][:n])
    build_seconds = time.perf_counter() - start
    model = memory_model(memory, memory.key_dim, memory.num_outputs)
    queries = np.ascontiguousarray(arrays["queries"][: args.queries], dtype=np.float32)
    logits = np.ascontiguousarray(arrays["query_logits"][: args.queries], dtype=np.float32)
    labels = np.asarray(arrays["query_labels"][: args.queries])

    def batches(size, count):
        return [
            [tf.constant(queries[i : i + size]), tf.constant(logits[i : i + size])]
            for i in range(0, min(count, len(queries)), size)
        ]

    def rows(batch):
        return int(batch[0].shape[0])

    big = batches(256, len(queries))
    predictions = np.concatenate([model.predict_on_batch(b) for b in big])
    row = {
        "label": args.label,
        "backend": search,
        "size": n,
        "build_seconds": build_seconds,
        "resmem_accuracy": float((predictions.argmax(-1) == labels).mean()),
        "qps_predict_batch_256": _common.queries_per_second(
            model.predict_on_batch, big, args.min_seconds, size=rows
        ),
        "qps_predict_batch_1": _common.queries_per_second(
            model.predict_on_batch, batches(1, args.batch1_queries), args.min_seconds, size=rows
        ),
        "qps_eager_batch_1": _common.queries_per_second(
            lambda b: model(b, training=False).numpy(),
            batches(1, args.batch1_queries),
            args.min_seconds,
            size=rows,
        ),
    }
    print(
        f"{args.label or '-'} {search:5s} n={n:,}: predict b256 "
        f"{row['qps_predict_batch_256']:8.0f} q/s, b1 {row['qps_predict_batch_1']:6.0f} q/s; "
        f"eager b1 {row['qps_eager_batch_1']:6.0f} q/s; "
        f"ResMem accuracy {100 * row['resmem_accuracy']:.2f}%",
        flush=True,
    )
    return row


def write_markdown(rows, path, machine):
    lines = [
        "# Queries per second through the ResidualMemory layer",
        "",
        "`python benchmarks/layer_throughput.py` (see its docstring); best of 3 timed rounds.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB.",
        "",
        "| run | backend | entries | ResMem acc | predict b256 | predict b1 | eager b1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label'] or '-'} | {r['backend']} | {r['size']:,} | "
            f"{100 * r['resmem_accuracy']:.2f}% | {r['qps_predict_batch_256']:,.0f} | "
            f"{r['qps_predict_batch_1']:,.0f} | {r['qps_eager_batch_1']:,.0f} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="memory entries")
    parser.add_argument("--backends", default="exact,ivf,scann")
    parser.add_argument("--label", default="", help="names this run in the results")
    parser.add_argument("--copies", type=int, default=84)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--batch1-queries", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    args = parser.parse_args(argv)

    arrays, _ = fashion_mnist_memory(args.copies, verbose=0)
    if args.size > len(arrays["keys"]):
        parser.error(f"--size {args.size} is over the {len(arrays['keys'])} cached entries")
    machine = _common.machine()
    os.makedirs(args.output_dir, exist_ok=True)
    jsonl = os.path.join(args.output_dir, "layer_throughput.jsonl")
    for search in args.backends.split(","):
        row = measure(search, arrays, args)
        row["library"] = keras_resmem.__file__
        row["machine"] = machine
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
    with open(jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    write_markdown(rows, os.path.join(args.output_dir, "layer_throughput.md"), machine)
    print(f"wrote {jsonl} and layer_throughput.md")


if __name__ == "__main__":
    main()
