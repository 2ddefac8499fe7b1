"""What serving a memory from shards adds: fan-out to N shard servers and the merge.

Builds a ResMem memory over the 60,000 Fashion-MNIST training images' 32-d
`pre_logits` embeddings (the benchmark CNN's, as `embeddings.py` caches them;
`--synthetic`: Gaussian clusters instead) with exact search, and serves it
two ways, each through TensorFlow Serving's REST API from `tf_server.py`
processes on this machine (TensorFlow only, as a model server):

- sharded: `--shards` shard servers (`export_shard_saved_model`) and one
  front server (`export_front_saved_model`), driven by `ShardedClient`
  (`features` on the front, the shards in parallel, `merge` on the front),
  with each of its two transports: `packed` (the tensors between the
  servers as `tf.io.serialize_tensor` bytes, base64 in the JSON: signatures
  `features_packed`, `packed`, `merge_packed`) and `json` (JSON numbers:
  `features`, `serving_default`, `merge`);
- unsharded: the same model as one `keras_resmem.export_saved_model`
  SavedModel (search="exact") on one server, one request (JSON).

The network is the CNN's head alone (the key is its input; its `logits`
layer on top), so that the ways differ only in the memory's serving. Queries
are the 10,000 test images' embeddings. Requests alternate between the three
ways, round after round (the order rotated each round), at batch 1 and batch
256; reports the median and p99 latency of each, the added latency (sharded
- unsharded) of each transport, the client's stages (`features`, the slowest
shard, `merge`, each with its encoding), the bytes of a shard's answer, and
the front's `merge` and `merge_packed` signatures alone, called in this
process (no HTTP).

Writes `results/benchmarks/shard_serving.{json,md}`.

    python benchmarks/shard_serving.py                 # ~3 minutes
    python benchmarks/shard_serving.py --synthetic     # no Fashion-MNIST needed
    python benchmarks/shard_serving.py --smoke         # seconds: a tiny synthetic check
"""

import argparse
import base64
import contextlib
import inspect
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_resmem  # noqa: E402
from keras_resmem.sharded import format as format_lib  # noqa: E402
from keras_resmem.sharded import serving  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSPORTS = ("packed", "json")
SERVER = os.path.join(ROOT, "keras_resmem", "sharded", "tf_server.py")


def fashion_mnist_data():
    """`(keys, labels, queries, head weights)`: the CNN's embeddings and its `logits` layer."""
    from embeddings import fashion_mnist_memory

    arrays, model = fashion_mnist_memory(1, verbose=0)
    weights = model.get_layer("logits").get_weights()
    keys = np.asarray(arrays["keys"], np.float32)
    return keys, np.asarray(arrays["key_labels"]), np.asarray(arrays["queries"]), weights


def synthetic_data(n, d, num_queries, num_classes=10, seed=0):
    """Gaussian clusters (about sqrt(n)) of `d` dimensions; labels by cluster; a random head."""
    rng = np.random.default_rng(seed)
    clusters = max(16, int(np.sqrt(n)))
    centers = rng.normal(size=(clusters, d)).astype(np.float32) * 4.0
    which = rng.integers(0, clusters, n + num_queries)
    points = centers[which] + rng.normal(size=(n + num_queries, d)).astype(np.float32)
    head = [rng.normal(size=(d, num_classes)).astype(np.float32) * 0.3, np.zeros(num_classes)]
    return points[:n], which[:n] % num_classes, points[n:], head


def network(d, head):
    """The network served: its input is the key (`pre_logits`), its head the CNN's."""
    inputs = keras.Input((d,), name="keys")
    key = keras.layers.Identity(name="pre_logits")(inputs)
    logits = keras.layers.Dense(len(head[1]), name="logits")(key)
    model = keras.Model(inputs, logits, name="network")
    model.get_layer("logits").set_weights(head)
    return model


def write_shards(memory, directory, num_shards, settings):
    """The memory's own entries, written as `num_shards` shards (as the Beam pipeline would)."""
    ids = memory.entry_ids()
    arrays = {
        "keys": memory.keys.numpy(),
        "memory_scores": memory.memory_scores.numpy(),
        "memory_targets": memory.memory_targets.numpy(),
        "memory_ids": ids,
    }
    which = format_lib.shard_of(ids, num_shards)
    entries = [
        format_lib.write_shard(
            directory, i, num_shards, {n: a[which == i] for n, a in arrays.items()}
        )
        for i in range(num_shards)
    ]
    return format_lib.write_manifest(
        directory,
        entries,
        task="classification",
        from_logits=True,
        key_dim=arrays["keys"].shape[1],
        num_outputs=arrays["memory_scores"].shape[1],
        settings=settings,
    )


