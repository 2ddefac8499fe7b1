"""Sharded memories: the files (`keras_resmem.sharded.format`) and one process serving them.

`attach_memory(base, layer, shards=...)` must answer exactly as
`attach_memory(base, layer, data)` over the same entries; every file of a
sharded memory is untrusted input.
"""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resmem
from keras_resmem.attach import _key_and_output, _predict_function
from keras_resmem.memory_writer import MemoryWriter
from keras_resmem.search.ivf import resolve_ivf_options, train_ivf
from keras_resmem.sharded import format as format_lib

K = 12


def _base(width=16):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), name="features")
    h = keras.layers.Dense(width, activation="tanh", name="pre_logits")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4)(h))


def _data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = rng.integers(0, 4, n)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)  # not positions
    return x, y, ids


def _write_shards(directory, base, x, y, ids, num_shards, *, ivf_partitions=None, **settings):
    """A sharded memory of `base`'s entries, written as the Beam pipeline writes one."""
    embedding, output = _key_and_output(base, "pre_logits")
    keys, scores = (t.numpy() for t in _predict_function(base, embedding, output)(x))
    partitions = centroids = digest = None
    if ivf_partitions:
        options = resolve_ivf_options(len(keys), {"num_partitions": ivf_partitions})
        centroids = train_ivf(keys[:1000], options)[0]  # trained once, on a sample
        digest = format_lib.write_centroids(directory, centroids)
        partitions = keras_resmem.search.base.nearest_centroids(keys, centroids)
    shard = format_lib.shard_of(ids, num_shards)
    infos = []
    for s in range(num_shards):
        rows = shard == s
        writer = MemoryWriter(task="classification", num_outputs=4, **settings)
        writer.write(keys[rows], scores[rows], y[rows], ids[rows])
        infos.append(
            format_lib.write_shard(
                directory,
                s,
                num_shards,
                writer.finish().arrays,
                partitions=None if partitions is None else partitions[rows],
                num_partitions=ivf_partitions,
            )
        )
    return format_lib.write_manifest(
        directory,
        infos,
        task="classification",
        from_logits=True,
        key_dim=keys.shape[1],
        num_outputs=4,
        index="ivf" if ivf_partitions else "exact",
        centroids_digest=digest,
        settings={"num_probes": 3} if ivf_partitions else {},
        **settings,
    )


def _answers(model, queries):
    memory = model.get_layer("residual_memory")
    embedding, scores = keras.Model(model.inputs, list(memory.input))({"features": queries})
    return [t.numpy() for t in memory([embedding, scores], return_neighbors=True)]


def test_shard_of_is_a_fixed_balanced_hash_of_the_id():
    ids = np.arange(100_000)
    shards = format_lib.shard_of(ids, 8)
    counts = np.bincount(shards, minlength=8)
    assert counts.min() > 0.97 * 100_000 / 8
    # Fixed: the same ids give the same shards in any order or batch.
    order = np.random.default_rng(0).permutation(len(ids))
    np.testing.assert_array_equal(format_lib.shard_of(ids[order], 8), shards[order])
    np.testing.assert_array_equal(format_lib.shard_of([5, 77], 8), shards[[5, 77]])


def test_a_shard_written_twice_in_any_order_is_the_same_bytes(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "keys": rng.normal(size=(50, 4)).astype("float32"),
        "memory_scores": rng.normal(size=(50, 3)).astype("float32"),
        "memory_targets": rng.integers(0, 3, 50).astype("int32"),
        "memory_ids": rng.permutation(1000)[:50].astype("int64"),
    }
    first = format_lib.write_shard(tmp_path, 1, 2, arrays)
    path = tmp_path / first["name"]
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}
    order = rng.permutation(50)
    again = format_lib.write_shard(tmp_path, 1, 2, {k: v[order] for k, v in arrays.items()})
    assert again == first
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before
    assert sorted(os.listdir(tmp_path)) == [first["name"]]  # no temporary left


