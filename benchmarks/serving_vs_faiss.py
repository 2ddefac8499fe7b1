"""The memory's serving cost against FAISS's search time, in one run, alternating rounds.

Builds a ResMem model over `--size` keys (by default the benchmark CNN's
32-d `pre_logits` embeddings of the 60,000 Fashion-MNIST training images,
queried with the test images' embeddings; `--keys clustered`: a synthetic
Gaussian mixture of ~sqrt(n) clusters of `--dim` dimensions), k=`--k`, with IVF search,
exports it as a portable SavedModel, and exports the network alone (a Dense
head over the key: the memory is then the only difference between the two).
IVF's `num_probes` is the smallest giving the SavedModel recall@k >=
`--recall` on held-out queries (against exact search); FAISS IVF-Flat's
`nprobe` (same number of lists) and HNSW's `efSearch` are the smallest that
reach at least the SavedModel's recall.

Then one process, with TensorFlow and FAISS but neither Keras nor this
library (as a server has), loads the SavedModels with TensorFlow's session
loader (the loader TensorFlow Serving's C++ server runs) and times, round
after round and in a rotating order, a request of batch 1 and of batch 256
to each SavedModel, and FAISS's search of the same keys. The time the memory
adds is the ResMem SavedModel's time less the network's. Reports medians
over rounds, and the ratios the issue sets targets for:

- added time at batch 256 / FAISS IVF-Flat's search time (target <= 1.5);
- added time at batch 1 (target <= 0.25 ms).

Writes `results/benchmarks/serving_vs_faiss.{json,md}`.

    python benchmarks/serving_vs_faiss.py                       # ~5 minutes
    python benchmarks/serving_vs_faiss.py --scoring bfloat16    # IVF's bfloat16 scoring
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import _common
import keras
import numpy as np
import tensorflow as tf
from embeddings import ROOT

import keras_resmem
from keras_resmem import search as search_lib

TIMER = """
import json, sys, time
for name in ("keras", "keras_resmem", "tf_keras"):
    sys.modules[name] = None  # a server process has neither
import faiss
import numpy as np
import tensorflow as tf

config = json.loads(sys.argv[1])
work = config["work"]
queries = np.load(f"{work}/queries.npy")
keys = np.load(f"{work}/keys.npy")
k, threads = config["k"], config["threads"]
faiss.omp_set_num_threads(threads)
tf_config = tf.compat.v1.ConfigProto(
    intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads
)

calls = {}
sessions = []
for name in config["saved_models"]:
    graph = tf.Graph()
    sess = tf.compat.v1.Session(graph=graph, config=tf_config)
    with graph.as_default():
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], f"{work}/{name}")
    sig = meta.signature_def["serving_default"]
    (input_name,) = sig.inputs
    feed = sig.inputs[input_name].name
    fetches = [info.name for info in sig.outputs.values()]
    sessions.append(sess)
    calls[name] = lambda batch, sess=sess, feed=feed, fetches=fetches: sess.run(
        fetches, {feed: batch}
    )

d = keys.shape[1]
ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, config["nlist"])
sample = np.random.default_rng(0).choice(len(keys), min(len(keys), 64 * config["nlist"]), False)
ivf.train(keys[sample])
ivf.add(keys)
ivf.nprobe = config["nprobe"]
hnsw = faiss.IndexHNSWFlat(d, 32)
hnsw.hnsw.efConstruction = 40
hnsw.add(keys)
hnsw.hnsw.efSearch = config["ef_search"]
calls["faiss_ivfflat"] = lambda batch: ivf.search(batch, k)
calls["faiss_hnsw"] = lambda batch: hnsw.search(batch, k)

for call in calls.values():  # warm-up: graphs built, caches filled
    for batch in (1, 256):
        for _ in range(3):
            call(queries[:batch])

times = {name: {1: [], 256: []} for name in calls}
names = list(calls)
for r in range(config["rounds"]):
    order = names[r % len(names):] + names[: r % len(names)]
    for name in order:
        for batch, repeats in ((1, config["repeats_1"]), (256, config["repeats_256"])):
            samples = []
            for i in range(repeats):
                start = (r * repeats + i) * batch % (len(queries) - batch)
                q = queries[start : start + batch]
                t = time.perf_counter()
                calls[name](q)
                samples.append(1000 * (time.perf_counter() - t))
            times[name][batch].append(float(np.median(samples)))