@contextlib.contextmanager
def servers(models, threads):
    """One `tf_server.py` process per `(name, model_dir)`; yields their URLs."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    processes = []
    try:
        for name, model_dir in models:
            command = [sys.executable, SERVER, "--model_dir", model_dir, "--model_name", name]
            command += ["--port", "0"]
            if threads:
                command += ["--intra_op_threads", str(threads), "--inter_op_threads", "1"]
            processes.append(
                subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
                )
            )
        urls = []
        for process in processes:
            line = process.stdout.readline()
            if not line.startswith("READY "):
                raise RuntimeError(f"a server failed to start (exit code {process.poll()})")
            urls.append(line.split()[1])
        yield urls
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()


def summary(samples):
    samples = np.asarray(samples)
    return {
        "median": float(np.median(samples)),
        "p99": float(np.percentile(samples, 99)),
        "mean": float(samples.mean()),
        "n": len(samples),
    }


def compare_answers(served, single, keys, queries):
    """How the sharded answers compare with the unsharded SavedModel's (entry ids = positions).

    Where the neighbour ids differ (a near-tie at the k-th neighbour, which
    float32 ranking scores order differently), their exact float64
    distances tell which answer holds the nearer entries.
    """
    same = (served["neighbor_ids"] == single["neighbor_ids"]).all(axis=1)

    def exact(ids, rows):
        q = queries[rows].astype(np.float64)[:, None, :]
        return np.sqrt(((keys[ids[rows]].astype(np.float64) - q) ** 2).sum(-1))

    differ = np.flatnonzero(~same)
    d_served = np.sort(exact(served["neighbor_ids"], differ), axis=1)
    d_single = np.sort(exact(single["neighbor_ids"], differ), axis=1)
    return {
        "queries": len(same),
        "rows_with_equal_neighbor_ids": int(same.sum()),
        "differing_rows_where_sharded_is_nearer_or_equal": int(
            (d_served <= d_single + 1e-12).all(axis=1).sum()
        ),
        "on_equal_rows": {
            "neighbor_weights_bit_identical": bool(
                np.array_equal(served["neighbor_weights"][same], single["neighbor_weights"][same])
            ),
            "resmem_scores_bit_identical": bool(
                np.array_equal(served["resmem_scores"][same], single["resmem_scores"][same])
            ),
        },
        "resmem_scores_max_abs_diff": float(
            np.abs(served["resmem_scores"] - single["resmem_scores"]).max()
        ),
        "class_ids_equal": int((served["class_ids"] == single["class_ids"]).sum()),
    }


def compare_with_sharded_loader(model, manifest, settings, served, queries):
    """The served answers against `attach_memory(shards=...)` in this process, if it exists."""
    if "shards" not in inspect.signature(keras_resmem.attach_memory).parameters:
        return None
    resmem = keras_resmem.attach_memory(model, "pre_logits", shards=manifest, verbose=0, **settings)
    memory = resmem.get_layer("residual_memory")
    prediction = resmem.predict(queries, batch_size=256, verbose=0)
    ids, _, weights = memory.neighbors(queries)  # the network's key is its input
    same = (served["neighbor_ids"] == ids.numpy()).all(axis=1)
    return {
        "search": repr(memory.search),
        "rows_with_equal_neighbor_ids": int(same.sum()),
        "neighbor_weights_bit_identical": bool(
            np.array_equal(served["neighbor_weights"], weights.numpy())
        ),
        "resmem_scores_bit_identical": bool(np.array_equal(served["resmem_scores"], prediction)),
    }


def _time(fn, repeats):
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - start))
    return summary(samples)


def time_merge_in_process(front_path, clients, queries, batches, repeats):
    """The front's `merge` and `merge_packed` signatures alone, in this process, on prepared inputs.

    Returns `{batch: {"merge_k_rows": ..., "merge_all_rows": ..., "merge_packed": ...}}`:
    `merge` given each query's k nearest rows (what `ShardedClient` sends
    on the JSON transport) and given every shard's k rows (the whole
    concatenation); `merge_packed` given the shards' packed answers (what
    it gets on the packed transport), which it decodes, checks and merges.
    """
    front = tf.saved_model.load(front_path)
    merge, merge_packed = front.signatures["merge"], front.signatures["merge_packed"]
    specs = merge.structured_input_signature[1]
    json_client, packed_client = clients["json"], clients["packed"]
    out = {}
    for batch in batches:
        features = json_client.front.predict_json({"keys": queries[:batch]}, "features")
        answers = json_client._check_answers(
            json_client._shard_answers(features["keys"]), features["memory_digest"], batch
        )
        out[batch] = {}
        for way, k in (("merge_k_rows", features["k"]), ("merge_all_rows", None)):
            rows = json_client._nearest(answers, k)
            inputs = {n: tf.constant(np.asarray(v), specs[n].dtype) for n, v in rows.items()}
            inputs["scores"] = tf.constant(features["scores"], tf.float32)
            out[batch][way] = _time(
                lambda inputs=inputs: merge(**inputs)["resmem_scores"].numpy(), repeats[batch]
            )
        packed = packed_client.front.predict_json({"keys": queries[:batch]}, "features_packed")
        answers = packed_client._check_answers(
            packed_client._shard_answers(packed["keys_bytes"]), packed["memory_digest"]
        )
        inputs = {
            "scores_bytes": tf.constant(base64.b64decode(packed["scores_bytes"]["b64"])),
            "answers_bytes": tf.constant(
                np.array([base64.b64decode(a["answer_bytes"]["b64"]) for a in answers], object)
            ),
        }
        out[batch]["merge_packed"] = _time(
            lambda inputs=inputs: merge_packed(**inputs)["resmem_scores"].numpy(), repeats[batch]
        )
    return out


def answer_sizes(clients, queries, batches):
    """The bytes of one shard's answer, and of the `merge` request, per transport and batch."""
    sizes = {}
    for batch in batches:
        sizes[batch] = {}
        for transport, client in clients.items():
            packed = transport == "packed"
            features = client.front.predict_json(
                {"keys": queries[:batch]}, "features_packed" if packed else "features"
            )
            if packed:
                body = serving.encode_request({"keys_bytes": features["keys_bytes"]}, "packed")
            else:
                body = serving.encode_request({"keys": np.asarray(features["keys"], np.float32)})
            shard = client.shards[0]
            _, answer = shard._request("POST", shard._predict_path, body)
            sizes[batch][transport] = {"shard_request": len(body), "shard_answer": len(answer)}
    return sizes


