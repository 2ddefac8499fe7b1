"""Key projection (`keras_resmem.projection.PCA`), checked against a NumPy PCA."""

import io
import os
import subprocess
import sys
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resmem
from keras_resmem import _integrity
from keras_resmem.projection import PCA, fit_pca

KEY_DIM, NUM_CLASSES = 24, 4


def _numpy_pca(keys, dim):
    """Mean and top-`dim` components `(d, dim)` by SVD of the centred keys (float64)."""
    keys = np.float64(keys)
    mean = keys.mean(axis=0)
    _, _, vt = np.linalg.svd(keys - mean, full_matrices=False)
    return mean, vt[:dim].T


def _low_rank_keys(rng, n, d=KEY_DIM, rank=6):
    """Keys with a clear spectrum (distinct leading variances), so the components are unique."""
    scales = np.linspace(5.0, 1.0, rank)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0][:, :rank]
    latent = rng.normal(size=(n, rank)) * scales
    return (latent @ basis.T + 0.05 * rng.normal(size=(n, d)) + 2.0).astype("float32")


def _memory_data(rng, n):
    keys = _low_rank_keys(rng, n)
    return keys, rng.normal(size=(n, NUM_CLASSES)).astype("float32"), rng.integers(0, 4, n)


def _predictions(memory, queries, logits):
    return memory([queries, logits]).numpy()


def test_pca_matches_numpy_svd_up_to_sign(rng):
    keys = _low_rank_keys(rng, 3000)
    mean, components = fit_pca(keys, 5, chunk_rows=700)  # several chunks
    want_mean, want = _numpy_pca(keys, 5)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-10, atol=1e-10)
    signs = np.sign((components * want).sum(axis=0))
    np.testing.assert_allclose(components, want * signs, atol=1e-8)
    np.testing.assert_allclose(components.T @ components, np.eye(5), atol=1e-10)

    memory = keras_resmem.ResidualMemory(k=3, key_projection=PCA(5))
    memory.memorize(keys, np.zeros((3000, NUM_CLASSES)), np.zeros(3000, int))
    stored = memory.key_projection.components.numpy()
    np.testing.assert_allclose(np.abs((stored * want).sum(axis=0)), 1.0, atol=1e-5)
    np.testing.assert_allclose(memory.key_projection.mean.numpy(), want_mean, rtol=1e-6)


def test_projected_memory_equals_plain_memory_on_numpy_projected_keys(rng):
    keys, scores, targets = _memory_data(rng, 600)
    queries = _low_rank_keys(rng, 50)
    query_logits = rng.normal(size=(50, NUM_CLASSES)).astype("float32")
    settings = {"k": 7, "sigma": 0.8, "temperature": 1.5, "search": "exact"}
    projected = keras_resmem.ResidualMemory(key_projection=PCA(4), **settings)
    projected.memorize(keys, scores, targets)

    mean, components = _numpy_pca(keys, 4)
    # The library's components up to sign; signs do not change L2 distances.
    reference = keras_resmem.ResidualMemory(**settings)
    reference.memorize((keys - mean) @ components, scores, targets)
    want = _predictions(reference, np.float32((queries - mean) @ components), query_logits)
    got = _predictions(projected, queries, query_logits)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert projected.keys.shape == (600, 4)
    ids, distances, _ = projected.neighbors(queries)
    want_ids, want_distances, _ = reference.neighbors(np.float32((queries - mean) @ components))
    np.testing.assert_array_equal(ids.numpy(), want_ids.numpy())
    np.testing.assert_allclose(distances.numpy(), want_distances.numpy(), atol=1e-3)


@pytest.mark.parametrize("search", ["ivf", "scann"])
def test_approximate_backends_are_built_on_the_projected_keys(rng, search):
    keys, scores, targets = _memory_data(rng, 2000)
    memory = keras_resmem.ResidualMemory(k=5, search=search, key_projection=3)
    memory.memorize(keys, scores, targets)
    assert memory.search_backend == search and memory.stored_key_dim == 3
    exact = keras_resmem.ResidualMemory(k=5, search="exact", key_projection=3)
    exact.memorize(keys, scores, targets)
    ids, _, _ = memory.neighbors(keys[:100])
    want, _, _ = exact.neighbors(keys[:100])
    pairs = zip(ids.numpy(), want.numpy(), strict=True)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in pairs])
    assert recall > 0.8


