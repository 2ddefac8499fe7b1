"""How ScaNN's k-means settings change recall at a fixed number of leaves searched.

The partition quality of a tree index decides how many leaves a query must
search for a given recall. This script builds ScaNN trees (its Python API, the
same k-means as the library's TensorFlow-op builds) with several k-means
settings on the scale benchmark's keys, and a FAISS IVF-Flat index with the
same number of lists as a reference, and reports recall@k against exact
search for each number of leaves searched. It is the measurement behind the
library's `min_partition_size` default (`keras_resmem.search.default_scann_options`).

    python benchmarks/scann_partitions.py --size 5000000   # ~4 minutes on 2 cores

Writes `results/benchmarks/scann_partitions_<size>.{json,md}`.
"""

import argparse
import json
import os
import sys
import time

import _common
import faiss
import numpy as np
from embeddings import ROOT, fashion_mnist_memory

from keras_resmem import _io
from keras_resmem import search as search_lib


def configs(n, library):
    """Named ScaNN k-means settings: `tree()` keyword arguments.

    `library`: the library's resolved ScaNN options for these keys.
    """
    sample, num_leaves = library["training_sample_size"], library["num_leaves"]
    return {
        "library default (min_partition_size 1)": {
            "training_sample_size": sample,
            "min_partition_size": library["min_partition_size"],
        },
        "ScaNN's default min_partition_size 50": {
            "training_sample_size": sample,
            "min_partition_size": 50,
        },
        "min_partition_size 1, sample 256 a leaf": {
            "training_sample_size": min(n, 256 * num_leaves),
            "min_partition_size": 1,
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=5_000_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--leaves", default="3,4,5,6,8,10,12")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    args = parser.parse_args(argv)
    from scann.scann_ops.py import scann_ops_pybind

    arrays, _ = fashion_mnist_memory(84, verbose=0)
    n, k = args.size, args.k
    keys = np.ascontiguousarray(arrays["keys"][:n], dtype=np.float32)
    queries = np.ascontiguousarray(arrays["queries"][: args.queries], dtype=np.float32)
    leaves = [int(v) for v in args.leaves.split(",")]
    library = search_lib.resolve_scann_options(n, keys.shape[1])
    num_leaves = library["num_leaves"]
    flat = faiss.IndexFlatL2(keys.shape[1])
    flat.add(keys)
    truth = flat.search(queries, k)[1]
    del flat
    rows = []

    def report(name, seconds, recalls):
        rows.append({"index": name, "build_seconds": seconds, "recall": recalls})
        cells = " ".join(f"{p}:{r:.4f}" for p, r in zip(leaves, recalls, strict=True))
        print(f"{name:42s} build {seconds:5.1f} s  recall@{k} by leaves searched  {cells}")

    start = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(keys.shape[1]), keys.shape[1], num_leaves)
    sample = np.random.default_rng(0).choice(n, size=min(n, 64 * num_leaves), replace=False)
    ivf.train(keys[np.sort(sample)])
    ivf.add(keys)
    seconds = time.perf_counter() - start
    recalls = []
    for p in leaves:
        ivf.nprobe = p
        recalls.append(_common.recall(ivf.search(queries, k)[1], truth))
    report("FAISS IVF-Flat (64 keys a list)", seconds, recalls)
    del ivf
    for name, tree in configs(n, library).items():
        start = time.perf_counter()
        searcher = (
            scann_ops_pybind.builder(keys, k, "squared_l2")
            .tree(num_leaves=num_leaves, num_leaves_to_search=leaves[0], **tree)
            .score_brute_force()
            .build()
        )
        seconds = time.perf_counter() - start
        recalls = [
            _common.recall(searcher.search_batched(queries, k, leaves_to_search=p)[0], truth)
            for p in leaves
        ]
        report(name, seconds, recalls)
        del searcher
    result = {
        "command": "python benchmarks/scann_partitions.py " + " ".join(sys.argv[1:]),
        "machine": _common.machine(),
        "size": n,
        "num_leaves": num_leaves,
        "k": k,
        "queries": len(queries),
        "leaves_searched": leaves,
        "rows": rows,
    }
    base = os.path.join(args.output_dir, f"scann_partitions_{n}")
    _io.write_text(base + ".json", json.dumps(result, indent=2))
    lines = [
        f"# ScaNN k-means settings: recall@{k} at {n:,} entries ({num_leaves:,} leaves)",
        "",
        f"Command: `{result['command']}`; {len(queries):,} test queries.",
        "",
        "| index | build | " + " | ".join(f"{p} leaves" for p in leaves) + " |",
        "|---|---|" + "---|" * len(leaves),
    ]
    for row in rows:
        lines.append(
            f"| {row['index']} | {row['build_seconds']:.1f} s | "
            + " | ".join(f"{r:.4f}" for r in row["recall"])
            + " |"
        )
    _io.write_text(base + ".md", "\n".join(lines) + "\n")
    print(f"Wrote {base}.{{json,md}}")


if __name__ == "__main__":
    main()
