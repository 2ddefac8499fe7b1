"""Where IVF search starts to pay: exact against IVF search time over entries x key width.

For each key width `d` and memory size `n`, on clustered synthetic keys (a
Gaussian mixture with ~sqrt(n) clusters), it times a batch of 256 queries
through exact search and through IVF with its default options (both the
layer's backends, eager compiled searches, alternating rounds, median of
the rounds), measures IVF's recall@50 and its build time, and fits the
cost model `log(speed-up) = a log(n) + b log(d) + c` by least squares: the
`keras_resmem.search.AUTO_SPEEDUP_MODEL` that `search="auto"` uses. It prints
the fit and, for each key width, the memory size from which IVF is predicted
to be twice as fast.

Writes `results/benchmarks/auto_crossover.{json,md}`.

    python benchmarks/auto_crossover.py            # ~5 minutes on 2 CPU cores
    python benchmarks/auto_crossover.py --refit results/benchmarks/auto_crossover.json
"""

import argparse
import json
import os
import time

import _common
import numpy as np
import tensorflow as tf
from embeddings import ROOT

import keras_resmem

K = 50


def _keys(n, d, rng):
    clusters = max(16, int(np.sqrt(n)))
    centers = rng.normal(size=(clusters, d)).astype(np.float32) * 4.0
    which = rng.integers(0, clusters, n)
    keys = centers[which] + rng.normal(size=(n, d)).astype(np.float32)
    queries = centers[rng.integers(0, clusters, 256)] + rng.normal(size=(256, d)).astype(np.float32)
    return keys, queries


def _backend(search, keys):
    """A memory of `keys` with this backend, and the seconds `memorize` took (its build)."""
    memory = keras_resmem.ResidualMemory(k=K, search=search)
    start = time.perf_counter()
    memory.memorize(keys, np.zeros((len(keys), 2), np.float32), np.zeros(len(keys), np.int32))
    return memory.search, time.perf_counter() - start


def measure(n, d, rounds, rng):
    keys, queries = _keys(n, d, rng)
    queries = tf.constant(queries)
    exact, exact_build = _backend("exact", keys)
    ivf, ivf_build = _backend("ivf", keys)
    truth = exact.search(queries, K).numpy()
    recall = _common.recall(ivf.search(queries, K).numpy(), truth)
    times = {"exact": [], "ivf": []}
    for _ in range(rounds):
        for name, backend in (("exact", exact), ("ivf", ivf)):
            start = time.perf_counter()
            backend.search(queries, K).numpy()
            times[name].append(time.perf_counter() - start)
    exact_s, ivf_s = (float(np.median(times[name])) for name in ("exact", "ivf"))
    return {
        "n": n,
        "d": d,
        "work": n * d,
        "exact_ms": exact_s * 1e3,
        "ivf_ms": ivf_s * 1e3,
        "ivf_speedup": exact_s / ivf_s,
        "ivf_recall_at_50": recall,
        "exact_build_s": exact_build,
        "ivf_build_s": ivf_build,
    }


def fit(rows):
    """`{"a", "b", "c"}` of `log(speed-up) = a log(n) + b log(d) + c`, by least squares."""
    n = np.array([r["n"] for r in rows], float)
    d = np.array([r["d"] for r in rows], float)
    design = np.stack([np.log(n), np.log(d), np.ones_like(n)], axis=1)
    coef = np.linalg.lstsq(design, np.log([r["ivf_speedup"] for r in rows]), rcond=None)[0]
    return dict(zip("abc", (round(float(v), 4) for v in coef), strict=True))


def crossover(model, d, speedup=2.0):
    """The memory size from which the model predicts `speedup` for key width `d`."""
    return float(np.exp((np.log(speedup) - model["b"] * np.log(d) - model["c"]) / model["a"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="16,64,256")
    parser.add_argument("--sizes", default="25000,50000,100000,200000,400000,800000")
    parser.add_argument("--max-work", type=float, default=1.1e8, help="skip larger n * d")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--output-dir", default=os.path.join(ROOT, "results", "benchmarks"), help="results folder"
    )
    parser.add_argument("--refit", default=None, help="fit the rows of this JSON, no timing")
    args = parser.parse_args(argv)
    if args.refit:
        with open(args.refit) as f:
            rows = json.load(f)["rows"]
        model = fit(rows)
        print(f"fit: {model}")
        for d in (16, 32, 64, 256, 1568):
            print(f"d={d}: IVF predicted 2x faster from n = {crossover(model, d):,.0f}")
        return model
    rng = np.random.default_rng(0)
    rows = []
    for d in (int(v) for v in args.dims.split(",")):
        for n in (int(v) for v in args.sizes.split(",")):
            if n * d > args.max_work:
                continue
            row = measure(n, d, args.rounds, rng)
            rows.append(row)
            print(
                f"n={n} d={d} (n*d={n * d:.2e}): exact {row['exact_ms']:.1f} ms, IVF "
                f"{row['ivf_ms']:.1f} ms (x{row['ivf_speedup']:.2f}, recall@50 "
                f"{row['ivf_recall_at_50']:.3f}, build {row['ivf_build_s']:.1f} s)",
                flush=True,
            )
    faster_from = {}
    for d in sorted({r["d"] for r in rows}):
        faster = [r["n"] for r in rows if r["d"] == d and r["ivf_speedup"] > 1.0]
        faster_from[d] = min(faster) if faster else None
    model = fit(rows)
    twice_from = {d: crossover(model, d) for d in (16, 32, 64, 256, 1568)}
    results = {
        "machine": _common.machine(),
        "rounds": args.rounds,
        "batch": 256,
        "k": K,
        "rows": rows,
        "ivf_faster_from_n_by_dim": faster_from,
        "fit": model,
        "ivf_twice_as_fast_from_n_by_dim": twice_from,
    }
    lines = [
        "# Exact against IVF search: where IVF starts to pay",
        "",
        "Command: `python benchmarks/auto_crossover.py`. A batch of 256 queries, k=50, "
        f"median of {args.rounds} alternating rounds; clustered synthetic keys.",
        "",
        "| n | d | n x d | exact (ms) | IVF (ms) | IVF speed-up | IVF recall@50 | IVF build (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['d']} | {r['work']:.2e} | {r['exact_ms']:.1f} | "
            f"{r['ivf_ms']:.1f} | {r['ivf_speedup']:.2f} | {r['ivf_recall_at_50']:.3f} | "
            f"{r['ivf_build_s']:.1f} |"
        )
    lines += ["", "Smallest measured n where IVF is faster, by key width:", ""]
    lines += [f"- d={d}: {n}" for d, n in faster_from.items()]
    lines += [
        "",
        f"Fit: log(speed-up) = {model['a']} log(n) + {model['b']} log(d) + {model['c']}. "
        "IVF predicted twice as fast from:",
        "",
    ]
    lines += [f"- d={d}: n = {n:,.0f}" for d, n in twice_from.items()]
    _common.write_results(args.output_dir, "auto_crossover", results, lines)
    print(f"fit: {model}")
    for d, n in twice_from.items():
        print(f"d={d}: IVF predicted 2x faster from n = {n:,.0f}")
    return model


if __name__ == "__main__":
    main()