print("RESULT", json.dumps(times))
"""


def clustered(n, d, queries, rng):
    """`(keys, labels, queries)`: ~sqrt(n) Gaussian clusters, held-out queries."""
    clusters = max(16, int(np.sqrt(n)))
    centers = rng.normal(size=(clusters, d)).astype(np.float32) * 4.0
    which = rng.integers(0, clusters, n + queries)
    points = centers[which] + rng.normal(size=(n + queries, d)).astype(np.float32)
    return points[:n], which[:n] % 10, points[n:]


def fashion_mnist_keys(n, queries):
    """The benchmark CNN's `pre_logits` embeddings: training keys, test queries."""
    from embeddings import fashion_mnist_memory

    arrays, _ = fashion_mnist_memory(1, verbose=0)
    keys = np.asarray(arrays["keys"][:n], np.float32)
    labels = np.asarray(arrays["key_labels"][:n])
    return keys, labels, np.asarray(arrays["queries"][:queries], np.float32)


def models(d, num_classes):
    """The network (its key is its input; a Dense head) and the ResMem model's base."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((d,), name="keys")
    key = keras.layers.Identity(name="pre_logits")(inputs)
    logits = keras.layers.Dense(num_classes, name="logits")(key)
    return keras.Model(inputs, logits, name="network")


def export_network(model, path):
    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name="keys")]
    archive.add_endpoint("serving_default", lambda x: {"scores": model(x)}, input_signature=spec)
    archive.write_out(path, verbose=False)


def recall(found, truth):
    pairs = zip(found, truth, strict=True)
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in pairs]))


def exact_neighbours(keys, queries, k):
    """Exact ids by squared L2, in float64 (independent of the library)."""
    keys64 = keys.astype(np.float64)
    sq = (keys64**2).sum(1)
    out = []
    for start in range(0, len(queries), 256):
        q = queries[start : start + 256].astype(np.float64)
        scores = sq[None, :] - 2 * q @ keys64.T
        part = np.argpartition(scores, k, axis=1)[:, :k]
        out.append(part)
    return np.concatenate(out)


def saved_model_ids(path, queries):
    serve = tf.saved_model.load(path).signatures["serving_default"]
    out = [serve(keys=tf.constant(queries[s : s + 512]))["neighbor_ids"].numpy()
           for s in range(0, len(queries), 512)]  # fmt: skip
    return np.concatenate(out)


def faiss_knob(index_kind, keys, queries, truth, k, target, nlist, threads):
    """The smallest FAISS knob reaching recall `target`, and its recall."""
    import faiss

    faiss.omp_set_num_threads(threads)
    d = keys.shape[1]
    if index_kind == "ivfflat":
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        sample = np.random.default_rng(0).choice(len(keys), min(len(keys), 64 * nlist), False)
        index.train(keys[sample])
        index.add(keys)
        knobs = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128]

        def set_knob(v):
            index.nprobe = v
    else:
        index = faiss.IndexHNSWFlat(d, 32)
        index.hnsw.efConstruction = 40
        index.add(keys)
        knobs = [k, 64, 80, 96, 128, 160, 192, 256, 384, 512]

        def set_knob(v):
            index.hnsw.efSearch = v

    for knob in knobs:
        set_knob(knob)
        got = recall(index.search(queries, k)[1], truth)
        if got >= target:
            return knob, got
    return knob, got


def add_memory_arguments(parser):
    """The arguments this script shares with `serving_profile.py`: keys, k, IVF scoring."""
    parser.add_argument("--keys", default="fashion-mnist", choices=["fashion-mnist", "clustered"])
    parser.add_argument("--size", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=32, help="clustered keys only")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--scoring", default="exact", choices=list(search_lib.ivf.IVF_SCORING))


def memory_keys(args, queries):
    """`(keys, labels, queries)` as `args` ask, with `queries` held-out queries."""
    if args.keys == "clustered":
        return clustered(args.size, args.dim, queries, np.random.default_rng(0))
    return fashion_mnist_keys(args.size, queries)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_memory_arguments(parser)
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats-1", type=int, default=60)
    parser.add_argument("--repeats-256", type=int, default=6)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    args = parser.parse_args(argv)

    keys, labels, queries = memory_keys(args, args.recall_queries + 4096)
    n, d = keys.shape
    held_out, timed = queries[: args.recall_queries], queries[args.recall_queries :]
    threads = search_lib.search_threads()
    work = tempfile.mkdtemp(prefix="serving-vs-faiss-")
    np.save(os.path.join(work, "keys.npy"), keys)
    np.save(os.path.join(work, "queries.npy"), timed)

    network = models(d, 10)
    network.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    export_network(network, os.path.join(work, "network"))
    search = search_lib.IVF(scoring=args.scoring)
    model = keras_resmem.attach_memory(
        network, "pre_logits", (keys, labels), k=args.k, search=search, verbose=0
    )
    memory = keras_resmem.lifecycle.find_memory(model)
    truth = exact_neighbours(keys, held_out, args.k)
    path = os.path.join(work, "resmem")
    partitions = int(memory.search.centroids.shape[0])
    for probes in (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, partitions):
        memory.num_probes = min(probes, partitions)
        keras_resmem.export_saved_model(model, path, overwrite=True)
        ivf_recall = recall(saved_model_ids(path, held_out), truth)
        print(f"IVF num_probes={memory.num_probes}: SavedModel recall@{args.k} {ivf_recall:.4f}")
        if ivf_recall >= args.recall:
            break
    nprobe, faiss_recall = faiss_knob(
        "ivfflat", keys, held_out, truth, args.k, ivf_recall, partitions, threads
    )
    ef, hnsw_recall = faiss_knob("hnsw", keys, held_out, truth, args.k, ivf_recall, 0, threads)
    print(
        f"FAISS IVF-Flat nprobe={nprobe}: {faiss_recall:.4f}; HNSW efSearch={ef}: {hnsw_recall:.4f}"
    )

    config = {
        "work": work,
        "k": args.k,
        "threads": threads,
        "saved_models": ["network", "resmem"],
        "nlist": partitions,
        "nprobe": nprobe,
        "ef_search": ef,
        "rounds": args.rounds,
        "repeats_1": args.repeats_1,
        "repeats_256": args.repeats_256,
    }
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", TIMER, json.dumps(config)],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    times = json.loads(result.stdout.split("RESULT")[-1])
    median = {name: {b: float(np.median(v)) for b, v in by.items()} for name, by in times.items()}
    # Added time per round (the two SavedModels in the same round), then the median.
    added = {
        b: float(np.median(np.subtract(times["resmem"][b], times["network"][b])))
        for b in ("1", "256")
    }
    ratios = {
        "added_256_over_faiss_ivfflat": added["256"] / median["faiss_ivfflat"]["256"],
        "added_256_over_faiss_hnsw": added["256"] / median["faiss_hnsw"]["256"],
        "added_1_over_faiss_ivfflat": added["1"] / median["faiss_ivfflat"]["1"],
        "added_1_over_faiss_hnsw": added["1"] / median["faiss_hnsw"]["1"],
    }
    results = {
        "command": "python benchmarks/serving_vs_faiss.py " + " ".join(argv or sys.argv[1:]),
        "keys": args.keys,
        "memory_size": n,
        "key_dim": d,
        "k": args.k,
        "threads": threads,
        "ivf": {"scoring": args.scoring, "num_partitions": partitions,
                "num_probes": memory.num_probes, "recall": ivf_recall},
        "faiss_ivfflat": {"nlist": partitions, "nprobe": nprobe, "recall": faiss_recall},
        "faiss_hnsw": {"M": 32, "efConstruction": 40, "efSearch": ef, "recall": hnsw_recall},
        "rounds": args.rounds,
        "median_ms": median,
        "added_ms": added,
        "ratios": ratios,
        "targets": {
            "added_256_over_faiss_ivfflat <= 1.5": ratios["added_256_over_faiss_ivfflat"] <= 1.5,
            "added_1_ms <= 0.25": added["1"] <= 0.25,
        },
        "machine": _common.machine(),
    }  # fmt: skip
    lines = [
        f"# Serving cost against FAISS: {n:,} {args.keys} keys of {d} dims, k={args.k}",
        "",
        f"Command: `{results['command']}`",
        "",
        f"IVF ({args.scoring} scoring) {partitions} partitions, {memory.num_probes} probed: "
        f"SavedModel recall@{args.k} {ivf_recall:.4f}. FAISS IVF-Flat nprobe {nprobe} "
        f"({faiss_recall:.4f}), HNSW efSearch {ef} ({hnsw_recall:.4f}). {threads} threads. "
        f"Medians of {args.rounds} alternating rounds.",
        "",
        "| | batch 1 ms | batch 256 ms |",
        "|---|---|---|",
    ]
    for name in times:
        lines.append(f"| {name} | {median[name]['1']:.3f} | {median[name]['256']:.2f} |")
    lines.append(f"| **added by the memory** | {added['1']:.3f} | {added['256']:.2f} |")
    lines += [
        "",
        f"- added at batch 256 / FAISS IVF-Flat: **{ratios['added_256_over_faiss_ivfflat']:.2f}x**"
        " (target <= 1.5x); / HNSW: "
        f"{ratios['added_256_over_faiss_hnsw']:.2f}x",
        f"- added at batch 1: **{added['1']:.3f} ms** (target <= 0.25 ms); "
        f"{ratios['added_1_over_faiss_ivfflat']:.1f}x FAISS IVF-Flat's search, "
        f"{ratios['added_1_over_faiss_hnsw']:.1f}x HNSW's",
    ]
    name = "serving_vs_faiss" + ("" if args.scoring == "exact" else f"_{args.scoring}")
    if args.keys != "fashion-mnist":
        name += f"_{args.keys}"
    _common.write_results(args.output_dir, name, results, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
