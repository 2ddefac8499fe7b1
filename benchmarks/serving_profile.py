"""Where a served request's time goes: the portable SavedModel's ops, traced.

Builds the model of `benchmarks/serving_vs_faiss.py` (the 60,000 Fashion-MNIST
`pre_logits` keys by default, k=50, IVF search), exports the portable
SavedModel, and in a process with TensorFlow only (no Keras, no library)
runs requests of batch 256 and 1 through TensorFlow's session loader with
`RunOptions.FULL_TRACE`. Each op's time (its `all_end_rel_micros`) is summed
by part of the graph:

- the network (the features model);
- IVF search, by the name scopes of `keras_resmem/search/ivf.py`: choosing
  the partitions (`ivf_probe`), the candidates' positions
  (`ivf_candidates`), scoring them (`ivf_scoring`: gathers and the batched
  matmul), the top-k (`ivf_top_k`), the bfloat16 shortlist's exact
  re-scoring (`ivf_rescoring`), and exact search for queries with too few
  candidates (`ivf_exact_rows`);
- the memory around the search: the neighbours' exact distances and order
  (re-scoring the k found), the residual softmax, the combination with the
  network's output, and the rest (ids, finiteness checks, outputs).

Op times overlap where ops run in parallel, and leave out the executor's
per-op overhead, so the sum is compared with the request's wall time.
Medians over `--requests` traced requests. Writes
`results/benchmarks/serving_profile.{json,md}`.

    python benchmarks/serving_profile.py --num-probes 16
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import _common
import numpy as np
from embeddings import ROOT
from serving_vs_faiss import add_memory_arguments, export_network, memory_keys, models

import keras_resmem
from keras_resmem import search as search_lib

TRACER = """
import collections, json, sys, time
for name in ("keras", "keras_resmem", "tf_keras"):
    sys.modules[name] = None
import numpy as np
import tensorflow as tf

path, queries_path, requests, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
queries = np.load(queries_path)
config = tf.compat.v1.ConfigProto(
    intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads
)
PARTS = [
    ("search: choose partitions", "/ivf_probe/"),
    ("search: candidate positions", "/ivf_candidates/"),
    ("search: score candidates (gathers, matmul)", "/ivf_scoring/"),
    ("search: top-k", "/ivf_top_k/"),
    ("search: re-score the bfloat16 shortlist", "/ivf_rescoring/"),
    ("search: exact rows (too few candidates)", "/ivf_exact_rows/"),
    ("network", "_features"),
]


def part(node, label):
    for name, scope in PARTS:
        if scope in node:
            return name
    if "/switch_case/" in node:
        return "residual softmax" if "Softmax" in label else "combination"
    if any(op in label for op in ("SquaredDifference", "Sqrt", "TopKV2", "Maximum")) or (
        "/Sum" in node and "Sum(" in label
    ):
        return "neighbours' exact distances and order"
    return "rest (ids, checks, outputs, control flow)"


out = {}
with tf.Graph().as_default(), tf.compat.v1.Session(config=config) as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
    sig = meta.signature_def["serving_default"]
    (name,) = sig.inputs
    feed = sig.inputs[name].name
    fetches = [info.name for info in sig.outputs.values()]
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    for batch in (256, 1):
        for _ in range(5):
            sess.run(fetches, {feed: queries[:batch]})
        walls, traced_walls, sums = [], [], collections.defaultdict(list)
        ops = collections.Counter()
        for r in range(requests):
            q = queries[(r * batch) % (len(queries) - batch):][:batch]
            start = time.perf_counter()
            sess.run(fetches, {feed: q})
            walls.append(1000 * (time.perf_counter() - start))
            metadata = tf.compat.v1.RunMetadata()
            start = time.perf_counter()
            sess.run(fetches, {feed: q}, options=options, run_metadata=metadata)
            traced_walls.append(1000 * (time.perf_counter() - start))
            totals = collections.Counter()
            count = 0
            for device in metadata.step_stats.dev_stats:
                for node in device.node_stats:
                    label = node.timeline_label.split("=")[-1]
                    totals[part(node.node_name, label)] += node.all_end_rel_micros / 1000
                    count += 1
            ops[count] += 1
            for key in set(totals) | {p for p, _ in PARTS}:
                sums[key].append(totals.get(key, 0.0))
        out[batch] = {
            "wall_ms": float(np.median(walls)),
            "traced_wall_ms": float(np.median(traced_walls)),
            "ops_run": ops.most_common(1)[0][0],
            "parts_ms": {k: float(np.median(v)) for k, v in sums.items()},
        }
print("RESULT", json.dumps(out))
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_memory_arguments(parser)
    parser.add_argument("--num-probes", type=int, default=16)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    args = parser.parse_args(argv)

    keys, labels, queries = memory_keys(args, 4096)
    work = tempfile.mkdtemp(prefix="serving-profile-")
    np.save(os.path.join(work, "queries.npy"), queries)
    network = models(keys.shape[1], 10)
    export_network(network, os.path.join(work, "network"))
    model = keras_resmem.attach_memory(
        network, "pre_logits", (keys, labels), k=args.k, verbose=0,
        search=search_lib.IVF(num_probes=args.num_probes, scoring=args.scoring),
    )  # fmt: skip
    keras_resmem.export_saved_model(model, os.path.join(work, "resmem"))
    threads = search_lib.search_threads()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    traced = {}
    for name in ("network", "resmem"):
        result = subprocess.run(
            [sys.executable, "-c", TRACER, os.path.join(work, name),
             os.path.join(work, "queries.npy"), str(args.requests), str(threads)],
            check=True, capture_output=True, text=True, env=env,
        )  # fmt: skip
        traced[name] = json.loads(result.stdout.split("RESULT")[-1])
    results = {
        "command": "python benchmarks/serving_profile.py " + " ".join(argv or sys.argv[1:]),
        "keys": args.keys,
        "memory_size": len(keys),
        "k": args.k,
        "num_probes": args.num_probes,
        "scoring": args.scoring,
        "threads": threads,
        "requests": args.requests,
        "traced": traced,
        "machine": _common.machine(),
    }
    lines = [
        f"# The served request, traced: {len(keys):,} {args.keys} keys, k={args.k}, IVF "
        f"({args.scoring} scoring, {args.num_probes} probes)",
        "",
        f"Command: `{results['command']}`. Medians of {args.requests} requests; op times summed "
        "by part (ops that overlap count twice; the executor's per-op overhead is in no part).",
        "",
    ]
    for batch in ("256", "1"):
        resmem, network = traced["resmem"][batch], traced["network"][batch]
        added = resmem["wall_ms"] - network["wall_ms"]
        parts = resmem["parts_ms"]
        total = sum(parts.values())
        lines += [
            f"**Batch {batch}**: {resmem['wall_ms']:.3f} ms a request, the network alone "
            f"{network['wall_ms']:.3f} ms: the memory adds {added:.3f} ms. "
            f"{resmem['ops_run']} ops run (the network alone: {network['ops_run']}).",
            "",
            "| part | ms (sum of op times) | share |",
            "|---|---|---|",
        ]
        for name, ms in sorted(parts.items(), key=lambda item: -item[1]):
            lines.append(f"| {name} | {ms:.3f} | {ms / total:.0%} |")
        lines += [f"| **all ops** | {total:.3f} | |", ""]
    _common.write_results(args.output_dir, "serving_profile", results, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
