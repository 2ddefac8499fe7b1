"""Sparse residual memories (language models) and sequence inputs."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resmem
from keras_resmem import residuals as residuals_lib
from tests import numpy_reference as ref


def test_sparse_combination_equals_dense_where_dropped_entries_are_zero(rng):
    q, k, c, m = 7, 5, 40, 6
    ids = np.stack([[rng.choice(c, m, replace=False) for _ in range(k)] for _ in range(q)])
    # Values exactly representable in float16, so the comparison can be exact.
    values = rng.integers(-512, 512, size=(q, k, m)) / 1024.0
    dense = np.zeros((q, k, c))
    np.put_along_axis(dense, ids, values, axis=-1)
    w = rng.random((q, k))
    w /= w.sum(1, keepdims=True)
    got = residuals_lib.sparse_combination(
        tf.constant(w, tf.float32), tf.constant(ids, tf.int32), tf.constant(values, tf.float16), c
    )
    want = np.einsum("qk,qkc->qc", w, dense)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)


def test_sparse_combination_adds_up_a_class_shared_by_neighbours():
    got = residuals_lib.sparse_combination(
        tf.constant([[0.25, 0.75]]),
        tf.constant([[[2, 0], [2, 1]]]),
        tf.constant([[[0.5, -0.5], [1.0, -1.0]]], tf.float16),
        3,
    )
    np.testing.assert_allclose(got.numpy(), [[-0.125, -0.75, 0.875]])


@pytest.mark.parametrize("m", [1, 3, 10])
def test_sparse_residuals_keep_the_largest_magnitudes(rng, m):
    logits = rng.normal(size=(50, 10)) * 3
    labels = rng.integers(0, 10, size=50)
    ids, values = residuals_lib.sparse_residuals(
        tf.constant(logits, tf.float32), tf.constant(labels), m, temperature=1.5, from_logits=True
    )
    got = np.zeros((50, 10))
    np.put_along_axis(got, ids.numpy(), values.numpy().astype(np.float64), axis=1)
    want = ref.sparse_residuals(logits, labels, m, 1.5)
    np.testing.assert_allclose(got, want, atol=1e-3)  # float16 values
    assert values.dtype == tf.float16 and ids.shape == (50, m)


@pytest.mark.parametrize("search", ["exact", "ivf", "scann"])
def test_sparse_memory_matches_numpy_reference(rng, search):
    n, d, c, m = 400 if search == "exact" else 25_000, 6, 30, 4
    keys = rng.normal(size=(n, d)).astype("float32")
    logits = (rng.normal(size=(n, c)) * 2).astype("float32")
    labels = rng.integers(0, c, size=n)
    queries = keys[:64] + 0.01 * rng.normal(size=(64, d)).astype("float32")
    query_logits = (rng.normal(size=(64, c)) * 2).astype("float32")
    memory = keras_resmem.ResidualMemory(
        k=5, sigma=0.5, temperature=1.3, sparse_residuals=m, search=search
    )
    memory.memorize(keys, logits, labels)
    got = memory([queries, query_logits]).numpy()
    r = ref.sparse_residuals(logits, labels, m, 1.3)
    want = ref.resmem_with_residuals(keys, r, queries, query_logits, 5, 0.5, 1.3)
    agree = (got.argmax(-1) == want.argmax(-1)).mean()
    if search == "exact":
        np.testing.assert_allclose(got, want, atol=2e-3)  # float16 residual values
    assert agree >= 0.95


def test_sparse_memory_with_every_entry_kept_equals_the_dense_memory(rng):
    keys = rng.normal(size=(300, 4)).astype("float32")
    logits = rng.normal(size=(300, 8)).astype("float32")
    labels = rng.integers(0, 8, size=300)
    queries, query_logits = keys[:20] + 0.1, logits[:20]
    outs = []
    for sparse in (None, 8):
        memory = keras_resmem.ResidualMemory(k=7, sigma=0.3, sparse_residuals=sparse)
        memory.memorize(keys, logits, labels)
        outs.append(memory([queries, query_logits]).numpy())
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-3)


def test_sparse_memory_stores_fewer_bytes_and_fixes_its_temperature(rng):
    keys = rng.normal(size=(100, 16)).astype("float32")
    memory = keras_resmem.ResidualMemory(k=3, temperature=2.0, sparse_residuals=5)
    memory.memorize(keys, rng.normal(size=(100, 1000)), rng.integers(0, 1000, size=100))
    sizes = memory.storage_bytes()
    assert sizes["keys"] == 100 * 16 * 4
    assert sizes["residuals"] == 100 * 5 * (4 + 2)  # int32 id + float16 value
    assert sizes["total"] == sum(v for name, v in sizes.items() if name != "total")
    memory.sigma = 0.5  # fine
    memory.temperature = 2.0  # the same value: fine
    with pytest.raises(ValueError, match=r"temperature=2.0.*build it again.*temperature=1.0"):
        memory.temperature = 1.0
    cache = keras_resmem.tuning.NeighborCache(memory, keys[:10], np.zeros((10, 1000)), max_k=3)
    with pytest.raises(ValueError, match="sparse"):
        cache.predict(k=3, sigma=0.5, temperature=1.0)
    np.testing.assert_allclose(
        cache.predict(k=3, sigma=0.5, temperature=2.0),
        memory([keys[:10], np.zeros((10, 1000), "float32")]).numpy(),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparse_residuals": 0}, "sparse_residuals` must be a positive integer"),
        ({"sparse_residuals": 2, "task": "regression"}, "classification only"),
        ({"sparse_residuals": 9, "num_outputs": 8}, "at most num_outputs=8"),
    ],
)
def test_bad_sparse_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_resmem.ResidualMemory(**kwargs)


def test_sparse_size_larger_than_the_outputs_is_refused_at_memorize(rng):
    memory = keras_resmem.ResidualMemory(k=1, sparse_residuals=9)
    with pytest.raises(ValueError, match=r"at most the number of outputs \(4\).*=9"):
        memory.memorize(rng.normal(size=(10, 2)), rng.normal(size=(10, 4)), np.arange(10) % 4)


def test_sequence_inputs_equal_their_flattened_positions(rng):
    keys = rng.normal(size=(200, 8)).astype("float32")
    logits = rng.normal(size=(200, 12)).astype("float32")
    memory = keras_resmem.ResidualMemory(k=4, sigma=0.7, sparse_residuals=3)
    memory.memorize(keys, logits, rng.integers(0, 12, size=200))
    emb = rng.normal(size=(3, 5, 8)).astype("float32")
    scores = rng.normal(size=(3, 5, 12)).astype("float32")
    out, ids, weights = memory([emb, scores], return_neighbors=True)
    assert out.shape == (3, 5, 12) and ids.shape == (3, 5, 4) and weights.shape == (3, 5, 4)
    flat = memory([emb.reshape(15, 8), scores.reshape(15, 12)]).numpy()
    np.testing.assert_allclose(out.numpy().reshape(15, 12), flat, rtol=1e-6)
    spec = memory.compute_output_spec(
        [keras.KerasTensor((None, 5, 8)), keras.KerasTensor((None, 5, 12))]
    )
    assert spec.shape == (None, 5, 12)


def tiny_sequence_model(vocab=20, length=6, dim=8):
    tokens = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(vocab, dim)(tokens)
    x = keras.layers.LayerNormalization(name="key")(x)
    return keras.Model(tokens, keras.layers.Dense(vocab)(x))


def test_attach_memory_to_a_sequence_model_memorizes_every_weighted_position(rng):
    model = tiny_sequence_model(vocab=400)
    x = rng.permutation(400)[:300].reshape(50, 6).astype("int32")  # every key distinct
    y = rng.integers(0, 400, size=(50, 6)).astype("int32")
    w = (rng.random((50, 6)) < 0.6).astype("float32")
    resmem = keras_resmem.attach_memory(
        model, "key", (x, y, w), k=1, sigma=1e-3, sparse_residuals=20, verbose=0
    )
    memory = resmem.get_layer("residual_memory")
    assert memory.memory_size == int(w.sum())
    np.testing.assert_array_equal(memory.memory_targets.numpy(), y[w > 0])
    keys = keras.Model(model.inputs, model.get_layer("key").output).predict(x, verbose=0)
    np.testing.assert_allclose(memory.keys.numpy(), keys[w > 0], rtol=1e-6)
    out = resmem.predict(x, verbose=0)
    assert out.shape == (50, 6, 400)
    # Remark 3.2 at every memorized position: k=1 and a tiny sigma give back its label.
    np.testing.assert_array_equal(out.argmax(-1)[w > 0], y[w > 0])
    # Positions left out (weight 0) are not in the memory: their own label is not recalled.
    assert (out.argmax(-1)[w == 0] == y[w == 0]).mean() < 0.1


def test_a_dataset_and_arrays_give_the_same_memory(rng):
    model = tiny_sequence_model()
    x = rng.integers(0, 20, size=(40, 6)).astype("int32")
    y = rng.integers(0, 20, size=(40, 6)).astype("int32")
    w = (rng.random((40, 6)) < 0.5).astype("float32")
    from_arrays = keras_resmem.attach_memory(
        model, "key", (x, y, w), sparse_residuals=4, k=2, batch_size=9, verbose=0
    )
    dataset = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(9)
    from_dataset = keras_resmem.attach_memory(
        model, "key", dataset, sparse_residuals=4, k=2, verbose=0
    )
    a, b = (m.get_layer("residual_memory") for m in (from_arrays, from_dataset))
    for name in ("keys", "residual_ids", "residual_values", "memory_targets"):
        np.testing.assert_array_equal(getattr(a, name).numpy(), getattr(b, name).numpy())


def test_attach_memory_sequence_errors(rng):
    model = tiny_sequence_model()
    x = rng.integers(0, 20, size=(10, 6)).astype("int32")
    y = rng.integers(0, 20, size=(10, 6))
    with pytest.raises(ValueError, match=r"labels of shape \(10, 5\)"):
        keras_resmem.attach_memory(model, "key", (x, y[:, :5]), verbose=0)
    with pytest.raises(ValueError, match=r"sample weights of shape \(10, 3\)"):
        keras_resmem.attach_memory(model, "key", (x, y, np.ones((10, 3))), verbose=0)
    with pytest.raises(ValueError, match="every sample weight is 0"):
        keras_resmem.attach_memory(model, "key", (x, y, np.zeros((10, 6))), verbose=0)


_STREAMING_RSS = """
import numpy as np, tensorflow as tf, keras_resmem

