"""ScaNN's leaf scorings side by side: recall@k and build time, same keys, same tree settings.

`scoring="int8"` (the default: ScaNN's 8-bit codes, then the best
`max(reorder, 2k)` candidates re-scored exactly against the memory's keys) and
`scoring="exact"` (float32 distances in ScaNN), each built by
`keras_resmem.search.ScannSearch.build` with the library's other defaults for
the memory's size, searched at `--leaves` leaves: recall against exact search,
and queries per second of `ScannSearch.search` at batch 256 and at batch 1, eagerly and in a
`tf.function` (best of 3 rounds each).
Keys and queries: `benchmarks/embeddings.py` (84 augmented copies of
Fashion-MNIST, 32-d `pre_logits`). Writes `results/benchmarks/scann_scoring.{json,md}`.

    python benchmarks/scann_scoring.py --size 5000000
"""

import argparse
import os
import time

import _common
import numpy as np
import tensorflow as tf
from embeddings import ROOT, fashion_mnist_memory

from keras_resmem import search as search_lib


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=5_000_000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--num-queries", type=int, default=10_000)
    parser.add_argument("--leaves", default="0,8,5", help="leaves searched; 0: the index's own")
    parser.add_argument("--batch1-queries", type=int, default=300)
    parser.add_argument("--min-seconds", type=float, default=3.0, help="per throughput figure")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    args = parser.parse_args(argv)
    arrays, _ = fashion_mnist_memory(84, verbose=0)
    keys = tf.Variable(np.array(arrays["keys"][: args.size]), trainable=False)
    queries = tf.constant(arrays["queries"][: args.num_queries])
    truth = np.concatenate(
        [
            search_lib.ExactSearch(keys).search(queries[i : i + 500], args.k).numpy()
            for i in range(0, len(queries), 500)
        ]
    )
    leaves = [int(x) for x in args.leaves.split(",")]
    rows = []
    for scoring in ("int8", "exact"):
        start = time.perf_counter()
        index = search_lib.ScannSearch.build(keys, {"scoring": scoring})
        seconds = time.perf_counter() - start
        for n_leaves in leaves:
            index.leaves_to_search = n_leaves or None
            batches = [queries[i : i + 256] for i in range(0, len(queries), 256)]
            found = np.concatenate([index.search(b, args.k).numpy() for b in batches])
            qps = _common.queries_per_second(
                lambda b, index=index: index.search(b, args.k).numpy(),
                batches[:-1],  # whole batches of 256
                args.min_seconds,
            )
            singles = [queries[i : i + 1] for i in range(args.batch1_queries)]
            compiled = tf.function(lambda q, index=index: index.search(q, args.k))
            qps_1 = {
                "eager": _common.queries_per_second(
                    lambda q, index=index: index.search(q, args.k).numpy(),
                    singles,
                    args.min_seconds,
                ),
                "compiled": _common.queries_per_second(
                    lambda q, compiled=compiled: compiled(q).numpy(), singles, args.min_seconds
                ),
            }
            rows.append(
                {
                    "scoring": scoring,
                    "options": index.options,
                    "build_seconds": seconds,
                    "leaves_to_search": n_leaves or index.options["num_leaves_to_search"],
                    "recall": _common.recall(found, truth),
                    "qps_batch_256": qps,
                    "qps_batch_1_eager": qps_1["eager"],
                    "qps_batch_1_compiled": qps_1["compiled"],
                }
            )
            print(rows[-1], flush=True)
        del index
    result = {
        "command": "python benchmarks/scann_scoring.py "
        + " ".join(
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "output_dir"
        ),
        "machine": _common.machine(),
        "size": args.size,
        "k": args.k,
        "num_queries": len(queries),
        "rows": rows,
    }
    lines = [
        f"ScaNN leaf scoring, {args.size:,} entries, recall@{args.k} over {len(queries):,} "
        "queries (`" + result["command"] + "`)",
        "",
        "| scoring | build | leaves searched | recall | q/s, batch 256 "
        "| batch 1, eager | batch 1, `tf.function` |",
        "|---|---|---|---|---|---|---|",
    ] + [
        f"| `{r['scoring']}` | {r['build_seconds']:.1f} s | {r['leaves_to_search']} "
        f"| {r['recall']:.4f} | {r['qps_batch_256']:,.0f} | {r['qps_batch_1_eager']:,.0f} "
        f"| {r['qps_batch_1_compiled']:,.0f} |"
        for r in rows
    ]
    _common.write_results(args.output_dir, "scann_scoring", result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
