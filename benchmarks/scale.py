"""Scale: ResMem memories of 100k to 5M entries, every search backend side by side.

Keys: the 32-d `pre_logits` embeddings of augmented Fashion-MNIST training
images (shifts of up to 3 pixels, flips; 84 copies = 5,040,000 entries,
`benchmarks/embeddings.py`); a memory of `n` entries holds the first `n`.
Queries: the 10,000 test images. One run, the same keys and queries for every
backend:

- build time of each backend: exact (the key table), `ivf` (the library's
  inverted file in stock TensorFlow ops), `scann` (the library's ScaNN
  backend), `scann-pybind` (ScaNN's own Python API, for reference: no
  TensorFlow in the call), FAISS-CPU `IndexIVFFlat` and `IndexHNSWFlat`;
- recall@k (k=50) against exact search and queries per second at batch 1 and
  batch 256, over a sweep of each backend's search-depth knob;
- ResMem test accuracy with each backend's neighbours (the library's formula:
  exact distances of the neighbours found, `softmax(-d / sigma)` weights,
  residuals `onehot(y) - softmax(logits / T)`), against exact search;
- `attach_memory` wall time against one `model.predict` pass over the same
  augmented training images (`--attach-size`);
- peak RSS of building a memory (`--rss-size`), each build in a process of
  its own (`benchmarks/_build_rss.py`), against the saved memory's size.

Writes `results/benchmarks/scale.{json,md,png}` and prints whether each target
of the scale issue is met.

    python benchmarks/scale.py                              # the full run
    python benchmarks/scale.py --sizes 100000 --attach-size 0 --rss-size 0
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import _common
import faiss
import numpy as np
import tensorflow as tf
from _build_rss import augmented_dataset
from embeddings import ROOT, fashion_mnist_memory

import keras_resmem
from keras_resmem import _io
from keras_resmem import residuals as residuals_lib
from keras_resmem import search as search_lib

BACKENDS = ("exact", "ivf", "scann", "scann-pybind", "faiss-ivfflat", "faiss-hnsw")
APPROXIMATE = BACKENDS[1:]
# The backend the targets are checked for, and the library backends' knobs.
CHOSEN = "scann"
KNOBS = {
    "ivf": "num_probes",
    "scann": "leaves_to_search",
    "scann-pybind": "leaves_to_search",
    "faiss-ivfflat": "nprobe",
    "faiss-hnsw": "efSearch",
}
TARGETS = {
    "attach_over_predict": 1.3,
    "recall": 0.95,
    "speedup_over_exact": 10.0,
    "accuracy_points": 0.2,
    "rss_over_disk": 2.0,
}


class Backend:
    """One searcher, with a knob swept at search time.

    Args:
        name: the backend's name (`BACKENDS`).
        search: `search(batch) -> (m, k) int ids` (a numpy array).
        prepare: turns a numpy batch of queries into what `search` takes.
        set_knob: `set_knob(value)` sets the search-depth knob (None: no knob).
        default: the library's default value of the knob, if any.
    """

    def __init__(self, name, search, prepare=lambda b: b, set_knob=None, default=None):
        self.name = name
        self.search = search
        self.prepare = prepare
        self.set_knob = set_knob
        self.default = default


def tf_backend(name, searcher, k, knob_variable=None, default=None):
    """A `Backend` around a `keras_resmem.search` searcher, called as a user calls it.

    Eagerly: each searcher then runs its compiled graph, and ScaNN answers a
    batch too small to shard with one call of its op (`search._Searcher`).
    """
    k = tf.constant(k, tf.int32)
    return Backend(
        name,
        lambda batch: searcher.search(batch, k).numpy(),
        prepare=tf.constant,
        set_knob=None if knob_variable is None else knob_variable.assign,
        default=default,
    )


def build_backend(name, keys, key_var, k, args):
    """Builds backend `name` on `keys`; returns `(Backend, build_seconds, info)`."""
    n, d = keys.shape
    threads = search_lib.search_threads()
    start = time.perf_counter()
    if name == "ivf":
        options = search_lib.resolve_ivf_options(n, None)
        centroids, offsets, ids = search_lib.train_ivf(keys, options)
        seconds = time.perf_counter() - start
        probes = tf.Variable(options["num_probes"], dtype=tf.int32)
        searcher = search_lib.IVFSearch(key_var, centroids, offsets, ids, probes)
        info = {"num_partitions": options["num_partitions"]}
        return tf_backend(name, searcher, k, probes, options["num_probes"]), seconds, info
    if name == "scann":
        searcher = search_lib.ScannSearch.build(keys)
        seconds = time.perf_counter() - start
        if searcher.options["brute_force"]:  # a small memory: no leaves to sweep
            return tf_backend(name, searcher, k), seconds, {"options": searcher.options}
        default = searcher.options["num_leaves_to_search"]
        backend = tf_backend(name, searcher, k, default=default)
        # A Python int, not a variable: an eager single-query search would
        # read the variable on every call (a TensorFlow op of its own).
        backend.set_knob = lambda v: setattr(searcher, "leaves_to_search", int(v))
        return backend, seconds, {"options": searcher.options}
    if name == "scann-pybind":
        searcher, options = _common.pybind_scann(keys, k)
        seconds = time.perf_counter() - start
        state = {"leaves": options.get("num_leaves_to_search", -1)}

        def search(batch):
            if len(batch) == 1:
                return searcher.search(batch[0], k, leaves_to_search=state["leaves"])[0][None]
            per_thread = -(-len(batch) // threads)
            return searcher.search_batched_parallel(
                batch, k, leaves_to_search=state["leaves"], batch_size=per_thread
            )[0]

        backend = Backend(
            name,
            search,
            set_knob=None if options["brute_force"] else lambda v: state.update(leaves=int(v)),
            default=options.get("num_leaves_to_search"),
        )
        return backend, seconds, {"options": options}
    faiss.omp_set_num_threads(threads)
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if name == "faiss-ivfflat":
        nlist = search_lib.resolve_scann_options(max(n, 20_000), d)["num_leaves"]
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        rng = np.random.default_rng(0)
        index.train(keys[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))])
        index.add(keys)
        seconds = time.perf_counter() - start

        def set_nprobe(v):
            index.nprobe = int(v)

        backend = Backend(name, lambda b: index.search(b, k)[1], set_knob=set_nprobe)
        return backend, seconds, {"nlist": nlist}
    if name == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, args.hnsw_m)
        index.hnsw.efConstruction = args.hnsw_ef_construction
        index.add(keys)
        seconds = time.perf_counter() - start

        def set_ef(v):
            index.hnsw.efSearch = int(v)

        backend = Backend(name, lambda b: index.search(b, k)[1], set_knob=set_ef)
        info = {"M": args.hnsw_m, "efConstruction": args.hnsw_ef_construction}
        return backend, seconds, info
    raise ValueError(f"Unknown backend {name!r}")


def resmem_accuracy(ids, arrays, n, sigma, temperature, chunk=2000):
    """ResMem test accuracy with neighbour ids `ids` `(m, k)` into the first `n` entries."""
    keys, key_logits, key_labels = arrays["keys"], arrays["key_logits"], arrays["key_labels"]
    queries, query_logits = arrays["queries"], arrays["query_logits"]
    ids = np.where((ids < 0) | (ids >= n), ids[:, :1], ids)  # FAISS pads with -1
    correct = 0
    for start in range(0, len(ids), chunk):
        block = ids[start : start + chunk]
        flat = block.reshape(-1)
        order = np.argsort(flat, kind="stable")  # sorted reads of the memory maps
        gathered = np.empty((len(flat), keys.shape[1]), np.float32)
        gathered[order] = keys[flat[order]]
        neighbor_keys = gathered.reshape(block.shape + (keys.shape[1],))
        neighbor_logits = np.empty((len(flat), key_logits.shape[1]), np.float32)
        neighbor_logits[order] = key_logits[flat[order]]
        q = queries[start : start + chunk]
        distances = np.sqrt(np.maximum(((q[:, None, :] - neighbor_keys) ** 2).sum(-1), 0.0))
        prediction, _ = residuals_lib.resmem_prediction(
            tf.constant(query_logits[start : start + chunk]),
            tf.constant(neighbor_logits.reshape(block.shape + (key_logits.shape[1],))),
            tf.constant(key_labels[block]),
            tf.constant(distances),
            sigma=sigma,
            temperature=temperature,
            task="classification",
            from_logits=True,
        )
        labels = arrays["query_labels"][start : start + chunk]
        correct += int((prediction.numpy().argmax(-1) == labels).sum())
    return correct / len(ids)


def search_all(backend, queries, batch=256):
    return np.concatenate(
        [backend.search(backend.prepare(b)) for b in _common.in_batches(queries, batch)]
    )


def measure(backend, value, arrays, n, truth, args):
    """One point of a sweep: recall, ResMem accuracy, queries per second at batch 1 and 256."""
    if value is not None:
        backend.set_knob(value)
    queries = arrays["queries"]
    found = search_all(backend, queries)
    row = {
        "backend": backend.name,
        "knob": KNOBS.get(backend.name),
        "value": value,
        "default": value is not None and value == backend.default,
        "recall": 1.0 if truth is None else _common.recall(found, truth),
        "resmem_accuracy": resmem_accuracy(found, arrays, n, args.sigma, args.temperature),
    }
    for batch, count in ((1, args.batch1_queries), (256, args.batch256_queries)):
        batches = [backend.prepare(b) for b in _common.in_batches(queries[:count], batch)]
        row[f"qps_batch_{batch}"] = _common.queries_per_second(
            backend.search, batches, args.min_seconds
        )
    return row, found


def sweep_values(name, args, default, limit):
    values = {
        "ivf": args.ivf_probes,
        "scann": args.scann_leaves,
        "scann-pybind": args.scann_leaves,
        "faiss-ivfflat": args.faiss_nprobe,
        "faiss-hnsw": args.hnsw_ef,
    }[name]
    values = {int(v) for v in values.split(",") if v}
    if default is not None:
        values.add(int(default))
    return sorted(v for v in values if limit is None or v <= limit)


def run_size(n, arrays, args):
    """Every backend on the first `n` entries; returns the size's results."""
    keys = arrays["keys"][:n]
    k = args.k
    print(f"\n=== {n:,} entries ===", flush=True)
    start = time.perf_counter()
    key_var = tf.Variable(keys, trainable=False)
    builds = {"exact": {"seconds": time.perf_counter() - start}}
    exact = tf_backend("exact", search_lib.ExactSearch(key_var), k)
    rows, failures = [], []
    row, truth = measure(exact, None, arrays, n, None, args)
    rows.append(row)
    print(_row_text(row), flush=True)
    for name in args.backends:
        if name == "exact":
            continue
        backend, seconds, info = build_backend(name, keys, key_var, k, args)
        builds[name] = {"seconds": seconds, **info}
        print(f"{name}: built in {seconds:.1f} s {info}", flush=True)
        limit = None
        if name in ("scann", "scann-pybind") and not info["options"]["brute_force"]:
            limit = info["options"]["num_leaves"]
        if name == "faiss-ivfflat":
            limit = info["nlist"]
        values = (
            [None] if backend.set_knob is None else sweep_values(name, args, backend.default, limit)
        )
        for value in values:
            try:
                row, _ = measure(backend, value, arrays, n, truth, args)
            except tf.errors.InvalidArgumentError as e:
                # ScaNN's op refuses a search whose leaves hold fewer than k
                # entries for some query: too few leaves searched. Recorded, skipped.
                failures.append({"backend": name, "knob": value, "error": e.message[:200]})
                print(f"  {name} {value}: failed ({e.message[:120]})", flush=True)
                continue
            rows.append(row)
            print(_row_text(row), flush=True)
        del backend
        gc.collect()
    exact_row = rows[0]
    for row in rows:
        for batch in (1, 256):
            row[f"speedup_batch_{batch}"] = (
                row[f"qps_batch_{batch}"] / exact_row[f"qps_batch_{batch}"]
            )
    del key_var, exact
    gc.collect()
    return {"size": n, "builds": builds, "rows": rows, "failed": failures}


