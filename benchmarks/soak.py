"""Soak test of the exported SavedModels: 8 threads for minutes, every answer checked.

A ResMem model (20,000 entries, 16-d keys) is exported in each mode
(`portable` with exact and with IVF search, `scann`), loaded in this process
with `tf.saved_model.load`, and called from 8 threads at once with batches of
1 to 64 queries drawn from a fixed pool, for `--seconds` per export. Every
answer is compared with the one computed for that batch before the threads
start. Reported per export: calls, answers that differ, errors, and the growth
of the process's RSS from the end of the warm-up (the first tenth of the
time) to the end.

Writes `results/benchmarks/soak.{json,md}`.

    python benchmarks/soak.py                    # 3 exports x 120 s
"""

import argparse
import os
import tempfile
import threading
import time

import _common
import keras
import numpy as np
import tensorflow as tf

import keras_resmem


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16,), name="features")
    h = keras.layers.Dense(16, activation="tanh", name="pre_logits")(inputs)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def soak(export_dir, pool, seconds, threads):
    served = tf.saved_model.load(export_dir).signatures["serving_default"]
    want = [served(features=tf.constant(b))["resmem_scores"].numpy() for b in pool]
    counts = {"calls": 0, "different": 0, "errors": 0}
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    rss = {}

    def worker(seed):
        rng = np.random.default_rng(seed)
        calls = different = errors = 0
        while time.perf_counter() < stop:
            i = int(rng.integers(len(pool)))
            try:
                got = served(features=tf.constant(pool[i]))["resmem_scores"].numpy()
                different += int(not np.array_equal(got, want[i]))
            except Exception:  # counted: a soak reports every failure
                errors += 1
            calls += 1
        with lock:
            counts["calls"] += calls
            counts["different"] += different
            counts["errors"] += errors

    workers = [threading.Thread(target=worker, args=(s,)) for s in range(threads)]
    for w in workers:
        w.start()
    time.sleep(seconds / 10)
    rss["after_warmup"] = _common.rss_bytes()
    for w in workers:
        w.join()
    rss["end"] = _common.rss_bytes()
    counts["rss_growth_mib"] = (rss["end"] - rss["after_warmup"]) / 2**20
    counts["rss_end_mib"] = rss["end"] / 2**20
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="per export")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument(
        "--output-dir",
        default=os.path.join(os.path.dirname(os.path.dirname(__file__)), "results", "benchmarks"),
    )
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.entries, 16)).astype("float32")
    y = rng.integers(0, 10, args.entries)
    pool = [rng.normal(size=(int(rng.integers(1, 65)), 16)).astype("float32") for _ in range(32)]
    exports = {
        "portable, exact": ("exact", "portable"),
        "portable, IVF": (keras_resmem.search.IVF(), "portable"),
        "scann": (keras_resmem.search.ScaNN(), "scann"),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (search, mode) in exports.items():
            model = keras_resmem.attach_memory(
                _model(), "pre_logits", (x, y), k=20, search=search, verbose=0
            )
            path = os.path.join(tmp, name.replace(", ", "_").replace(" ", "_"))
            keras_resmem.export_saved_model(model, path, mode=mode)
            rows[name] = soak(path, pool, args.seconds, args.threads)
            print(f"{name}: {rows[name]}", flush=True)
    results = {"machine": _common.machine(), "seconds": args.seconds, "threads": args.threads}
    results["exports"] = rows
    lines = [
        "# Soak test of the SavedModels",
        "",
        f"Command: `python benchmarks/soak.py --seconds {args.seconds:g}`. {args.threads} "
        f"threads, batches of 1-64 queries, {args.seconds:g} s per export.",
        "",
        "| export | calls | answers that differ | errors | RSS growth after warm-up (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['calls']:,} | {r['different']} | {r['errors']} | "
            f"{r['rss_growth_mib']:+.1f} |"
        )
    _common.write_results(args.output_dir, "soak", results, lines)
    return results


if __name__ == "__main__":
    main()