def run(args):
    if args.synthetic or args.smoke:
        keys, labels, queries, head = synthetic_data(args.size, args.dim, 512)
        data = f"synthetic: {args.size} Gaussian-cluster keys of {args.dim} dimensions"
    else:
        keys, labels, queries, head = fashion_mnist_data()
        keys, labels = keys[: args.size], labels[: args.size]
        data = f"Fashion-MNIST: {len(keys)} training images' 32-d pre_logits embeddings"
    model = network(keys.shape[1], head)
    settings = {"k": args.k, "sigma": args.sigma, "temperature": 1.0}
    resmem = keras_resmem.attach_memory(
        model, "pre_logits", (keys, labels), search="exact", verbose=0, **settings
    )
    with tempfile.TemporaryDirectory(prefix="shard_serving_") as work:
        return serve_and_time(args, data, keys, model, resmem, settings, queries, work)


def serve_and_time(args, data, keys, model, resmem, settings, queries, work):
    """Exports the SavedModels to `work`, serves them, and times requests to them."""
    memory = resmem.get_layer("residual_memory")
    manifest = write_shards(memory, os.path.join(work, "memory"), args.shards, settings)
    models = [
        (
            "front",
            serving.export_front_saved_model(model, "pre_logits", manifest, f"{work}/front/1"),
        )
    ]
    for i in range(args.shards):
        path = serving.export_shard_saved_model(manifest, i, f"{work}/shard_{i}/1", k=args.k)
        models.append((f"shard_{i}", path))
    unsharded_path = keras_resmem.export_saved_model(resmem, f"{work}/unsharded/1")
    models.append(("unsharded", unsharded_path))
    load_before = os.getloadavg()
    repeats = {1: args.requests_1, 256: args.requests_256}
    with servers(models, args.threads) as urls:
        front_url, shard_urls, unsharded_url = urls[0], urls[1:-1], urls[-1]
        clients = {
            transport: serving.ShardedClient(front_url, shard_urls, timeout=60, transport=transport)
            for transport in TRANSPORTS
        }
        unsharded = serving.RestModel(unsharded_url, timeout=60)

        def unsharded_call(q, timings):
            return unsharded.predict({"keys": q})

        ways = {
            **{
                transport: (lambda q, timings, c=client: c.predict(q, timings=timings))
                for transport, client in clients.items()
            },
            "unsharded": unsharded_call,
        }
        # Warm-up, and the answers compared (on up to 1,024 queries).
        for _ in range(3):
            for batch in repeats:
                for call in ways.values():
                    call(queries[:batch], None)
        check = queries[: min(len(queries), 1024)]
        answers = {name: [] for name in ways}
        for s in range(0, len(check), 256):
            for name, call in ways.items():
                answers[name].append(call(check[s : s + 256], None))
        answers = {
            name: {n: np.concatenate([a[n] for a in parts]) for n in parts[0]}
            for name, parts in answers.items()
        }
        agreement = {
            "transports_bit_identical": {
                name: answers["packed"][name].tobytes() == answers["json"][name].tobytes()
                for name in answers["packed"]
            }
        }
        agreement.update(compare_answers(answers["packed"], answers["unsharded"], keys, check))
        agreement["sharded_loader"] = compare_with_sharded_loader(
            model, manifest, settings, answers["packed"], check
        )
        sizes = answer_sizes(clients, queries, list(repeats))
        latency = {batch: {name: [] for name in ways} for batch in repeats}
        stages = {
            batch: {t: {"features": [], "shards": [], "merge": []} for t in TRANSPORTS}
            for batch in repeats
        }
        names = list(ways)
        position = 0
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for batch in repeats:
                per_round = max(1, repeats[batch] // args.rounds)
                for name in order:
                    for _ in range(per_round):
                        start = position % (len(queries) - batch)
                        position += batch
                        q = queries[start : start + batch]
                        timings = {} if name in TRANSPORTS else None
                        t = time.perf_counter()
                        ways[name](q, timings)
                        latency[batch][name].append(1000 * (time.perf_counter() - t))
                        if timings is not None:
                            for stage, values in stages[batch][name].items():
                                values.append(1000 * timings[stage])
        merge_alone = time_merge_in_process(
            models[0][1], clients, queries, list(repeats), {1: 200, 256: 30}
        )
        for client in clients.values():
            client.close()
        unsharded.close()
    load_after = os.getloadavg()
    results = {
        "data": data,
        "memory_size": len(keys),
        "shards": args.shards,
        "shard_sizes": [s["size"] for s in format_lib.read_manifest(manifest).shards],
        "k": args.k,
        "sigma": args.sigma,
        "rounds": args.rounds,
        "server_threads": args.threads or "TensorFlow's default",
        "agreement": agreement,
        "bytes": {str(batch): v for batch, v in sizes.items()},
        "latency_ms": {},
        "machine": _common.machine(),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "smoke": bool(args.smoke),
    }
    for batch in repeats:
        unsharded_ = summary(latency[batch]["unsharded"])
        sharded = {t: summary(latency[batch][t]) for t in TRANSPORTS}
        results["latency_ms"][str(batch)] = {
            "sharded": sharded,
            "unsharded": unsharded_,
            "added_median": {t: sharded[t]["median"] - unsharded_["median"] for t in TRANSPORTS},
            "added_p99": {t: sharded[t]["p99"] - unsharded_["p99"] for t in TRANSPORTS},
            "client_stages": {
                t: {stage: summary(v) for stage, v in stages[batch][t].items()} for t in TRANSPORTS
            },
            "merge_signature_in_process": merge_alone[batch],
        }
    return results


def markdown(results):
    lines = [
        "# Serving a sharded memory: the latency fan-out and merge add",
        "",
        f"{results['data']}; {results['shards']} shards of "
        f"{', '.join(map(str, results['shard_sizes']))} entries; k={results['k']}, exact search. "
        "Every model is served by its own `tf_server.py` process on this machine (TensorFlow "
        "Serving's REST API); sharded = `ShardedClient` (front `features`, the shards in "
        "parallel, front `merge`) with each transport: **packed** (tensors between the servers "
        "as `tf.io.serialize_tensor` bytes, base64 in the JSON, forwarded undecoded by the "
        "client; the front's `merge_packed_bytes` decodes them) and **json** (JSON numbers); "
        "unsharded = one "
        "`export_saved_model` SavedModel, one request (JSON). Requests alternate between the "
        f"three ways over {results['rounds']} rounds. Milliseconds.",
        "",
        "| batch | way | median / p99 | added median / p99 | "
        "client: features / shards / merge (medians) |",
        "|---|---|---|---|---|",
    ]
    for batch, row in results["latency_ms"].items():
        u = row["unsharded"]
        for t in TRANSPORTS:
            s, st = row["sharded"][t], row["client_stages"][t]
            lines.append(
                f"| {batch} | sharded, {t} | {s['median']:.2f} / {s['p99']:.2f} "
                f"| {row['added_median'][t]:.2f} / {row['added_p99'][t]:.2f} "
                f"| {st['features']['median']:.2f} / {st['shards']['median']:.2f} / "
                f"{st['merge']['median']:.2f} |"
            )
        lines.append(f"| {batch} | unsharded | {u['median']:.2f} / {u['p99']:.2f} | | |")
    lines += [
        "",
        "| batch | one shard's answer: packed / json (bytes) | merge signature alone "
        "(in process, ms): `merge` k rows / `merge` all rows / `merge_packed` |",
        "|---|---|---|",
    ]
    for batch, row in results["latency_ms"].items():
        size, merge = results["bytes"][batch], row["merge_signature_in_process"]
        lines.append(
            f"| {batch} | {size['packed']['shard_answer']:,} / {size['json']['shard_answer']:,} "
            f"| {merge['merge_k_rows']['median']:.3f} / {merge['merge_all_rows']['median']:.3f} "
            f"/ {merge['merge_packed']['median']:.3f} |"
        )
    a = results["agreement"]
    m = results["machine"]
    identical = a["transports_bit_identical"]
    lines += [
        "",
        f"Requests: {results['latency_ms']['1']['unsharded']['n']} per way at batch 1, "
        f"{results['latency_ms']['256']['unsharded']['n']} at batch 256 (p99 of so few is "
        "close to the maximum). Client stages: `features` (front request), `shards` (the "
        "slowest shard's request, with the client's decoding and checks: on json, its JSON "
        "parsing and top-k selection), `merge` (front request: `merge_packed_bytes` given all the "
        "shards' rows, packed, its outputs packed too; `merge` given each query's k nearest, "
        'JSON). "merge signature '
        "alone\": the front's signatures called in this process on prepared tensors, no HTTP "
        "or JSON: `merge` on each query's k nearest rows (what the json client sends) / on all "
        "the shards' rows; `merge_packed` on the shards' packed answers (decoding, checks and "
        "merge).",
        "",
        "The two transports' answers bit for bit alike on every output: "
        f"{all(identical.values())} ({', '.join(f'{n}: {v}' for n, v in identical.items())}). "
        f"Agreement with the unsharded SavedModel on {a['queries']} queries: the same "
        f"neighbour ids for {a['rows_with_equal_neighbor_ids']}, and there weights and "
        f"predictions bit-identical: {a['on_equal_rows']['neighbor_weights_bit_identical']}, "
        f"{a['on_equal_rows']['resmem_scores_bit_identical']}. Where they differ (a near-tie at "
        "the k-th neighbour, ordered otherwise by float32 ranking scores), the sharded "
        f"neighbours are as near or nearer by exact distance in "
        f"{a['differing_rows_where_sharded_is_nearer_or_equal']} of "
        f"{a['queries'] - a['rows_with_equal_neighbor_ids']} rows. Largest prediction "
        f"difference {a['resmem_scores_max_abs_diff']:.3g}; the same class for "
        f"{a['class_ids_equal']} queries.",
        "",
    ]
    loader = a.get("sharded_loader")
    if loader:
        lines += [
            "Against the one-process loader of the same shards (`attach_memory(shards=...)`, "
            f"`{loader['search']}`): the same neighbour ids for "
            f"{loader['rows_with_equal_neighbor_ids']} of {a['queries']} queries; weights "
            f"bit-identical: {loader['neighbor_weights_bit_identical']}; predictions "
            f"bit-identical: {loader['resmem_scores_bit_identical']}.",
            "",
        ]
    lines += [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"TensorFlow {m['versions']['tensorflow']}. Server threads: "
        f"{results['server_threads']}. Load average (1, 5, 15 min) before: "
        f"{', '.join(f'{v:.2f}' for v in results['load_average_before'])}; after: "
        f"{', '.join(f'{v:.2f}' for v in results['load_average_after'])} (this benchmark's "
        f"own {results['shards'] + 2} servers and client included). All the servers share "
        "this machine's cores: the shards' searches run side by side on them, as the "
        "unsharded search runs alone.",
    ]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--size", type=int, default=60_000, help="memory entries")
    parser.add_argument("--dim", type=int, default=32, help="--synthetic: key dimensions")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests-1", type=int, default=200, help="per way, batch 1")
    parser.add_argument("--requests-256", type=int, default=30, help="per way, batch 256")
    parser.add_argument("--threads", type=int, default=0, help="per server; 0: TF's default")
    parser.add_argument("--synthetic", action="store_true", help="Gaussian clusters, no data")
    parser.add_argument("--smoke", action="store_true", help="tiny and synthetic: seconds")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "results", "benchmarks"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.shards, args.k, args.rounds = 2000, 2, 10, 2
        args.requests_1, args.requests_256, args.threads = 10, 2, 1
    results = run(args)
    lines = markdown(results)
    _common.write_results(args.output_dir, "shard_serving", results, lines)
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