def _row_text(row):
    knob = f"{row['knob']}={row['value']}" if row["value"] is not None else ""
    return (
        f"  {row['backend']:<14} {knob:<22} recall {row['recall']:.4f}  "
        f"ResMem acc {row['resmem_accuracy']:.4f}  "
        f"qps b1 {row['qps_batch_1']:8.0f}  b256 {row['qps_batch_256']:8.0f}"
    )


def time_attach(model, arrays, args):
    """`attach_memory` wall time per backend against `model.predict` over the same images."""
    n = args.attach_size
    dataset = augmented_dataset(args.copies, n)
    inputs = dataset.map(lambda x, y: x)
    model.predict(inputs.take(2), verbose=0)  # trace predict once, outside the timing
    result = {"size": n, "predict_seconds": [], "attach": {}}

    def timed_predict():
        start = time.perf_counter()
        model.predict(inputs, verbose=0)
        result["predict_seconds"].append(time.perf_counter() - start)
        print(f"predict over {n:,} images: {result['predict_seconds'][-1]:.1f} s", flush=True)

    timed_predict()
    for search in args.attach_backends:
        start = time.perf_counter()
        resmem = keras_resmem.attach_memory(
            model,
            "pre_logits",
            dataset,
            k=args.k,
            sigma=args.sigma,
            temperature=args.temperature,
            search=search,
            verbose=0,
        )
        seconds = time.perf_counter() - start
        memory = resmem.get_layer("residual_memory")
        key_error = float(np.abs(memory.keys.numpy() - arrays["keys"][:n]).max())
        result["attach"][search] = {"seconds": seconds, "max_key_difference": key_error}
        print(
            f"attach_memory(search={search!r}): {seconds:.1f} s "
            f"(keys match the cached embeddings to {key_error:.1e})",
            flush=True,
        )
        del resmem, memory
        gc.collect()
    timed_predict()
    floor = min(result["predict_seconds"])
    for entry in result["attach"].values():
        entry["over_predict"] = entry["seconds"] / floor
    return result


