"""Peak memory of building one ResMem memory, measured in a process of its own.

Run by `benchmarks/scale.py` as a subprocess, once per build, so that each
peak (VmHWM) is that build's alone. Two ways to build:

- `--via memorize`: `ResidualMemory.memorize` on the cached arrays (keys,
  logits, labels of `benchmarks/embeddings.py`, memory-mapped: their pages
  count in this process's RSS once read, as arrays a caller holds would);
- `--via attach`: `keras_resmem.attach_memory` from the benchmark CNN and a
  `tf.data` pipeline of the augmented images: the whole path a user runs.

Then the memory is saved (`model.save`, a `.keras` file) and the file's size
is the memory's size on disk. Prints one JSON line: the process's RSS after
its imports (the baseline), the peak during the build, the peak during the
save, the build and save times, and the file size.

Two more ways measure ScaNN's index alone (`--search scann`), with the keys
already in RAM (in the baseline) and nothing saved:

- `--via index`: `keras_resmem.search.ScannSearch.build` on a variable of the
  keys (ScaNN's TensorFlow op, as the memory builds it);
- `--via index-pybind`: the same index through ScaNN's own Python API.

    python benchmarks/_build_rss.py --size 5000000 --search scann --via memorize
    python benchmarks/_build_rss.py --size 5000000 --search scann --via index \
        --append-to results/benchmarks/scann_index_rss.jsonl
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import _common
import keras
import numpy as np
import tensorflow as tf
from embeddings import ROOT, augmented_batches, fashion_mnist_memory

import keras_resmem
from keras_resmem import search as search_lib


def augmented_dataset(copies, count, batch_size=1024):
    """The first `count` augmented training images and labels, as a batched `tf.data` pipeline."""
    return (
        tf.data.Dataset.from_generator(
            lambda: augmented_batches(copies, batch_size=batch_size, count=count),
            output_signature=(
                tf.TensorSpec((None, 28, 28), tf.uint8),
                tf.TensorSpec((None,), tf.int32),
            ),
        )
        .map(lambda x, y: (tf.cast(x, tf.float32)[..., None] / 255.0, y))
        .prefetch(2)
    )


def memory_model(memory, key_dim, num_outputs):
    """A model of the memory layer alone: `[embeddings, logits] -> ResMem prediction`."""
    embeddings = keras.Input((key_dim,), name="embeddings")
    logits = keras.Input((num_outputs,), name="logits")
    return keras.Model([embeddings, logits], memory([embeddings, logits]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, required=True, help="memory entries")
    parser.add_argument("--search", default="scann", choices=("exact", "ivf", "scann"))
    parser.add_argument(
        "--via", default="memorize", choices=("memorize", "attach", "index", "index-pybind")
    )
    parser.add_argument("--copies", type=int, default=84)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tmp-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    parser.add_argument("--append-to", default=None, help="also append the JSON line here")
    args = parser.parse_args(argv)
    if args.via.startswith("index") and args.search != "scann":
        parser.error(f"--via {args.via} measures ScaNN's index: it needs --search scann")

    arrays, model = fashion_mnist_memory(args.copies, verbose=0)
    if args.via.startswith("index"):
        return report(index_build(arrays["keys"][: args.size], args.via), args)
    tf.constant(1.0) + 1.0  # start the runtime: part of the baseline
    baseline = _common.rss_bytes()
    _common.reset_peak_rss()
    start = time.perf_counter()
    if args.via == "memorize":
        memory = keras_resmem.ResidualMemory(
            k=args.k, sigma=args.sigma, temperature=args.temperature, search=args.search
        )
        memory.memorize(
            arrays["keys"][: args.size],
            arrays["key_logits"][: args.size],
            arrays["key_labels"][: args.size],
        )
        saved = memory_model(memory, memory.key_dim, memory.num_outputs)
    else:
        saved = keras_resmem.attach_memory(
            model,
            "pre_logits",
            augmented_dataset(args.copies, args.size),
            k=args.k,
            sigma=args.sigma,
            temperature=args.temperature,
            search=args.search,
            verbose=0,
        )
        memory = saved.get_layer("residual_memory")
    build_seconds = time.perf_counter() - start
    build_peak = _common.peak_rss_bytes()
    after_build = _common.rss_bytes()

    tmp = tempfile.mkdtemp(dir=args.tmp_dir, prefix=".rss-")
    try:
        path = os.path.join(tmp, "memory.keras")
        _common.reset_peak_rss()
        start = time.perf_counter()
        saved.save(path)
        save_seconds = time.perf_counter() - start
        save_peak = _common.peak_rss_bytes()
        disk = os.path.getsize(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "size": args.size,
        "memory_size": memory.memory_size,
        "search": args.search,
        "via": args.via,
        "baseline_rss": baseline,
        "build_peak_rss": build_peak,
        "rss_after_build": after_build,
        "save_peak_rss": save_peak,
        "build_seconds": build_seconds,
        "save_seconds": save_seconds,
        "disk_bytes": disk,
        "input_bytes": int(
            args.size
            * (
                arrays["keys"].itemsize * arrays["keys"].shape[1]
                + arrays["key_logits"].itemsize * arrays["key_logits"].shape[1]
                + arrays["key_labels"].itemsize
            )
        ),
    }
    report(result, args)


def index_build(keys, via):
    """Peak RSS of building ScaNN's index of `keys` alone, over the process with the keys."""
    keys = np.array(keys, dtype=np.float32)  # in RAM (a copy of the memory map) before the baseline
    key_bytes, size = int(keys.nbytes), len(keys)
    key_var = None
    if via == "index":  # ScaNN reads the variable's buffer; the array is dropped
        key_var, keys = tf.Variable(keys, trainable=False), None
    baseline = _common.rss_bytes()
    _common.reset_peak_rss()
    start = time.perf_counter()
    if key_var is not None:
        searcher = search_lib.ScannSearch.build(key_var)
        options = searcher.options
    else:
        searcher, options = _common.pybind_scann(keys, 10)
    build_seconds = time.perf_counter() - start
    peak, after = _common.peak_rss_bytes(), _common.rss_bytes()
    del searcher
    return {
        "size": size,
        "search": "scann",
        "via": via,
        "options": options,
        "key_bytes": key_bytes,
        "baseline_rss": baseline,
        "build_peak_rss": peak,
        "rss_after_build": after,
        "build_seconds": build_seconds,
        "peak_growth_over_keys": (peak - baseline) / key_bytes,
        "kept_over_keys": (after - baseline) / key_bytes,
    }


def report(result, args):
    """Prints the result as one `RESULT {json}` line (and appends it to `--append-to`)."""
    line = json.dumps(result)
    print("RESULT " + line)
    sys.stdout.flush()
    if args.append_to:
        with open(args.append_to, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
