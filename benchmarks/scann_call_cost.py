"""Where the time of one ScaNN query goes, next to FAISS, in alternating rounds.

`benchmarks/scale.py` sweeps each backend's knob once per setting; runs on
this shared machine drift by 10-30% over minutes, more than the gaps between
backends. This script fixes one setting per backend near recall@50 = 0.95
(ScaNN 5 of the library's default leaves, FAISS IVF-Flat `nprobe` 5, HNSW
`efSearch` 50), builds everything once, and then times every way of calling
them in turn, round after round, so that each round sees the same machine.

At batch 1 the ways a ScaNN query can be made, from outside in:

- `scann layer searcher`: `keras_resmem.search.ScannSearch.search`, what the
  library and `scale.py` run (an eager call of ScaNN's TensorFlow op, plus
  argument handling and the short-result check);
- `scann TF op`: ScaNN's `ScannSearchBatched` op called eagerly, nothing else;
- `scann pybind`: ScaNN's own Python searcher (`scann_ops_pybind`), no
  TensorFlow in the call;
- `tf.identity`: the cost of calling any TensorFlow op eagerly (the floor
  under the op's row).

At batch 256: the layer searcher (its query shards in a compiled graph),
ScaNN's op called once, eagerly and unsharded, and pybind's
`search_batched_parallel`. FAISS (`IndexIVFFlat`, `IndexHNSWFlat`) as
`scale.py` builds it, with its OpenMP threads set to the same
`search_threads()`.

Writes `results/benchmarks/scann_call_cost.{json,md}`: per way of calling,
recall@k on `--recall-queries` test images (against exact search), and the
median and best queries per second over `--rounds` rounds.

    python benchmarks/scann_call_cost.py
"""

import argparse
import json
import os
import statistics
import sys
import time

import _common
import numpy as np
import scale
import tensorflow as tf
from embeddings import ROOT, fashion_mnist_memory

from keras_resmem import _io
from keras_resmem import search as search_lib


def ways_of_calling(keys, key_var, k, args):
    """`{name: (batch, search(batch) -> ids, prepare)}` for every way timed."""
    built = {}
    for name, knob in (
        ("scann-pybind", args.scann_leaves),
        ("faiss-ivfflat", args.nprobe),
        ("faiss-hnsw", args.ef),
    ):
        backend, seconds, _ = scale.build_backend(name, keys, key_var, k, args)
        backend.set_knob(knob)
        built[name] = backend
        print(f"{name}: built in {seconds:.1f} s", flush=True)
    start = time.perf_counter()
    searcher = search_lib.ScannSearch.build(key_var)
    print(f"scann: built in {time.perf_counter() - start:.1f} s", flush=True)
    handle, leaves = searcher.handle, args.scann_leaves
    searcher.leaves_to_search = leaves
    scann_ops = search_lib._scann_ops()
    k_tensor = tf.constant(k, tf.int32)

    def op(batch):
        return scann_ops.scann_search_batched(handle, batch, k, -1, leaves, False)[0].numpy()

    def layer_searcher(batch):
        return searcher.search(batch, k_tensor).numpy()

    def identity(batch):
        return tf.identity(batch).numpy()

    ways = {}
    for batch in (1, 256):
        ways[f"scann layer searcher, batch {batch}"] = (batch, layer_searcher, tf.constant)
        ways[f"scann TF op, batch {batch}"] = (batch, op, tf.constant)
        ways[f"scann pybind, batch {batch}"] = (batch, built["scann-pybind"].search, None)
        ways[f"faiss IVF-Flat nprobe {args.nprobe}, batch {batch}"] = (
            batch,
            built["faiss-ivfflat"].search,
            None,
        )
        ways[f"faiss HNSW ef {args.ef}, batch {batch}"] = (batch, built["faiss-hnsw"].search, None)
    ways["tf.identity (any eager op), batch 1"] = (1, identity, tf.constant)
    return ways, (searcher, built)