def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

n, d, batch = 1568 * 1024, 64, 1024
memory = keras_resmem.ResidualMemory(k=1, search="exact")
writer = memory._writer(capacity={capacity})
scores = np.zeros((batch, 2), np.float32)
targets = np.zeros(batch, np.int32)
tf.constant(1.0) + 1.0
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = peak()
for start in range(0, n, batch):
    writer.write(np.full((batch, d), start, np.float32), scores, targets)
memory._fill(writer.finish())
grew = peak() - before
size = memory.storage_bytes()["total"]
assert memory.keys[-1, 0].numpy() == n - batch
print(grew / size)
"""


@pytest.mark.parametrize("capacity", ["1568 * 1024", "None"])
def test_streamed_build_holds_the_memory_once(capacity):
    """Peak RSS while building a 430 MB memory in 1 MB batches: about once, not twice."""
    out = subprocess.run(
        [sys.executable, "-c", _STREAMING_RSS.replace("{capacity}", capacity)],
        check=True,
        capture_output=True,
        text=True,
    )
    ratio = float(out.stdout.split()[-1])
    assert ratio < 1.3, ratio  # the memory, plus a 64 MB block per part; 2x before


def test_sparse_sequence_memory_round_trips_through_a_keras_file(rng, tmp_path):
    model = tiny_sequence_model()
    x = rng.integers(0, 20, size=(30, 6)).astype("int32")
    y = rng.integers(0, 20, size=(30, 6)).astype("int32")
    resmem = keras_resmem.attach_memory(model, "key", (x, y), sparse_residuals=5, verbose=0)
    path = str(tmp_path / "lm.keras")
    resmem.save(path)
    want = resmem.predict(x, verbose=0)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import numpy as np, keras, keras_resmem\n"
        f"m = keras.models.load_model({path!r})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, m.predict(x, verbose=0))\n"
        "mem = m.get_layer('residual_memory')\n"
        "assert mem.sparse_residuals == 5, mem.sparse_residuals\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, rtol=1e-6)


@pytest.mark.parametrize("search", ["exact", "ivf"])
def test_sparse_sequence_memory_exports_for_serving(rng, tmp_path, search):
    model = tiny_sequence_model()
    x = rng.integers(0, 20, size=(30, 6)).astype("int32")
    y = rng.integers(0, 20, size=(30, 6)).astype("int32")
    resmem = keras_resmem.attach_memory(
        model, "key", (x, y), sparse_residuals=5, search=search, k=3, verbose=0
    )
    path = str(tmp_path / "lm")
    keras_resmem.export_saved_model(resmem, path, verbose=0)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    out = serve(inputs=tf.constant(x[:4]))  # an unnamed keras.Input serves as "inputs"
    assert out["neighbor_ids"].shape == (4, 6, 3)
    want = resmem.predict(x[:4], verbose=0)
    np.testing.assert_allclose(out["resmem_scores"].numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["class_ids"].numpy(), want.argmax(-1))