def test_add_examples_projects_with_the_fit_it_holds_and_memorize_refits(rng):
    """The semantics: after `memorize(A)` and `add_examples(B)` the memory is A and B
    projected with the fit on A; `memorize` fits again; `forget` keeps the fit."""
    keys, scores, targets = _memory_data(rng, 800)
    new_keys = _low_rank_keys(rng, 200) + 3.0  # shifted: a refit would move the mean
    queries = _low_rank_keys(rng, 40) + 1.5
    logits = rng.normal(size=(40, NUM_CLASSES)).astype("float32")
    settings = {"k": 5, "sigma": 0.5, "search": "exact"}
    memory = keras_resmem.ResidualMemory(key_projection=PCA(4), **settings)
    memory.memorize(keys, scores, targets)
    fit = memory.key_projection.mean.numpy(), memory.key_projection.components.numpy()
    memory.add_examples(new_keys, scores[:200], targets[:200])
    np.testing.assert_array_equal(memory.key_projection.mean.numpy(), fit[0])

    project = lambda z: np.float32((z - fit[0]) @ fit[1])  # noqa: E731
    reference = keras_resmem.ResidualMemory(**settings)
    reference.memorize(
        project(np.concatenate([keys, new_keys])),
        np.concatenate([scores, scores[:200]]),
        np.concatenate([targets, targets[:200]]),
    )
    np.testing.assert_allclose(
        _predictions(memory, queries, logits),
        _predictions(reference, project(queries), logits),
        atol=1e-4,
    )
    memory.forget(np.arange(100))
    np.testing.assert_array_equal(memory.key_projection.mean.numpy(), fit[0])
    memory.memorize(new_keys, scores[:200], targets[:200])
    np.testing.assert_allclose(memory.key_projection.mean.numpy(), new_keys.mean(0), rtol=1e-5)


def _model(rng, n=500, **kwargs):
    inputs = keras.Input((KEY_DIM,), name="features")
    h = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))
    x = _low_rank_keys(rng, n)
    settings = {"k": 5, "sigma": 0.5, "search": "exact", "verbose": 0, **kwargs}
    return keras_resmem.attach_memory(base, "hidden", (x, rng.integers(0, 4, n)), **settings), x