def run(args):
    arrays, _ = fashion_mnist_memory(args.copies, verbose=0)
    if args.size > len(arrays["keys"]):
        raise SystemExit(f"--size {args.size} is over the {len(arrays['keys'])} cached entries")
    keys = np.ascontiguousarray(arrays["keys"][: args.size], dtype=np.float32)
    queries = np.ascontiguousarray(arrays["queries"], dtype=np.float32)
    k = args.k
    key_var = tf.Variable(keys, trainable=False)
    exact = search_lib.ExactSearch(key_var)  # the ground truth, as in scale.py
    recall_queries = queries[: args.recall_queries]
    truth = np.concatenate(
        [exact.search(b, k).numpy() for b in _common.in_batches(recall_queries, 256)]
    )
    ways, keep_alive = ways_of_calling(keys, key_var, k, args)
    workloads = {1: queries[: args.batch1_queries], 256: queries[: args.batch256_queries]}
    rows = {}
    for name, (batch, search, prepare) in ways.items():
        prepare = prepare or (lambda b: b)
        found = np.concatenate(
            [np.asarray(search(prepare(b))) for b in _common.in_batches(recall_queries, batch)]
        )
        recall = None if name.startswith("tf.identity") else _common.recall(found[:, :k], truth)
        batches = [prepare(b) for b in _common.in_batches(workloads[batch], batch)]
        rows[name] = {"batch": batch, "recall": recall, "qps": [], "batches": batches}
    for r in range(args.rounds):
        for name, (_, search, _) in ways.items():
            row = rows[name]
            row["qps"].append(_common.queries_per_second(search, row["batches"], args.seconds, 1))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    del keep_alive, exact, key_var
    out = []
    for name, row in rows.items():
        median = statistics.median(row["qps"])
        out.append(
            {
                "way": name,
                "batch": row["batch"],
                "recall": row["recall"],
                "qps_median": median,
                "qps_best": max(row["qps"]),
                "us_per_query_median": 1e6 / median,
                "qps_rounds": row["qps"],
            }
        )
    return out


def ratios_to_faiss(rows):
    """Per batch size and ScaNN way: its q/s over the better FAISS index's, round by round.

    Returns `{batch: {way: {"median": r, "min": r, "max": r}}}`; each round's
    ratio divides by the faster FAISS index of that same round.
    """
    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        these = [r for r in rows if r["batch"] == batch]
        faiss_rows = [r for r in these if r["way"].startswith("faiss")]
        if not faiss_rows:
            continue
        best_faiss = [max(q) for q in zip(*(r["qps_rounds"] for r in faiss_rows), strict=True)]
        out[batch] = {}
        for r in these:
            if r["way"].startswith("scann"):
                per_round = [q / f for q, f in zip(r["qps_rounds"], best_faiss, strict=True)]
                out[batch][r["way"]] = {
                    "median": statistics.median(per_round),
                    "min": min(per_round),
                    "max": max(per_round),
                }
    return out


def write_markdown(result, path):
    lines = [
        "# Where the time of one ScaNN query goes, next to FAISS",
        "",
        f"`{result['command']}`: {result['size']:,} entries, k={result['k']}, "
        f"{result['rounds']} alternating rounds; search threads {result['search_threads']}.",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores. "
        f"Load average {result['load_average'][0]} at the start, "
        f"{result['load_average'][1]} at the end.",
        "",
        "| way of calling | batch | recall@k | median q/s | best q/s | median us/query |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["batch"], -r["qps_median"])):
        recall = "-" if r["recall"] is None else f"{r['recall']:.4f}"
        lines.append(
            f"| {r['way'].rsplit(', batch', 1)[0]} | {r['batch']} | {recall} | "
            f"{r['qps_median']:,.0f} | {r['qps_best']:,.0f} | {r['us_per_query_median']:.1f} |"
        )
    lines += [
        "",
        "ScaNN over the better FAISS index of the same round (median, and range, over rounds):",
        "",
    ]
    for ways in result["ratios_to_faiss"].values():
        for way, r in ways.items():
            lines.append(f"- {way}: {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}x)")
    _io.write_text(path, "\n".join(lines) + "\n")
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="memory entries")
    parser.add_argument("--copies", type=int, default=84)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--scann-leaves", type=int, default=5)
    parser.add_argument("--nprobe", type=int, default=5)
    parser.add_argument("--ef", type=int, default=50)
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--hnsw-ef-construction", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0, help="per way, per round")
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument("--batch1-queries", type=int, default=300)
    parser.add_argument("--batch256-queries", type=int, default=2048)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    load_start = os.getloadavg()
    result = {
        "command": " ".join(
            ["python benchmarks/scann_call_cost.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": _common.machine(),
        "search_threads": search_lib.search_threads(),
        "size": args.size,
        "k": args.k,
        "rounds": args.rounds,
        "rows": run(args),
    }
    result["ratios_to_faiss"] = ratios_to_faiss(result["rows"])
    result["load_average"] = [round(load_start[0], 2), round(os.getloadavg()[0], 2)]
    _io.write_text(
        os.path.join(args.output_dir, "scann_call_cost.json"), json.dumps(result, indent=2)
    )
    lines = write_markdown(result, os.path.join(args.output_dir, "scann_call_cost.md"))
    print("\n".join(lines))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s")