def test_one_process_serves_shards_exactly_as_one_memory(tmp_path):
    base = _base()
    x, y, ids = _data()
    manifest = _write_shards(tmp_path / "memory", base, x, y, ids, 4)
    sharded = keras_resmem.attach_memory(base, "pre_logits", shards=manifest, k=K, verbose=0)
    single = keras_resmem.attach_memory(
        base, "pre_logits", (x, y), ids=ids, k=K, search="exact", verbose=0
    )
    memory = sharded.get_layer("residual_memory")
    assert memory.search_backend == "sharded" and memory.search.num_shards == 4
    assert memory.memory_size == len(x)
    queries = np.random.default_rng(1).normal(size=(300, 6)).astype("float32")
    got, want = _answers(sharded, queries), _answers(single, queries)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)  # predictions, neighbour ids, weights: bit for bit

    # Saved and loaded as any memory, and exported for stock serving.
    path = str(tmp_path / "sharded.keras")
    keras_resmem.save_model(sharded, path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("residual_memory").search.shard_sizes == memory.search.shard_sizes
    np.testing.assert_array_equal(
        loaded.predict(queries, verbose=0), sharded.predict(queries, verbose=0)
    )
    export = keras_resmem.export_saved_model(sharded, str(tmp_path / "export"))
    served = tf.saved_model.load(export).signatures["serving_default"](
        features=tf.constant(queries)
    )
    np.testing.assert_array_equal(served["neighbor_ids"].numpy(), want[1])
    np.testing.assert_allclose(served["resmem_scores"].numpy(), want[0], atol=1e-6)


def test_shards_shrink_and_grow_and_a_shard_smaller_than_k_still_counts(tmp_path):
    base = _base()
    x, y, ids = _data(400)
    manifest = _write_shards(tmp_path, base, x, y, ids, 3)
    model = keras_resmem.attach_memory(base, "pre_logits", shards=manifest, k=K, verbose=0)
    memory = model.get_layer("residual_memory")
    sizes = memory.search.shard_sizes
    # Forget all but 5 entries of shard 0: fewer than k, yet searched.
    in_first = np.sort(ids[format_lib.shard_of(ids, 3) == 0])
    keras_resmem.forget(model, in_first[5:])
    assert memory.search.shard_sizes == [5, sizes[1], sizes[2]]
    keras_resmem.add_examples(model, (x[:7], y[:7]), ids=np.arange(10**6, 10**6 + 7), verbose=0)
    assert memory.search.shard_sizes == [5, sizes[1], sizes[2] + 7]
    queries = np.random.default_rng(2).normal(size=(64, 6)).astype("float32")
    embedding, _ = keras.Model(model.inputs, list(memory.input))({"features": queries})
    found, distances, _ = memory.neighbors(embedding)
    keys = memory.keys.numpy()
    truth = np.sort(np.linalg.norm(embedding.numpy()[:, None] - keys[None], axis=-1), axis=1)[:, :K]
    np.testing.assert_allclose(distances.numpy(), truth, rtol=1e-5, atol=1e-6)


def test_shared_ivf_centroids_probe_the_same_partitions_of_every_shard(tmp_path):
    base = _base()
    x, y, ids = _data()
    manifest = _write_shards(tmp_path, base, x, y, ids, 3, ivf_partitions=16)
    model = keras_resmem.attach_memory(base, "pre_logits", shards=manifest, k=K, verbose=0)
    memory = model.get_layer("residual_memory")
    assert memory.search_backend == "ivf" and memory.num_probes == 3
    centroids = np.load(tmp_path / "centroids.npy")
    np.testing.assert_array_equal(memory.search.centroids.numpy(), centroids)  # not retrained
    # A NumPy reference: the 3 nearest centroids' partitions, searched exactly.
    queries = np.random.default_rng(3).normal(size=(100, 6)).astype("float32")
    embedding, _ = keras.Model(model.inputs, list(memory.input))({"features": queries})
    q = embedding.numpy()
    keys, held = memory.keys.numpy(), memory.entry_ids()
    owner = np.argmin(np.linalg.norm(keys[:, None] - centroids[None], axis=-1), axis=1)
    probed = np.argsort(np.linalg.norm(q[:, None] - centroids[None], axis=-1), axis=1)[:, :3]
    found = memory.neighbors(q)[0].numpy()
    for row in range(len(q)):
        candidates = np.flatnonzero(np.isin(owner, probed[row]))
        d = np.linalg.norm(keys[candidates] - q[row], axis=-1)
        want = held[candidates[np.argsort(d, kind="stable")[:K]]]
        assert set(found[row]) == set(want)


def test_sparse_residuals_come_from_the_manifest(tmp_path):
    base = _base()
    x, y, ids = _data(500)
    manifest = _write_shards(tmp_path, base, x, y, ids, 2, sparse_residuals=2, temperature=2.0)
    model = keras_resmem.attach_memory(
        base, "pre_logits", shards=manifest, k=K, temperature=2.0, verbose=0
    )
    single = keras_resmem.attach_memory(
        base, "pre_logits", (x, y), ids=ids, k=K, search="exact", sparse_residuals=2,
        temperature=2.0, verbose=0,
    )  # fmt: skip
    assert model.get_layer("residual_memory").sparse_residuals == 2
    np.testing.assert_array_equal(
        model.predict(x[:50], verbose=0), single.predict(x[:50], verbose=0)
    )
    with pytest.raises(ValueError, match="temperature=2.0"):
        keras_resmem.attach_memory(base, "pre_logits", shards=manifest, temperature=1.0)


def test_bad_shards_arguments_name_the_problem(tmp_path):
    base = _base()
    x, y, ids = _data(300)
    manifest = _write_shards(tmp_path, base, x, y, ids, 2)
    with pytest.raises(ValueError, match="not both"):
        keras_resmem.attach_memory(base, "pre_logits", (x, y), shards=manifest)
    with pytest.raises(ValueError, match="from_logits=True"):
        keras_resmem.attach_memory(base, "pre_logits", shards=manifest, from_logits=False)
    with pytest.raises(ValueError, match="holds keys of 16 features"):
        keras_resmem.attach_memory(_base(width=8), "pre_logits", shards=manifest, verbose=0)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        keras_resmem.attach_memory(base, "pre_logits", shards=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="shard_sizes"):
        keras_resmem.search.Sharded([])
    with pytest.raises(ValueError, match="shard_sizes"):
        keras_resmem.search.Sharded([3, -1])


def _edit_manifest(directory, edit):
    path = os.path.join(directory, "manifest.json")
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _flip_last_byte(path):
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x01
    open(path, "wb").write(bytes(data))


def _swap_rows(path):
    array = np.load(path)
    np.save(path, array[::-1].copy())


def _pickled(path):
    np.save(path, np.array([{"a": 1}] * len(np.load(path)), dtype=object), allow_pickle=True)


def _wrong_shape(path):
    np.save(path, np.load(path)[:-1])


SHARD0 = "shard-00000-of-00002"
TAMPERING = {
    "a flipped byte": (lambda d: _flip_last_byte(os.path.join(d, SHARD0, "keys.npy")), "SHA-256"),
    "reordered rows": (lambda d: _swap_rows(os.path.join(d, SHARD0, "memory_ids.npy")), "SHA-256"),
    "a pickle": (lambda d: _pickled(os.path.join(d, SHARD0, "memory_targets.npy")), "objects"),
    "a short array": (lambda d: _wrong_shape(os.path.join(d, SHARD0, "keys.npy")), "holds"),
    "a missing file": (lambda d: os.remove(os.path.join(d, SHARD0, "keys.npy")), "missing"),
    "a missing shard": (lambda d: shutil.rmtree(os.path.join(d, SHARD0)), "cannot be read"),
    "a path outside": (
        lambda d: _edit_manifest(d, lambda m: m["shards"][0].update(name="../../etc")),
        "named",
    ),
    "a wrong size": (
        lambda d: _edit_manifest(d, lambda m: m["shards"][0].update(size=3)),
        "memory_size",
    ),
    "another format": (lambda d: _edit_manifest(d, lambda m: m.update(format="x")), "format"),
    "not JSON": (lambda d: open(os.path.join(d, "manifest.json"), "w").write("{"), "not JSON"),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERING))