def test_attach_memory_takes_a_projection_and_keras_files_carry_it(rng, tmp_path):
    model, x = _model(rng, key_projection=keras_resmem.projection.PCA(6))
    memory = model.get_layer("residual_memory")
    assert memory.key_dim == 16 and memory.stored_key_dim == 6
    assert memory.storage_bytes()["projection"] == 16 * 7 * 4
    want = model.predict(x[:64], verbose=0)
    path = tmp_path / "m.keras"
    keras_resmem.save_model(model, path)
    restored = keras.models.load_model(path)
    loaded = restored.get_layer("residual_memory")
    assert loaded.key_projection.dim == 6 and loaded.keys.shape == (500, 6)
    np.testing.assert_array_equal(
        loaded.key_projection.components.numpy(), memory.key_projection.components.numpy()
    )
    np.testing.assert_array_equal(restored.predict(x[:64], verbose=0), want)
    config = memory.get_config()
    assert config["key_projection"]["registered_name"] == "keras_resmem>PCA"
    again = keras_resmem.ResidualMemory.from_config(config)
    assert again.key_projection.dim == 6 and again.key_projection is not memory.key_projection

    np.save(tmp_path / "x.npy", x[:64])
    script = (
        "import sys, numpy as np, keras, keras_resmem\n"
        "d = sys.argv[1]\n"
        "m = keras.models.load_model(d + '/m.keras')\n"
        "np.save(d + '/p.npy', m.predict(np.load(d + '/x.npy'), verbose=0))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=os.environ)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), want)


@pytest.mark.parametrize("search", ["ivf", "scann"])
def test_an_index_on_projected_keys_saves_and_loads(rng, tmp_path, search):
    model, x = _model(rng, n=1500, key_projection=4, search=search)
    want = model.predict(x[:64], verbose=0)
    keras_resmem.save_model(model, tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    memory = restored.get_layer("residual_memory")
    assert memory.search_backend == search and memory.stored_key_dim == 4
    np.testing.assert_array_equal(restored.predict(x[:64], verbose=0), want)


def test_tuned_copies_share_the_projection(rng):
    model, x = _model(rng, key_projection=6)
    memory = model.get_layer("residual_memory")
    other = memory._with_settings(k=3)
    assert other.key_projection is memory.key_projection
    embeddings = rng.normal(size=(8, 16)).astype("float32")
    ids, _, _ = other.neighbors(embeddings)
    want, _, _ = memory.neighbors(embeddings, k=3)
    np.testing.assert_array_equal(ids.numpy(), want.numpy())


def test_portable_saved_model_projects_queries_like_keras(rng, tmp_path):
    model, x = _model(rng, key_projection=5, search="ivf")
    path = keras_resmem.export_saved_model(model, tmp_path / "resmem" / "1")
    serve = tf.saved_model.load(path).signatures["serving_default"]
    served = serve(features=tf.constant(x[:64]))
    np.testing.assert_allclose(
        served["resmem_scores"].numpy(), model.predict(x[:64], verbose=0), atol=1e-6
    )
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        assert b"Scann" not in f.read()


def _rewrite_var(src, dst, name, edit, tmp_path, drop_digest=False):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if drop_digest and item.filename.endswith(_integrity.DIGEST_FILE):
                continue
            if item.filename.endswith("model.weights.h5"):
                h5 = tmp_path / "w.h5"
                h5.write_bytes(data)
                with h5py.File(h5, "r+") as f:
                    dataset = f[f"layers/residual_memory/vars/{name}"]
                    dataset[...] = edit(dataset[...])
                data = h5.read_bytes()
            zout.writestr(item, data)
    return dst


def test_loaded_projection_weights_are_checked_and_in_the_digest(rng, tmp_path):
    model, _ = _model(rng, key_projection=5)
    good = tmp_path / "good.keras"
    keras_resmem.save_model(model, good)
    with zipfile.ZipFile(good) as archive:
        names = {
            n
            for n in h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")[
                "layers/residual_memory/vars"
            ]
        }
    assert {"projection_mean", "projection_components"} <= names

    def nan(a):
        a = a.copy()
        a.reshape(-1)[3] = np.nan
        return a

    def nudge(a):
        return a + 1e-3

    for name in ("projection_mean", "projection_components"):
        edited = _rewrite_var(good, tmp_path / f"{name}.keras", name, nudge, tmp_path)
        with pytest.raises(ValueError, match="does not match the digest"):
            keras.models.load_model(edited)
        bad = _rewrite_var(
            good, tmp_path / f"{name}_nan.keras", name, nan, tmp_path, drop_digest=True
        )
        with pytest.raises(ValueError, match=rf"`{name}` holds NaN"):
            keras.models.load_model(bad)


def test_bad_projections_get_clear_errors(rng):
    keys, scores, targets = _memory_data(rng, 50)
    for bad in (0, -3, 1.5, True, "8"):
        with pytest.raises(ValueError, match="key_projection|`dim`"):
            keras_resmem.ResidualMemory(key_projection=bad)
    with pytest.raises(ValueError, match=r"`dim` must be a positive integer. Received: dim=0"):
        PCA(0)
    memory = keras_resmem.ResidualMemory(k=3, key_projection=PCA(KEY_DIM + 1))
    with pytest.raises(ValueError, match=rf"dim={KEY_DIM + 1}.*{KEY_DIM} features"):
        memory.memorize(keys, scores, targets)
    memory = keras_resmem.ResidualMemory(k=3, key_projection=PCA(20))
    with pytest.raises(ValueError, match="dim=20 components, more than the 10 entries"):
        memory.memorize(keys[:10], scores[:10], targets[:10])
    assert not memory.built  # left as it was
    with pytest.raises(ValueError, match="more than key_dim=8"):
        keras_resmem.ResidualMemory(key_projection=9, key_dim=8, memory_size=10, num_outputs=2)
    with pytest.raises(ValueError, match="dim=17 components, more than the keys' 16"):
        _model(rng, key_projection=17)
