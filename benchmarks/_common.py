"""Helpers shared by the benchmarks: recall, throughput, memory use, the machine."""

import importlib.metadata
import os
import platform
import time

import numpy as np


def recall(found, truth):
    """Mean fraction of each row of `truth` (the true neighbour ids) found in `found`."""
    k = truth.shape[1]
    return float(
        np.mean(
            [len(set(f) & set(t)) / k for f, t in zip(found.tolist(), truth.tolist(), strict=True)]
        )
    )


def queries_per_second(fn, batches, min_seconds, rounds=3, size=len):
    """Throughput of `fn` over `batches`: the best of `rounds` timed rounds.

    One warm-up call first (tracing, caches). Each round cycles through
    `batches` until `min_seconds / rounds` have passed; the best round is
    reported, as `timeit` does, because on a shared machine the slower
    rounds measure other processes, not `fn`. `fn(batch)` must return when
    its result is ready (call `.numpy()` on TensorFlow results). `size(batch)`
    is the number of queries in a batch.
    """
    fn(batches[0])
    best = 0.0
    for _ in range(rounds):
        done, start = 0, time.perf_counter()
        elapsed = 0.0
        while elapsed < min_seconds / rounds:
            for batch in batches:
                fn(batch)
                done += size(batch)
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds / rounds:
                    break
        best = max(best, done / elapsed)
    return best


def pybind_scann(keys, k):
    """ScaNN's own Python API index of `keys`, built with the library's default ScaNN options.

    The same tree (or brute force, for a small memory) as `ScannSearch.build`,
    without TensorFlow. Returns `(searcher, options)`.
    """
    from scann.scann_ops.py import scann_ops_pybind

    from keras_resmem import search as search_lib

    options = search_lib.resolve_scann_options(*keys.shape)
    builder = scann_ops_pybind.builder(keys, k, "squared_l2")
    if not options["brute_force"]:
        builder = builder.tree(
            num_leaves=options["num_leaves"],
            num_leaves_to_search=options["num_leaves_to_search"],
            training_sample_size=options["training_sample_size"],
            min_partition_size=options["min_partition_size"],
        )
    return builder.score_brute_force().build(), options


def in_batches(array, batch):
    """`array` split into consecutive slices of `batch` rows."""
    return [array[i : i + batch] for i in range(0, len(array), batch)]


def _proc_status(field):
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, ...) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes():
    """The resident set size of this process now."""
    return _proc_status("VmRSS")


def peak_rss_bytes():
    """The peak resident set size of this process (VmHWM) since start or `reset_peak_rss`."""
    return _proc_status("VmHWM")


def reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux 4.0+); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine():
    """A description of this machine and the library versions, for the results files."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        memory_gib = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in ("tensorflow", "keras", "scann", "faiss-cpu", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "versions": versions,
    }


def gib(num_bytes):
    return None if num_bytes is None else num_bytes / 2**30


def write_results(output_dir, name, results, lines):
    """Writes `<output_dir>/<name>.json` (`results`) and `<name>.md` (`lines`), atomically."""
    import json

    from keras_resmem import _io

    os.makedirs(output_dir, exist_ok=True)
    _io.write_text(os.path.join(output_dir, f"{name}.json"), json.dumps(results, indent=2) + "\n")
    _io.write_text(os.path.join(output_dir, f"{name}.md"), "\n".join(lines) + "\n")
