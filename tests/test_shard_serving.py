"""A sharded memory served across processes: shard and front SavedModels, servers, the client.

Each server is a real subprocess running `keras_resmem/sharded/tf_server.py`
by its path, with a `PYTHONPATH` whose `keras_resmem` and `keras` fail to
import: the servers load the SavedModels with TensorFlow alone, as
TensorFlow Serving does.
"""

import ast
import base64
import inspect
import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resmem
from keras_resmem import attach as attach_lib
from keras_resmem.memory_writer import MemoryWriter
from keras_resmem.sharded import format as format_lib
from keras_resmem.sharded import serving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "keras_resmem", "sharded", "tf_server.py")
K, SIGMA, TEMPERATURE = 8, 0.5, 1.5
NUM_SHARDS = 3


def _base_model(num_outputs=4):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), name="features")
    h = keras.layers.Dense(8, activation="tanh", name="pre_logits")(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_outputs, name="logits")(h))


def _data(n=600, task="classification"):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = rng.integers(0, 4, n) if task == "classification" else rng.normal(size=(n, 4))
    ids = rng.choice(10**12, n, replace=False).astype(np.int64)  # not positions
    return x, y.astype("float32") if task == "regression" else y, ids


def write_sharded_memory(directory, base, x, y, ids, num_shards, **options):
    """A sharded memory of `base`'s `pre_logits` embeddings, as the Beam pipeline writes one."""
    task = options.get("task", "classification")
    sparse = options.get("sparse_residuals")
    predict = attach_lib._predict_function(base, *attach_lib._key_and_output(base, "pre_logits"))
    # Batches of 256, as `attach_memory` runs the network: the same float32 keys.
    parts = [predict(tf.constant(x[s : s + 256])) for s in range(0, len(x), 256)]
    embeddings = np.concatenate([p[0].numpy() for p in parts])
    scores = np.concatenate([p[1].numpy() for p in parts])
    which = format_lib.shard_of(ids, num_shards)
    ivf = {}
    if options.get("ivf"):  # 4 shared centroids, and each entry's partition
        centroids = embeddings[:4]
        partitions = ((embeddings[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
        ivf = {"index": "ivf", "centroids_digest": format_lib.write_centroids(directory, centroids)}
    entries = []
    for i in range(num_shards):
        writer = MemoryWriter(
            task=task, sparse_residuals=sparse, temperature=TEMPERATURE, from_logits=True
        )
        chosen = which == i
        writer.write(embeddings[chosen], scores[chosen], y[chosen], ids[chosen])
        arrays = writer.finish().arrays
        if ivf:  # the writer keeps the order given; `write_shard` sorts by id
            extra = {"partitions": partitions[chosen], "num_partitions": 4}
        else:
            extra = {}
        entries.append(format_lib.write_shard(directory, i, num_shards, arrays, **extra))
    return format_lib.write_manifest(
        directory,
        entries,
        task=task,
        from_logits=True,
        key_dim=embeddings.shape[1],
        num_outputs=scores.shape[1],
        sparse_residuals=sparse,
        temperature=TEMPERATURE,
        settings={"k": K, "sigma": SIGMA, "temperature": TEMPERATURE},
        **ivf,
    )


def _reference(base, x, y, ids, **options):
    """The one-process memory over the same entries, exact search."""
    return keras_resmem.attach_memory(
        base,
        "pre_logits",
        (x, y),
        ids=ids,
        k=K,
        sigma=SIGMA,
        temperature=TEMPERATURE,
        search="exact",
        verbose=0,
        **options,
    )


def _reference_outputs(model, queries):
    """The one-process model's prediction (as `predict` computes it) and neighbours."""
    memory = model.get_layer("residual_memory")
    prediction = model.predict(queries, batch_size=len(queries), verbose=0)
    network = attach_lib._predict_function(model, *attach_lib._key_and_output(model, "pre_logits"))
    ids, distances, weights = memory.neighbors(network(tf.constant(queries))[0])
    return prediction, ids.numpy(), distances.numpy(), weights.numpy()


@pytest.fixture(scope="module")
def poisoned_path(tmp_path_factory):
    """A PYTHONPATH on which `keras_resmem` and `keras` fail to import."""
    root = tmp_path_factory.mktemp("poison")
    for name in ("keras_resmem", "keras"):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(
            f"raise ImportError('a model server must not import {name}')\n"
        )
    return str(root)


class Servers:
    """`tf_server.py` subprocesses, started together; always terminated."""

    def __init__(self, python_path):
        self.python_path = python_path
        self.processes = []

    def start(self, models, timeout=60):
        """Starts one server per `(name, model_dir)`; returns their model URLs, in order."""
        env = {**os.environ, "PYTHONPATH": self.python_path, "TF_CPP_MIN_LOG_LEVEL": "3"}
        started = []
        for name, model_dir in models:
            command = [sys.executable, SERVER, "--model_dir", model_dir, "--model_name", name]
            command += ["--port", "0", "--intra_op_threads", "1", "--inter_op_threads", "1"]
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            self.processes.append(process)
            started.append(process)
        urls = []
        deadline = time.monotonic() + timeout
        for process in started:
            line = process.stdout.readline()  # blocks until READY, or EOF when it dies
            if not line.startswith("READY "):
                process.kill()
                raise RuntimeError(f"a server failed to start: {process.stderr.read()[-3000:]}")
            urls.append(line.split()[1])
            assert time.monotonic() < deadline
        return urls

    def stop(self):
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for stream in (process.stdout, process.stderr):
                stream.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, poisoned_path):
    """A 3-shard memory served by 3 shard servers and a front server; and its reference."""
    root = tmp_path_factory.mktemp("served")
    base = _base_model()
    x, y, ids = _data()
    manifest = write_sharded_memory(str(root / "memory"), base, x, y, ids, NUM_SHARDS)
    models = [
        (
            "front",
            serving.export_front_saved_model(base, "pre_logits", manifest, root / "front" / "1"),
        )
    ]
    for i in range(NUM_SHARDS):
        path = serving.export_shard_saved_model(manifest, i, root / f"shard_{i}" / "1", k=K)
        models.append((f"shard_{i}", path))
    servers = Servers(poisoned_path)
    try:
        urls = servers.start(models)
        references = {"exact": _reference(base, x, y, ids)}
        if "shards" in inspect.signature(keras_resmem.attach_memory).parameters:
            references["shards"] = keras_resmem.attach_memory(
                base,
                "pre_logits",
                shards=manifest,
                k=K,
                sigma=SIGMA,
                temperature=TEMPERATURE,
                verbose=0,
            )
        yield {"urls": urls, "references": references, "manifest": manifest}
    finally:
        servers.stop()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (a) A shard SavedModel in a TensorFlow-only process.

CHILD = """
import json, sys
import numpy as np
import tensorflow as tf

path, queries_path, out_path = sys.argv[1:]
serve = tf.saved_model.load(path).signatures["serving_default"]
out = serve(keys=tf.constant(np.load(queries_path)))
np.savez(out_path, **{name: value.numpy() for name, value in out.items()})
assert "keras_resmem" not in sys.modules and "keras" not in sys.modules, sorted(sys.modules)
print(json.dumps(sorted(out)))
"""


def test_a_shard_saved_model_answers_its_exact_search_in_a_tensorflow_only_process(
    tmp_path, poisoned_path
):
    base = _base_model()
    x, y, ids = _data()
    manifest = format_lib.read_manifest(
        write_sharded_memory(str(tmp_path / "memory"), base, x, y, ids, NUM_SHARDS)
    )
    path = serving.export_shard_saved_model(manifest, 1, tmp_path / "shard_1", k=K)
    queries = np.random.default_rng(1).normal(size=(20, 8)).astype("float32")
    queries[5] = np.inf
    np.save(tmp_path / "queries.npy", queries)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, path, str(tmp_path / "queries.npy"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": poisoned_path, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        "distances", "memory_digest", "neighbor_ids", "neighbor_scores", "num_shards",
        "shard_index", "targets",
    ]  # fmt: skip
    out = np.load(tmp_path / "out.npz")
    shard = format_lib.read_shard(manifest, 1)
    # The shard's exact search, in NumPy (float64).
    keys = shard["keys"].astype(np.float64)
    searched = np.where(np.isfinite(queries).all(1, keepdims=True), queries, 0.0)
    full = np.sqrt(((searched[:, None, :] - keys[None]) ** 2).sum(-1))
    order = np.argsort(full, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(out["neighbor_ids"], shard["memory_ids"][order])
    want = np.take_along_axis(full, order, 1)
    want[5] = np.nan  # a query that is not finite
    np.testing.assert_allclose(out["distances"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["targets"], shard["memory_targets"][order])
    np.testing.assert_array_equal(out["neighbor_scores"], shard["memory_scores"][order])
    assert int(out["shard_index"]) == 1 and int(out["num_shards"]) == NUM_SHARDS
    assert out["memory_digest"].item().decode() == serving.memory_digest(manifest)


# (b) End to end: shard servers, a front server, the client.


@pytest.mark.parametrize("transport", ["packed", "json"])
def test_the_client_predicts_as_the_one_process_memory(served, transport):
    front, *shards = served["urls"]
    queries = np.random.default_rng(2).normal(size=(40, 6)).astype("float32")
    queries[7] = np.nan
    with serving.ShardedClient(front, shards[::-1], timeout=30, transport=transport) as client:
        timings = {}
        out = client.predict(queries, timings=timings)
        single = client.predict(queries[:1])
        # Per-request k (`search` / `search_packed`): more rows per shard, the same answer.
        wide = serving.ShardedClient(front, shards, shard_k=K + 3, transport=transport)
        with wide:
            np.testing.assert_array_equal(
                wide.predict(queries)["resmem_scores"], out["resmem_scores"]
            )
    ok = np.arange(len(queries)) != 7
    # The one-process memory over the same entries (`data`), and, once it
    # exists, the one-process loader of the same shards (`shards=`).
    for reference in served["references"].values():
        prediction, ids, distances, weights = _reference_outputs(reference, queries)
        # Bit for bit: the same neighbours, distances, weights and prediction.
        np.testing.assert_array_equal(out["neighbor_ids"][ok], ids[ok])
        np.testing.assert_array_equal(out["neighbor_distances"][ok], distances[ok])
        np.testing.assert_array_equal(out["neighbor_weights"][ok], weights[ok])
        np.testing.assert_array_equal(out["resmem_scores"], prediction)  # row 7: NaN in both
        np.testing.assert_array_equal(out["class_ids"], np.where(ok, prediction.argmax(-1), -1))
        np.testing.assert_array_equal(single["resmem_scores"], prediction[:1])
    assert np.isnan(out["resmem_scores"][7]).all() and np.isnan(out["neighbor_weights"][7]).all()
    assert out["resmem_scores"].dtype == np.float32 and out["neighbor_ids"].dtype == np.int64
    assert out["neighbor_ids"].shape == (40, K) and out["deepnet_scores"].shape == (40, 4)
    assert out["deepnet_scores"].dtype == np.float32
    assert set(timings) == {"features", "shards", "merge", "total"}


def test_the_packed_and_json_transports_answer_bit_for_bit_alike(served):
    front, *shards = served["urls"]
    queries = np.random.default_rng(6).normal(size=(64, 6)).astype("float32")
    queries[3, 2] = np.inf  # NaN scores; a finite key (tanh): its neighbours are the key's
    queries[9, 0] = np.nan  # a NaN key
    outs = {}
    for transport in serving.TRANSPORTS:
        with serving.ShardedClient(front, shards, transport=transport) as client:
            outs[transport] = client.predict(queries)
    assert sorted(outs["packed"]) == sorted(outs["json"])
    for name, value in outs["packed"].items():
        assert value.dtype == outs["json"][name].dtype, name
        # Bit for bit, NaN included: the bytes are equal.
        assert value.tobytes() == outs["json"][name].tobytes(), name
    assert np.isnan(outs["packed"]["resmem_scores"][[3, 9]]).all()
    _, ids, _, _ = _reference_outputs(served["references"]["exact"], queries)
    ok = np.arange(len(queries)) != 9
    np.testing.assert_array_equal(outs["packed"]["neighbor_ids"][ok], ids[ok])


def _packed_request(front, shards, queries):
    """`merge_packed`'s inputs for `queries`, as `ShardedClient` forwards them: base64 objects."""
    features = serving.RestModel(front).predict_json({"features": queries}, "features_packed")
    body = serving.encode_request({"keys_bytes": features["keys_bytes"]}, "packed")
    answers = [serving.RestModel(url).predict_json(None, body=body) for url in shards]
    assert [a["shard_index"] for a in answers] == list(range(NUM_SHARDS))
    return features["scores_bytes"], [a["answer_bytes"] for a in answers]


def _tampered(answer, part=None, value=None, parts=None):
    """A shard's `answer_bytes` (`{"b64": ...}`) with part `part` replaced by `value` (packed)."""
    packed = list(serving.unpack_tensor(answer))
    if part is not None:
        packed[part] = serving.pack_tensor(value)
    if parts is not None:
        packed = packed[:parts]
    return serving.pack_tensor(np.array(packed, object))


def test_a_tampered_packed_answer_fails_the_merge_request_and_the_front_keeps_serving(served):
    front_url, *shards = served["urls"]
    front = serving.RestModel(front_url)
    queries = np.random.default_rng(7).normal(size=(5, 6)).astype("float32")
    scores, answers = _packed_request(front_url, shards, queries)
    good = front.predict({"scores_bytes": scores, "answers_bytes": answers}, "merge_packed")
    with serving.ShardedClient(front_url, shards) as client:
        want = client.predict(queries)
    for name in good:
        np.testing.assert_array_equal(good[name], want[name])
    # `merge_packed_bytes` (the client's): the same outputs, each packed.
    packed = front.predict({"scores_bytes": scores, "answers_bytes": answers}, "merge_packed_bytes")
    assert sorted(packed) == sorted(f"{name}_bytes" for name in good)
    for name in good:
        assert serving.unpack_tensor(packed[f"{name}_bytes"]).tobytes() == good[name].tobytes()
    # The shard's parts: neighbor_ids, distances, targets, neighbor_scores.
    ids, distances, targets, rows = map(serving.unpack_tensor, serving.unpack_tensor(answers[1]))
    assert ids.dtype == np.int64 and distances.shape == (5, K) and rows.shape == (5, K, 4)
    shapes = r"must hold `neighbor_ids` int64 \(batch, k\), .* received shapes\]"
    bad_cases = [
        # Bytes that are no serialized tensor: TensorFlow's ParseTensor message.
        (1, b"\x00garbage\xff" * 3, "Could not parse `serialized` as TensorProto"),
        (2, b"\x00garbage\xff" * 30000, "Could not parse"),  # its message quotes it: cut
        (1, _tampered(answers[1], 0, ids.astype(np.int32)), r"parsed tensor \(int32\)"),
        (2, _tampered(answers[2], 3, rows.astype(np.float64)), r"Type mismatch.*\(double\)"),
        # A wrong rank or trailing size: the shard, and the shapes received.
        (0, _tampered(answers[0], 1, distances[0]), rf"shard 0 .*{shapes} \[5 8\] \[8\]"),
        (0, _tampered(answers[0], 3, rows[..., :3]), rf"{shapes} .* \[5 8 3\]"),
        # Rows of unequal (batch, k), or of another batch than the scores'.
        (1, _tampered(answers[1], 1, distances[:, :-1]), rf"{shapes} \[5 8\] \[5 7\]"),
        (2, _tampered(answers[2], 0, ids[:4]), rf"shard 2 .*{shapes} \[4 8\] \[5 8\]"),
        # Too few parts; a shard's answer that is not a list of parts at all.
        (1, _tampered(answers[1], parts=3), r"`answers_bytes\[1\]`\) must be a .* shape \(4,\)"),
        (1, serving.pack_tensor(distances), "Type mismatch"),
    ]
    for shard, bad, message in bad_cases:
        tampered = list(answers)
        tampered[shard] = serving._b64(bad)
        with pytest.raises(serving.ServingError, match=f"(?s)HTTP 400.*{message}") as info:
            front.predict_json({"scores_bytes": scores, "answers_bytes": tampered}, "merge_packed")
        assert info.value.status == 400 and len(str(info.value)) < 2200
    # The whole input of another batch; too few shards; bad scores; bad base64.
    other_scores, _ = _packed_request(front_url, shards, queries[:3])
    mixed = {"scores_bytes": other_scores, "answers_bytes": answers}
    with pytest.raises(
        serving.ServingError, match=r"(?s)batch being that of.*\[5 8\].*batch of the scores\] \[3\]"
    ):
        front.predict_json(mixed, "merge_packed")
    with pytest.raises(
        serving.ServingError,
        match=rf"one `answer_bytes` per shard \({NUM_SHARDS}\).*received shape\] \[2\]",
    ):
        front.predict_json({"scores_bytes": scores, "answers_bytes": answers[:2]}, "merge_packed")
    bad_scores = serving.pack_tensor(np.zeros((5, 3), np.float32))
    with pytest.raises(serving.ServingError, match="`scores_bytes` must be a serialized float32"):
        front.predict_json({"scores_bytes": bad_scores, "answers_bytes": answers}, "merge_packed")
    with pytest.raises(serving.ServingError, match="HTTP 400.*Unable to base64 decode"):
        front.predict_json(
            {"scores_bytes": {"b64": "%%%"}, "answers_bytes": answers}, "merge_packed"
        )
    # The front (and every shard) serves on, the same answers.
    again = front.predict({"scores_bytes": scores, "answers_bytes": answers}, "merge_packed")
    for name in good:
        np.testing.assert_array_equal(again[name], good[name])
    # A shard given keys that are no serialized float32 (batch, key_dim) refuses them.
    shard = serving.RestModel(shards[0])
    for bad_keys, message in [
        (serving.pack_tensor(np.zeros((2, 5), np.float32)), "`keys_bytes` must be a serialized"),
        (serving.pack_tensor(np.zeros((2, 8), np.float64)), "Type mismatch"),
    ]:
        with pytest.raises(serving.ServingError, match=f"(?s)HTTP 400.*{message}"):
            shard.predict({"keys_bytes": bad_keys}, "packed")


def test_the_server_speaks_tensorflow_servings_b64_and_bytes_conventions(served):
    """`*_bytes` string outputs as `{"b64": ...}`, other strings as text; b64 inputs."""
    shard = serving.RestModel(served["urls"][1])
    keys = np.random.default_rng(8).normal(size=(2, 8)).astype("float32")
    packed = serving.pack_tensor(keys)
    body = json.dumps(
        {"signature_name": "packed", "inputs": {"keys_bytes": {"b64": serving._b64(packed)["b64"]}}}
    ).encode()
    status, data = shard._request("POST", shard._predict_path, body)
    assert status == 200
    outputs = json.loads(data)["outputs"]
    assert set(outputs["answer_bytes"]) == {"b64"}  # one bytes scalar
    assert isinstance(outputs["memory_digest"], str) and len(outputs["memory_digest"]) == 64
    parts = serving.unpack_tensor(outputs["answer_bytes"])
    assert parts.dtype == object and parts.shape == (4,)
    fixed = shard.predict({"keys": keys})
    np.testing.assert_array_equal(serving.unpack_tensor(parts[0]), fixed["neighbor_ids"])
    np.testing.assert_array_equal(serving.unpack_tensor(parts[1]), fixed["distances"])
    # `predict` gives a `*_bytes` output as bytes; base64 without padding is read too.
    assert shard.predict({"keys_bytes": packed}, "packed")["answer_bytes"] == base64.b64decode(
        outputs["answer_bytes"]["b64"]
    )
    unpadded = {"keys_bytes": {"b64": serving._b64(packed)["b64"].rstrip("=")}}
    assert shard.predict_json(unpadded, "packed")["answer_bytes"] == outputs["answer_bytes"]
    # The single input of a signature may be given bare; a b64 object to a float input fails.
    bare = {"signature_name": "packed", "inputs": serving._b64(packed)}
    status, data = shard._request("POST", shard._predict_path, json.dumps(bare).encode())
    assert status == 200 and json.loads(data)["outputs"]["answer_bytes"] == outputs["answer_bytes"]
    with pytest.raises(serving.ServingError, match="HTTP 400.*'keys'"):
        shard.predict_json({"keys": [[{"b64": "AAAA"}] * 8]})
    with pytest.raises(serving.ServingError, match="HTTP 400.*base64"):
        shard.predict_json({"keys_bytes": {"b64": "AAAA", "other": 1}}, "packed")


def test_the_client_refuses_a_missing_repeated_or_foreign_shard(served, tmp_path):
    front, *shards = served["urls"]
    queries = np.zeros((2, 6), "float32")
    with pytest.raises(serving.ServingError, match="with 2 shard URLs given"):
        serving.ShardedClient(front, shards[:2]).predict(queries)
    with pytest.raises(ValueError, match="must not repeat"):
        serving.ShardedClient(front, [shards[0], shards[0], shards[1]])
    # The front is no shard: it refuses the request, and the error names it.
    with pytest.raises(serving.ServingError, match=f"{front} answered HTTP 400"):
        serving.ShardedClient(front, [*shards[:2], front]).predict(queries)
    # An unknown model name: the server's 404, with its URL.
    wrong = shards[0].rsplit("/", 1)[0] + "/nope"
    with pytest.raises(serving.ServingError, match=f"{wrong} answered HTTP 404"):
        serving.RestModel(wrong).predict({"keys": np.zeros((1, 8))})
    # JSON lists in; and a bad input, named by the server.
    answer = serving.RestModel(shards[0]).predict_json({"keys": [[0.0] * 8]})
    assert len(answer["neighbor_ids"][0]) == K
    # The row format cannot carry a shard's scalar outputs: the server says so.
    status, body = serving.RestModel(shards[0])._request(
        "POST", "/v1/models/shard_0:predict", b'{"instances": [[0,0,0,0,0,0,0,0]]}'
    )
    assert status == 400 and b"columnar" in body
    with pytest.raises(serving.ServingError, match="HTTP 400.*'keys'"):
        serving.RestModel(shards[0]).predict({"keys": np.zeros((1, 5))})


def test_per_request_k_of_a_shard(served):
    shard = serving.RestModel(served["urls"][1])
    keys = np.random.default_rng(3).normal(size=(3, 8)).astype("float32")
    fixed = shard.predict({"keys": keys})
    three = shard.predict({"keys": keys, "k": 3}, signature_name="search")
    np.testing.assert_array_equal(three["neighbor_ids"], fixed["neighbor_ids"][:, :3])
    np.testing.assert_array_equal(three["distances"], fixed["distances"][:, :3])
    huge = shard.predict({"keys": keys, "k": 10**6}, signature_name="search")
    size = format_lib.read_manifest(served["manifest"]).shards[0]["size"]
    assert huge["neighbor_ids"].shape == (3, size)  # at most the shard
    with pytest.raises(serving.ServingError, match="(?s)HTTP 400.*`k` must be a positive integer"):
        shard.predict({"keys": keys, "k": 0}, signature_name="search")


# (c) A shard server that is down, or hung: a clear error naming it, soon.


def test_a_dead_or_hung_shard_server_fails_fast_naming_its_url(served):
    front, *shards = served["urls"]
    queries = np.zeros((2, 6), "float32")
    dead = f"http://127.0.0.1:{_free_port()}/v1/models/shard_2"
    start = time.monotonic()
    with pytest.raises(serving.ServingError, match=f"{dead} cannot be reached"):
        serving.ShardedClient(front, [*shards[:2], dead], timeout=2).predict(queries)
    assert time.monotonic() - start < 10
    # Listening, but never answering: the timeout ends the wait.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/v1/models/shard_2"
        start = time.monotonic()
        with pytest.raises(serving.ServingError, match=f"{url} did not answer within 1.0 s"):
            serving.ShardedClient(front, [*shards[:2], url], timeout=1).predict(queries)
        assert time.monotonic() - start < 10


# In one process: sparse residuals, regression, the baselines, non-finite rows.


class _JsonShard:
    """A shard SavedModel called in this process, its answer through JSON as a server sends it."""

    def __init__(self, path):
        self.url = path
        self.serve = tf.saved_model.load(path).signatures["serving_default"]

    def predict_json(self, inputs, signature_name="serving_default", body=None):
        keys = json.loads(body)["inputs"]["keys"]
        out = self.serve(keys=tf.constant(keys, tf.float32))
        fields = []
        for name, value in out.items():
            value = value.numpy()
            text = json.dumps(value.decode()) if name == "memory_digest" else None
            fields.append(f"{json.dumps(name)}:{text or serving.json_text(value)}")
        return json.loads("{" + ",".join(fields) + "}")


def _serve_in_process(front_path, shard_paths, queries, client_path):
    """The client's three steps, with the SavedModels loaded here.

    With `client_path`, the shards' answers go through JSON and the client's
    selection of each query's k nearest rows; else `merge` gets them all.
    """
    front = tf.saved_model.load(front_path)
    features = front.signatures["features"](features=tf.constant(queries))
    if client_path:
        body = serving.encode_request({"keys": features["keys"]})
        answers = [serving.ShardedClient._ask_shard(_JsonShard(p), body) for p in shard_paths]
        for answer in answers:
            for name in serving._IDENTITY:
                answer.pop(name)
        rows = serving.ShardedClient._nearest(answers, int(features["k"]))
        assert rows["distances"].shape[1] == int(features["k"])
    else:
        answers = []
        for path in shard_paths:
            answer = tf.saved_model.load(path).signatures["serving_default"](keys=features["keys"])
            answers.append({n: v for n, v in answer.items() if n not in serving._IDENTITY})
        rows = {n: tf.concat([a[n] for a in answers], axis=1) for n in answers[0]}
    out = front.signatures["merge"](scores=features["scores"], **rows)
    return {name: value.numpy() for name, value in out.items()}


def _serve_packed_in_process(front_path, shard_paths, queries):
    """The packed signatures' three steps, with the SavedModels loaded here."""
    front = tf.saved_model.load(front_path)
    features = front.signatures["features_packed"](features=tf.constant(queries))
    answers = [
        tf.saved_model.load(path).signatures["packed"](keys_bytes=features["keys_bytes"])
        for path in shard_paths
    ]
    out = front.signatures["merge_packed"](
        scores_bytes=features["scores_bytes"],
        answers_bytes=tf.stack([answer["answer_bytes"] for answer in answers]),
    )
    return {name: value.numpy() for name, value in out.items()}


@pytest.mark.parametrize(
    "options, front_options",
    [
        ({"sparse_residuals": 2}, {}),
        ({"task": "regression"}, {"method": "knn"}),
        ({}, {"method": "interpolation", "knn_weight": 0.3, "k": 5, "sigma": 0.2}),
    ],
    ids=["sparse", "regression_knn", "interpolation"],
)
def test_served_saved_models_predict_as_the_one_process_memory(tmp_path, options, front_options):
    task = options.get("task", "classification")
    base = _base_model()
    x, y, ids = _data(400, task)
    manifest = write_sharded_memory(str(tmp_path / "memory"), base, x, y, ids, 2, **options)
    front = serving.export_front_saved_model(
        base, "pre_logits", manifest, tmp_path / "front", **front_options
    )
    shards = [
        serving.export_shard_saved_model(manifest, i, tmp_path / f"s{i}", k=K) for i in (0, 1)
    ]
    queries = np.random.default_rng(4).normal(size=(16, 6)).astype("float32")
    queries[2, 0] = np.inf
    settings = {"k": K, "sigma": SIGMA, **front_options}
    reference = _reference(base, x, y, ids, **options)
    memory = reference.get_layer("residual_memory")
    for name, value in settings.items():
        setattr(memory, name, value)
    prediction, want_ids, _, weights = _reference_outputs(reference, queries)
    ok = np.arange(len(queries)) != 2
    for way in ("all_rows", "client_path", "packed"):
        if way == "packed":
            out = _serve_packed_in_process(front, shards, queries)
        else:
            out = _serve_in_process(front, shards, queries, way == "client_path")
        np.testing.assert_array_equal(out["neighbor_ids"][ok], want_ids[ok])
        np.testing.assert_array_equal(out["neighbor_weights"][ok], weights[ok])
        np.testing.assert_array_equal(out["resmem_scores"], prediction)
        assert np.isnan(out["resmem_scores"][2]).all()
        if task == "classification":
            assert out["class_ids"][2] == -1 and (out["class_ids"][ok] >= 0).all()
        else:
            assert "class_ids" not in out


def test_the_shards_of_an_ivf_memory_are_searched_exactly(tmp_path):
    base = _base_model()
    x, y, ids = _data(300)
    manifest = write_sharded_memory(str(tmp_path / "memory"), base, x, y, ids, 2, ivf=True)
    assert format_lib.read_manifest(manifest).index == "ivf"
    path = serving.export_shard_saved_model(manifest, 0, tmp_path / "s0", k=K)
    shard = format_lib.read_shard(format_lib.read_manifest(manifest), 0)
    queries = np.random.default_rng(5).normal(size=(10, 8)).astype("float32")
    out = tf.saved_model.load(path).signatures["serving_default"](keys=tf.constant(queries))
    full = ((queries[:, None, :].astype(np.float64) - shard["keys"][None]) ** 2).sum(-1)
    order = np.argsort(full, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(out["neighbor_ids"].numpy(), shard["memory_ids"][order])


# (d) Bad arguments.


def test_bad_arguments_name_the_argument(tmp_path):
    base = _base_model()
    x, y, ids = _data(100)
    manifest = write_sharded_memory(str(tmp_path / "memory"), base, x, y, ids, 2)
    for bad in (2, -1, 1.0, True):
        with pytest.raises(ValueError, match=rf"`shard_index`.*Received: shard_index={bad!r}"):
            serving.export_shard_saved_model(manifest, bad, tmp_path / "s", k=4)
    for bad in (0, 101):
        with pytest.raises(ValueError, match=rf"`k`.*Received: k={bad}"):
            serving.export_shard_saved_model(manifest, 0, tmp_path / "s", k=bad)
        with pytest.raises(ValueError, match=rf"`k`.*Received: k={bad}"):
            serving.export_front_saved_model(base, "pre_logits", manifest, tmp_path / "f", k=bad)
    bad_settings = [
        ({"sigma": -1.0}, "sigma"),
        ({"method": "vote"}, "method"),
        ({"knn_weight": 2.0}, "knn_weight"),
    ]
    for settings, name in bad_settings:
        with pytest.raises(ValueError, match=f"`{name}`"):
            serving.export_front_saved_model(
                base, "pre_logits", manifest, tmp_path / "f", **settings
            )
    with pytest.raises(ValueError, match="layer_name='logits'"):
        serving.export_front_saved_model(base, "logits", manifest, tmp_path / "f")
    with pytest.raises(ValueError, match="manifest_or_path"):
        serving.export_shard_saved_model(42, 0, tmp_path / "s", k=4)
    with pytest.raises(FileNotFoundError):
        serving.export_shard_saved_model(tmp_path / "nowhere", 0, tmp_path / "s", k=4)
    with pytest.raises(ValueError, match="`shard_urls`"):
        serving.ShardedClient("http://localhost:1/v1/models/front", [])
    with pytest.raises(ValueError, match="`transport`"):
        serving.ShardedClient("http://h:1/v1/models/f", ["http://h:2/v1/models/s"], transport="x")
    with pytest.raises(ValueError, match="`url`"):
        serving.RestModel("localhost:8501")
    with pytest.raises(ValueError, match="`timeout`"):
        serving.RestModel("http://localhost:1/v1/models/m", timeout=0)
    # Nothing was written.
    assert not os.path.exists(tmp_path / "s") and not os.path.exists(tmp_path / "f")
    path = serving.export_shard_saved_model(manifest, 0, tmp_path / "s", k=4)
    with pytest.raises(FileExistsError):
        serving.export_shard_saved_model(manifest, 0, path, k=4)


def test_the_server_script_imports_only_the_standard_library_numpy_and_tensorflow():
    with open(SERVER) as f:
        tree = ast.parse(f.read())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"numpy", "tensorflow"}
    assert modules <= allowed, modules - allowed


# The benchmark, tiny.


def test_the_benchmark_runs_in_smoke_mode(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import shard_serving
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    results = shard_serving.main(["--smoke", "--output-dir", str(tmp_path)])
    assert (tmp_path / "shard_serving.json").exists() and (tmp_path / "shard_serving.md").exists()
    for batch in ("1", "256"):
        row = results["latency_ms"][batch]
        assert row["unsharded"]["median"] > 0
        for transport in serving.TRANSPORTS:
            assert row["sharded"][transport]["median"] > 0
            assert set(row["client_stages"][transport]) == {"features", "shards", "merge"}
        assert set(row["merge_signature_in_process"]) == {
            "merge_k_rows", "merge_all_rows", "merge_packed",
        }  # fmt: skip
        sizes = results["bytes"][batch]
        assert sizes["packed"]["shard_answer"] < sizes["json"]["shard_answer"]
    agreement = results["agreement"]
    assert all(agreement["transports_bit_identical"].values())
    assert agreement["rows_with_equal_neighbor_ids"] == agreement["queries"] == 512
    assert agreement["on_equal_rows"]["resmem_scores_bit_identical"]
