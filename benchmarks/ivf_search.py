"""IVF search (stock TensorFlow ops) against exact search on 1M real embeddings.

Keys: the 32-d `pre_logits` embeddings of 17 augmented copies of the 60,000
Fashion-MNIST training images (1,020,000 entries, `benchmarks/embeddings.py`).
Queries: the test images' embeddings. For each `num_probes`, it measures
recall@k against exact search and queries per second at batch 1 and batch 256,
both backends in one process, on the same queries. Writes
`results/benchmarks/ivf_search.{json,md,png}`.

    python benchmarks/ivf_search.py              # ~5 minutes on 2 CPU cores
"""

import argparse
import json
import os
import platform
import time

import _common
import numpy as np
import tensorflow as tf
from embeddings import ROOT, fashion_mnist_embeddings

from keras_resmem import _io
from keras_resmem import search as search_lib


def queries_per_second(fn, queries, batch, min_seconds):
    """Throughput of `fn` over `queries` in batches of `batch`: one timed round, after a warm-up."""
    batches = [tf.constant(queries[i : i + batch]) for i in range(0, len(queries), batch)]
    return _common.queries_per_second(
        lambda b: fn(b).numpy(), batches, min_seconds, rounds=1, size=lambda b: int(b.shape[0])
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=17, help="augmented copies of 60k images")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--num-queries", type=int, default=2000)
    parser.add_argument("--probes", default="4,8,12,16,24,32,48,64,96,128")
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    args = parser.parse_args(argv)

    keys, _, queries, _, _ = fashion_mnist_embeddings(copies=args.copies)
    queries = queries[: args.num_queries]
    n, d = keys.shape
    print(f"memory: {n:,} keys of {d} dims; {len(queries):,} queries; k={args.k}")
    key_var = tf.Variable(keys, trainable=False)

    exact = search_lib.ExactSearch(key_var)
    exact_fn = tf.function(lambda q: exact.search(q, args.k), reduce_retracing=True)
    truth = np.concatenate(
        [exact_fn(tf.constant(queries[i : i + 256])).numpy() for i in range(0, len(queries), 256)]
    )
    rows = [
        {
            "backend": "exact",
            "num_probes": None,
            "recall": 1.0,
            "qps_batch_1": queries_per_second(exact_fn, queries[:200], 1, args.min_seconds),
            "qps_batch_256": queries_per_second(exact_fn, queries, 256, args.min_seconds),
        }
    ]
    print(rows[0])

    options = search_lib.resolve_ivf_options(n, None)
    start = time.perf_counter()
    centroids, offsets, ids = search_lib.train_ivf(keys, options)
    build_seconds = time.perf_counter() - start
    print(f"IVF build: {options['num_partitions']} partitions in {build_seconds:.1f} s")
    probes = tf.Variable(1, dtype=tf.int32)
    ivf = search_lib.IVFSearch(key_var, centroids, offsets, ids, probes)
    ivf_fn = tf.function(lambda q: ivf.search(q, args.k), reduce_retracing=True)
    # The sweep, plus the default setting `attach_memory` would use for this memory.
    sweep = sorted({int(v) for v in args.probes.split(",")} | {options["num_probes"]})
    for p in sweep:
        probes.assign(p)
        found = np.concatenate(
            [ivf_fn(tf.constant(queries[i : i + 256])).numpy() for i in range(0, len(queries), 256)]
        )
        row = {
            "backend": "ivf",
            "num_probes": p,
            "default": p == options["num_probes"],
            "recall": _common.recall(found, truth),
            "qps_batch_1": queries_per_second(ivf_fn, queries[:200], 1, args.min_seconds),
            "qps_batch_256": queries_per_second(ivf_fn, queries, 256, args.min_seconds),
        }
        print(row)
        rows.append(row)

    exact_row = rows[0]
    for row in rows:
        row["speedup_batch_1"] = row["qps_batch_1"] / exact_row["qps_batch_1"]
        row["speedup_batch_256"] = row["qps_batch_256"] / exact_row["qps_batch_256"]
    passing = [r for r in rows[1:] if r["recall"] >= 0.95]
    chosen = max(passing, key=lambda r: r["qps_batch_256"]) if passing else None
    result = {
        "memory_size": n,
        "key_dim": d,
        "k": args.k,
        "num_queries": len(queries),
        "ivf_options": options,
        "ivf_build_seconds": build_seconds,
        "rows": rows,
        "fastest_with_recall_0_95": chosen,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    _io.write_text(os.path.join(args.output_dir, "ivf_search.json"), json.dumps(result, indent=2))
    lines = [
        f"# IVF vs exact search: {n:,} keys x {d} dims, {len(queries):,} queries, recall@{args.k}",
        "",
        f"IVF: {options['num_partitions']} partitions, built in {build_seconds:.1f} s.",
        "",
        "| backend | num_probes | recall@k | qps batch 1 | qps batch 256 "
        "| speedup b1 | speedup b256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['num_probes'] or '-'}{' (default)' if r.get('default') else ''}"
            f" | {r['recall']:.4f} | "
            f"{r['qps_batch_1']:.0f} | {r['qps_batch_256']:.0f} | "
            f"{r['speedup_batch_1']:.2f}x | {r['speedup_batch_256']:.2f}x |"
        )
    if chosen:
        lines += [
            "",
            f"Fastest IVF setting with recall@{args.k} >= 0.95: "
            f"num_probes={chosen['num_probes']}, recall {chosen['recall']:.4f}, "
            f"{chosen['speedup_batch_256']:.2f}x exact at batch 256, "
            f"{chosen['speedup_batch_1']:.2f}x at batch 1.",
        ]
    _io.write_text(os.path.join(args.output_dir, "ivf_search.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(
        axes, ("qps_batch_1", "qps_batch_256"), ("batch 1", "batch 256"), strict=True
    ):
        ivf_rows = rows[1:]
        ax.plot([r["recall"] for r in ivf_rows], [r[key] for r in ivf_rows], "o-", label="ivf")
        for r in ivf_rows:
            ax.annotate(str(r["num_probes"]), (r["recall"], r[key]), fontsize=7)
        ax.axhline(exact_row[key], color="k", ls="--", label="exact")
        ax.axvline(0.95, color="gray", ls=":")
        ax.set(xlabel=f"recall@{args.k}", ylabel="queries / s", title=title, yscale="log")
        ax.legend()
    fig.suptitle(f"{n:,} Fashion-MNIST embeddings ({d}-d), 2 CPU cores")
    fig.tight_layout()
    with _io.atomic_path(os.path.join(args.output_dir, "ivf_search.png")) as tmp:
        fig.savefig(tmp, dpi=120)


if __name__ == "__main__":
    main()