def test_tampered_shards_are_refused_before_anything_reads_them(tmp_path, tampering):
    base = _base()
    x, y, ids = _data(300)
    directory = str(tmp_path / "memory")
    _write_shards(directory, base, x, y, ids, 2)
    edit, message = TAMPERING[tampering]
    edit(directory)
    with pytest.raises(format_lib.ShardedMemoryError, match=message):
        keras_resmem.attach_memory(base, "pre_logits", shards=directory, k=K, verbose=0)


def test_a_consistently_rewritten_shard_with_bad_values_is_still_refused(tmp_path):
    """Digests can be rewritten by whoever edits the files; the value checks still hold."""
    base = _base()
    x, y, ids = _data(300)
    directory = tmp_path / "memory"
    _write_shards(directory, base, x, y, ids, 2)
    manifest = format_lib.read_manifest(directory)
    arrays = format_lib.read_shard(manifest, 1)
    arrays["memory_targets"][3] = 99  # a class id the outputs do not have
    info = format_lib.write_shard(directory, 1, 2, arrays)
    _edit_manifest(directory, lambda m: m["shards"][1].update(info))
    with pytest.raises(format_lib.ShardedMemoryError, match="outside"):
        format_lib.read_shard(format_lib.read_manifest(directory), 1)
    # An entry moved to the wrong shard would be served twice after a merge.
    arrays = format_lib.read_shard(manifest, 0)
    arrays["memory_ids"][0] = next(i for i in range(10**6) if format_lib.shard_of([i], 2)[0] == 1)
    info = format_lib.write_shard(directory, 0, 2, arrays)
    _edit_manifest(directory, lambda m: m["shards"][0].update(info))
    with pytest.raises(format_lib.ShardedMemoryError, match="other shards"):
        format_lib.read_shard(format_lib.read_manifest(directory), 0)


def test_a_tampered_shard_never_kills_the_process(tmp_path):
    base = _base()
    x, y, ids = _data(300)
    directory = str(tmp_path / "memory")
    _write_shards(directory, base, x, y, ids, 2)
    path = os.path.join(directory, SHARD0, "keys.npy")
    with open(path, "r+b") as f:
        f.seek(20)
        f.write(b"\xff" * 40)  # the header itself
    code = (
        "import sys, keras_resmem\n"
        "from keras_resmem.sharded import format as f\n"
        "try:\n"
        f"    f.read_shard(f.read_manifest({directory!r}), 0)\n"
        "except f.ShardedMemoryError as e:\n"
        "    print('refused:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout
