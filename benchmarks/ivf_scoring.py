"""IVF's two scorings side by side: float32 keys in place against bfloat16 residual blocks.

`IVF(scoring="exact")` gathers each candidate's float32 key from the key
table; `IVF(scoring="bfloat16")` gathers whole blocks of bfloat16 residuals
laid out partition by partition, then re-scores a shortlist (see
`keras_resmem.search.IVFSearch`). Over the first `--size` of the benchmark's
Fashion-MNIST `pre_logits` embeddings (`embeddings.fashion_mnist_memory`,
`--copies` augmented copies of the training set; the test images are the
queries), both searchers share one trained index; each is timed in a
`tf.function`, batch 256 and batch 1, in alternating rounds, and its recall@k
measured against exact search. Writes
`results/benchmarks/ivf_scoring_<size>.{json,md}`.

    python benchmarks/ivf_scoring.py --size 60000 --copies 1
    python benchmarks/ivf_scoring.py --size 1000000 --copies 84
"""

import argparse
import os
import sys
import time

import _common
import numpy as np
import tensorflow as tf
from embeddings import ROOT, fashion_mnist_memory

from keras_resmem import search as search_lib
from keras_resmem.search.base import l2_ranking_scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--copies", type=int, default=84)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--num-probes", type=int, default=16)
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    args = parser.parse_args(argv)

    arrays, _ = fashion_mnist_memory(args.copies, verbose=0)
    keys = np.asarray(arrays["keys"][: args.size], np.float32)
    queries = np.asarray(arrays["queries"], np.float32)
    options = search_lib.resolve_ivf_options(len(keys), {"num_probes": args.num_probes})
    centroids, offsets, ids = search_lib.train_ivf(keys, options)
    key_var = tf.Variable(keys, trainable=False)
    blocks = search_lib.ivf.partition_major(keys, ids, centroids, offsets)
    blocks = {name: tf.Variable(value, trainable=False) for name, value in blocks.items()}
    probes = tf.Variable(args.num_probes)
    searchers = {
        "exact": search_lib.IVFSearch(key_var, centroids, offsets, ids, probes),
        "bfloat16": search_lib.IVFSearch(key_var, centroids, offsets, ids, probes, blocks=blocks),
    }
    compiled = {name: tf.function(s._search, autograph=False) for name, s in searchers.items()}
    held_out = tf.constant(queries[: args.recall_queries])
    truth = tf.math.top_k(-l2_ranking_scores(held_out, key_var), args.k)[1].numpy()
    recall = {
        name: _common.recall(f(held_out, args.k).numpy(), truth) for name, f in compiled.items()
    }
    times = {name: {1: [], 256: []} for name in compiled}
    for batch, rounds in ((256, args.rounds), (1, 20 * args.rounds)):
        for r in range(rounds):
            q = tf.constant(queries[(r * batch) % (len(queries) - batch) :][:batch])
            order = list(compiled) if r % 2 else list(compiled)[::-1]
            for name in order:
                start = time.perf_counter()
                compiled[name](q, args.k).numpy()
                times[name][batch].append(1000 * (time.perf_counter() - start))
    median = {name: {b: float(np.median(v)) for b, v in t.items()} for name, t in times.items()}
    speedup = {b: median["exact"][b] / median["bfloat16"][b] for b in (1, 256)}
    results = {
        "command": "python benchmarks/ivf_scoring.py " + " ".join(argv or sys.argv[1:]),
        "memory_size": len(keys),
        "num_partitions": int(len(centroids)),
        "num_probes": args.num_probes,
        "k": args.k,
        "recall": recall,
        "median_ms": median,
        "bfloat16_speedup": speedup,
        "machine": _common.machine(),
    }
    lines = [
        f"# IVF scoring, {len(keys):,} entries ({len(centroids)} partitions, "
        f"{args.num_probes} probed), k={args.k}",
        "",
        f"Command: `{results['command']}`. Medians of alternating rounds, `tf.function` calls.",
        "",
        "| scoring | recall@k | batch 256 ms | batch 1 ms |",
        "|---|---|---|---|",
    ]
    for name in compiled:
        lines.append(
            f"| {name} | {recall[name]:.4f} | {median[name][256]:.2f} | {median[name][1]:.3f} |"
        )
    lines += ["", f"bfloat16 / exact speed: {speedup[256]:.2f}x at batch 256, "
              f"{speedup[1]:.2f}x at batch 1."]  # fmt: skip
    _common.write_results(args.output_dir, f"ivf_scoring_{len(keys)}", results, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