def measure_rss(args):
    """Peak RSS of building the `--rss-size` memory, one subprocess per build."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_rss.py")
    results = []
    for spec in args.rss_builds:
        search, via = spec.split(":")
        command = [
            sys.executable,
            script,
            f"--size={args.rss_size}",
            f"--search={search}",
            f"--via={via}",
            f"--copies={args.copies}",
            f"--k={args.k}",
            f"--sigma={args.sigma}",
            f"--temperature={args.temperature}",
        ]
        print(f"peak RSS: {' '.join(command[1:])}", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            print(done.stdout[-2000:], done.stderr[-4000:], sep="\n")
            results.append({"search": search, "via": via, "error": done.returncode})
            continue
        entry = json.loads(line[len("RESULT ") :])
        peak, baseline, disk = (
            entry["build_peak_rss"],
            entry["baseline_rss"],
            entry["disk_bytes"],
        )
        entry["over_disk"] = peak / disk
        entry["growth_over_disk"] = (peak - baseline) / disk
        results.append(entry)
        print(
            f"  build {entry['build_seconds']:.0f} s, peak RSS {_common.gib(peak):.2f} GiB "
            f"(baseline {_common.gib(baseline):.2f}), saved {_common.gib(disk):.2f} GiB: "
            f"peak/disk {entry['over_disk']:.2f}x, growth/disk {entry['growth_over_disk']:.2f}x",
            flush=True,
        )
    return results


def best(rows, backend, batch, min_recall):
    """The fastest row of `backend` at `batch` with recall >= min_recall, or None."""
    passing = [r for r in rows if r["backend"] == backend and r["recall"] >= min_recall]
    return max(passing, key=lambda r: r[f"qps_batch_{batch}"], default=None)


def _speed_targets(rows, size, add):
    """The queries-per-second targets at `size` entries, reported through `add`."""
    exact_row = rows[0]
    r = TARGETS["recall"]
    for batch in (256, 1):
        chosen = best(rows, CHOSEN, batch, r)
        if chosen is None:
            add(f"{CHOSEN} recall >= {r} at {size:,}", False, "no setting reached it")
            continue
        speedup = chosen[f"qps_batch_{batch}"] / exact_row[f"qps_batch_{batch}"]
        add(
            f"{CHOSEN} >= {TARGETS['speedup_over_exact']:.0f}x exact qps at recall >= {r}, "
            f"batch {batch}, {size:,} entries",
            speedup >= TARGETS["speedup_over_exact"],
            f"{chosen['knob']}={chosen['value']}: recall {chosen['recall']:.4f}, "
            f"{chosen[f'qps_batch_{batch}']:.0f} vs {exact_row[f'qps_batch_{batch}']:.0f} q/s "
            f"= {speedup:.1f}x",
        )
        rivals = [best(rows, f, batch, r) for f in ("faiss-ivfflat", "faiss-hnsw")]
        rivals = [x for x in rivals if x is not None]
        if rivals:
            rival = max(rivals, key=lambda x: x[f"qps_batch_{batch}"])
            add(
                f"{CHOSEN} >= the better FAISS index at recall >= {r}, batch {batch}, {size:,}",
                chosen[f"qps_batch_{batch}"] >= rival[f"qps_batch_{batch}"],
                f"{CHOSEN} {chosen[f'qps_batch_{batch}']:.0f} q/s vs {rival['backend']} "
                f"({rival['knob']}={rival['value']}, recall {rival['recall']:.4f}) "
                f"{rival[f'qps_batch_{batch}']:.0f} q/s",
            )


def check_targets(result, args):
    """Whether each target of the issue is met, with the numbers: a list of dicts."""
    checks = []

    def add(name, met, detail):
        checks.append({"target": name, "met": met, "detail": detail})

    attach = result.get("attach")
    if attach and CHOSEN in attach["attach"]:
        ratio = attach["attach"][CHOSEN]["over_predict"]
        add(
            f"attach_memory(search='{CHOSEN}') <= {TARGETS['attach_over_predict']}x predict "
            f"at {attach['size']:,}",
            ratio <= TARGETS["attach_over_predict"],
            f"{attach['attach'][CHOSEN]['seconds']:.1f} s vs predict "
            f"{min(attach['predict_seconds']):.1f} s: {ratio:.2f}x",
        )
    by_size = {s["size"]: s for s in result["sizes"]}
    if by_size:
        size = 1_000_000 if 1_000_000 in by_size else max(by_size)
        _speed_targets(by_size[size]["rows"], size, add)
    for entry in result["sizes"]:
        exact_acc = entry["rows"][0]["resmem_accuracy"]
        default = next((x for x in entry["rows"] if x["backend"] == CHOSEN and x["default"]), None)
        if default is None:
            continue
        gap = 100 * (default["resmem_accuracy"] - exact_acc)
        add(
            f"ResMem accuracy with {CHOSEN} (default settings) within "
            f"{TARGETS['accuracy_points']} points of exact, {entry['size']:,} entries",
            abs(gap) <= TARGETS["accuracy_points"],
            f"{100 * default['resmem_accuracy']:.2f}% vs exact {100 * exact_acc:.2f}% "
            f"({gap:+.2f} points; recall {default['recall']:.4f})",
        )
    for entry in result.get("rss", []):
        if "error" in entry:
            add(f"peak RSS of {entry['search']} via {entry['via']}", False, "the build failed")
            continue
        peak, disk = _common.gib(entry["build_peak_rss"]), _common.gib(entry["disk_bytes"])
        baseline = _common.gib(entry["baseline_rss"])
        what = f"{entry['memory_size']:,} entries ({entry['search']}, via {entry['via']})"
        # Two readings of "peak memory of building": what the build itself
        # added to the process, and the whole process (which held the
        # TensorFlow runtime and the model before the build began).
        add(
            f"peak RSS the build added, {what} <= {TARGETS['rss_over_disk']}x its size on disk",
            entry["growth_over_disk"] <= TARGETS["rss_over_disk"],
            f"{peak - baseline:.2f} GiB over the {baseline:.2f} GiB before the build, vs "
            f"{disk:.2f} GiB on disk: {entry['growth_over_disk']:.2f}x",
        )
        add(
            f"peak RSS of the whole process, {what} <= {TARGETS['rss_over_disk']}x its size on "
            "disk",
            entry["over_disk"] <= TARGETS["rss_over_disk"],
            f"{peak:.2f} GiB vs {disk:.2f} GiB on disk: {entry['over_disk']:.2f}x",
        )
    return checks


def write_markdown(result, path):
    m = result["machine"]
    lines = [
        "# Scale: ResMem memories side by side with FAISS and exact search",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
        + f". Load average at start {result['load_average'][0]}, at end "
        f"{result['load_average'][1]}.",
        "",
        f"Command: `{result['command']}` ({result['wall_seconds'] / 60:.0f} min)",
        "",
        f"k={result['k']}, sigma={result['sigma']}, T={result['temperature']}; "
        f"{result['num_queries']:,} test queries for recall and accuracy; "
        f"DeepNet test accuracy {100 * result['deepnet_accuracy']:.2f}%.",
        "",
        "Queries per second: the best of 3 rounds of "
        f"{result['min_seconds'] / 3:.2f} s each. The library's backends are called as a "
        "user calls them, eagerly through `search()`: exact and ivf run their compiled "
        "graph; scann runs one call of its op for a batch too small to shard (under "
        f"{2 * search_lib.ScannSearch.min_shard_size} queries), the compiled graph of "
        f"{result['search_threads']} parallel shards otherwise.",
        "",
        "## Targets",
        "",
    ]
    for c in result["targets"]:
        lines.append(f"- {'MET' if c['met'] else 'NOT MET'}: {c['target']}: {c['detail']}")
    lines += ["", "## Build time (seconds)", ""]
    names = [b for b in BACKENDS if any(b in s["builds"] for s in result["sizes"])]
    lines.append("| entries | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for s in result["sizes"]:
        cells = [f"{s['builds'][b]['seconds']:.1f}" if b in s["builds"] else "-" for b in names]
        lines.append(f"| {s['size']:,} | " + " | ".join(cells) + " |")
    for s in result["sizes"]:
        lines += [
            "",
            f"## {s['size']:,} entries",
            "",
            "| backend | knob | recall@k | ResMem acc | q/s batch 1 | q/s batch 256 "
            "| x exact b1 | x exact b256 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            knob = "-" if r["value"] is None else f"{r['knob']}={r['value']}"
            knob += " (default)" if r["default"] else ""
            lines.append(
                f"| {r['backend']} | {knob} | {r['recall']:.4f} | "
                f"{100 * r['resmem_accuracy']:.2f}% | {r['qps_batch_1']:,.0f} | "
                f"{r['qps_batch_256']:,.0f} | {r['speedup_batch_1']:.1f}x | "
                f"{r['speedup_batch_256']:.1f}x |"
            )
    attach = result.get("attach")
    if attach:
        lines += [
            "",
            f"## attach_memory vs predict, {attach['size']:,} images",
            "",
            "predict (before and after): "
            + ", ".join(f"{x:.1f} s" for x in attach["predict_seconds"]),
            "",
            "| search | attach_memory | / predict |",
            "|---|---|---|",
        ]
        for search, entry in attach["attach"].items():
            lines.append(f"| {search} | {entry['seconds']:.1f} s | {entry['over_predict']:.2f}x |")
    if result.get("rss"):
        lines += [
            "",
            "## Peak memory of a build",
            "",
            "| entries | search | via | build | peak RSS | baseline RSS | on disk | peak / disk "
            "| (peak - baseline) / disk | save peak RSS |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in result["rss"]:
            if "error" in e:
                lines.append(f"| - | {e['search']} | {e['via']} | failed | | | | | | |")
                continue
            lines.append(
                f"| {e['memory_size']:,} | {e['search']} | {e['via']} | {e['build_seconds']:.0f} s"
                f" | {_common.gib(e['build_peak_rss']):.2f} GiB"
                f" | {_common.gib(e['baseline_rss']):.2f} GiB"
                f" | {_common.gib(e['disk_bytes']):.2f} GiB | {e['over_disk']:.2f}x"
                f" | {e['growth_over_disk']:.2f}x | {_common.gib(e['save_peak_rss']):.2f} GiB |"
            )
    _io.write_text(path, "\n".join(lines) + "\n")
    return lines


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    fig, axes = plt.subplots(len(sizes), 2, figsize=(11, 3.6 * len(sizes)), squeeze=False)
    for axes_row, s in zip(axes, sizes, strict=True):
        exact_row = s["rows"][0]
        for ax, batch in zip(axes_row, (1, 256), strict=True):
            key = f"qps_batch_{batch}"
            for name in APPROXIMATE:
                rows = [r for r in s["rows"] if r["backend"] == name]
                if not rows:
                    continue
                (line,) = ax.plot(
                    [r["recall"] for r in rows], [r[key] for r in rows], "o-", ms=3, label=name
                )
                for r in rows:
                    if r["default"]:
                        ax.plot(r["recall"], r[key], "*", ms=11, color=line.get_color())
            ax.axhline(exact_row[key], color="k", ls="--", lw=1, label="exact")
            ax.axvline(TARGETS["recall"], color="gray", ls=":", lw=1)
            ax.set(
                xlabel=f"recall@{result['k']}",
                ylabel="queries / s",
                yscale="log",
                title=f"{s['size']:,} entries, batch {batch}",
            )
            ax.set_xlim(left=max(0.8, ax.get_xlim()[0]), right=1.001)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"Fashion-MNIST embeddings ({result['key_dim']}-d), {result['machine']['cores']} CPU cores"
        " (stars: library defaults)"
    )
    fig.tight_layout()
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000,5000000")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--copies", type=int, default=84, help="augmented copies of 60k images")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--num-queries", type=int, default=10_000, help="for recall, accuracy")
    parser.add_argument("--batch256-queries", type=int, default=2048)
    parser.add_argument("--batch1-queries", type=int, default=300)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="per throughput figure")
    parser.add_argument("--ivf-probes", default="2,4,6,8,10,12,16,24,32")
    parser.add_argument("--scann-leaves", default="3,4,5,6,8,10,12,16,24,32,48")
    parser.add_argument("--faiss-nprobe", default="3,4,5,6,8,10,12,16,24,32,48")
    parser.add_argument("--hnsw-ef", default="50,64,96,128,192,256")
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--hnsw-ef-construction", type=int, default=40)
    parser.add_argument("--attach-size", type=int, default=1_000_000, help="0: skip")
    parser.add_argument("--attach-backends", default="scann,ivf,exact")
    parser.add_argument("--rss-size", type=int, default=5_000_000, help="0: skip")
    parser.add_argument(
        "--rss-builds",
        default="exact:attach,ivf:attach,scann:attach",
        help="search:via pairs, via = memorize (cached arrays) or attach (from images)",
    )
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.backends = [b for b in args.backends.split(",") if b]
    args.attach_backends = [b for b in args.attach_backends.split(",") if b]
    args.rss_builds = [b for b in args.rss_builds.split(",") if b]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown or "exact" not in args.backends:
        parser.error(f"--backends must include exact and name only {BACKENDS}; got {unknown}")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    load_start = os.getloadavg()
    arrays, model = fashion_mnist_memory(args.copies)
    arrays["queries"] = arrays["queries"][: args.num_queries]
    arrays["query_logits"] = arrays["query_logits"][: args.num_queries]
    arrays["query_labels"] = arrays["query_labels"][: args.num_queries]
    available = len(arrays["keys"])
    too_big = [n for n in args.sizes + [args.attach_size, args.rss_size] if n > available]
    if too_big:
        raise SystemExit(
            f"Sizes {too_big} exceed the {available:,} cached entries; raise --copies."
        )
    print(f"{available:,} cached entries; sizes {args.sizes}; backends {args.backends}")
    result = {
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": _common.machine(),
        "search_threads": search_lib.search_threads(),
        "min_seconds": args.min_seconds,
        "k": args.k,
        "sigma": args.sigma,
        "temperature": args.temperature,
        "key_dim": int(arrays["keys"].shape[1]),
        "num_queries": len(arrays["queries"]),
        "deepnet_accuracy": float(
            (arrays["query_logits"].argmax(-1) == arrays["query_labels"]).mean()
        ),
        "sizes": [run_size(n, arrays, args) for n in args.sizes],
    }
    if args.attach_size:
        result["attach"] = time_attach(model, arrays, args)
    if args.rss_size:
        result["rss"] = measure_rss(args)
    result["load_average"] = [round(load_start[0], 2), round(os.getloadavg()[0], 2)]
    result["wall_seconds"] = time.perf_counter() - started
    result["targets"] = check_targets(result, args)
    out = args.output_dir
    _io.write_text(os.path.join(out, "scale.json"), json.dumps(result, indent=2))
    lines = write_markdown(result, os.path.join(out, "scale.md"))
    if result["sizes"]:
        plot(result, os.path.join(out, "scale.png"))
    print("\n".join(lines))
    print(f"\nWrote {out}/scale.{{json,md,png}}")


if __name__ == "__main__":
    main()
