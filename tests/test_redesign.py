"""The backend interface, the writer, tuning and export without side effects, and the bugs
the 0.1 review found (issue 17): each has a test here that failed on 0.1."""

import ast
import pathlib
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resmem
from keras_resmem import search as search_lib
from keras_resmem.tuning import NeighborCache
from tests import numpy_reference as ref


def _base(num_outputs=4, dim=6, width=8):
    inputs = keras.Input((dim,), name="features")
    h = keras.layers.Dense(width, activation="relu", name="pre_logits")(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_outputs, name="logits")(h))


def _data(rng, n=300, dim=6, classes=4):
    return rng.normal(size=(n, dim)).astype("float32"), rng.integers(0, classes, n)


def _features(model):
    memory = model.get_layer("residual_memory")
    return keras.Model(model.inputs, memory.input)


# A toy backend, defined here and nowhere in the package: brute force in NumPy.


@keras.saving.register_keras_serializable(package="keras_resmem_tests")
class NumpyBruteForce(search_lib.SearchBackend):
    name = "numpy"
    portable = False
    custom_op_namespaces = ("PyFunc",)

    def search(self, queries, k):
        def brute(q, keys, k):
            d = ((q[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
            return np.argsort(d, axis=1, kind="stable")[:, :k].astype(np.int32)

        ids = tf.numpy_function(brute, [queries, tf.convert_to_tensor(self.keys), k], tf.int32)
        return tf.reshape(ids, [tf.shape(queries)[0], k])


def test_a_new_backend_needs_no_change_to_the_layer_writer_attach_or_export(rng, tmp_path):
    x, y = _data(rng)
    base = _base()
    toy = keras_resmem.attach_memory(
        base, "pre_logits", (x, y), k=7, sigma=0.5, search=NumpyBruteForce(), verbose=0
    )
    exact = keras_resmem.attach_memory(
        base, "pre_logits", (x, y), k=7, sigma=0.5, search="exact", verbose=0
    )
    assert toy.get_layer("residual_memory").search_backend == "numpy"
    np.testing.assert_allclose(toy.predict(x[:50], verbose=0), exact.predict(x[:50], verbose=0))
    # The tuning cache and saving go through the same interface.
    emb, scores = _features(toy).predict(x[:50], verbose=0)
    cache = NeighborCache(toy.get_layer("residual_memory"), emb, scores, max_k=10)
    np.testing.assert_allclose(
        cache.predict(k=7, sigma=0.5), exact.predict(x[:50], verbose=0), atol=1e-6
    )
    path = str(tmp_path / "toy.keras")
    toy.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x[:50], verbose=0), exact.predict(x[:50], verbose=0))
    # Export asks the backend whether it is portable.
    with pytest.raises(ValueError, match="stock TensorFlow Serving cannot load"):
        keras_resmem.export_saved_model(toy, str(tmp_path / "sm"))


def test_backends_are_typed_config_objects_serialized_the_keras_way(rng):
    ivf = keras_resmem.search.IVF(num_partitions=8, num_probes=3)
    memory = keras_resmem.ResidualMemory(k=5, search=ivf)
    memory.memorize(rng.normal(size=(200, 4)), rng.normal(size=(200, 3)), rng.integers(0, 3, 200))
    assert memory.search is not ivf  # the layer's own copy: no shared state
    assert memory.num_probes == 3 and memory.search_knobs == {"num_probes": 3}
    config = memory.get_config()
    assert config["search"]["registered_name"] == "keras_resmem>IVF"
    clone = keras_resmem.ResidualMemory.from_config(config)
    assert clone.search == memory.search
    # Strings and the 0.1 option dicts are still accepted.
    legacy = keras_resmem.ResidualMemory(search="ivf", ivf_options={"num_probes": 3})
    assert legacy.search == keras_resmem.search.IVF(num_probes=3)
    with pytest.raises(ValueError, match="Unknown IVF option"):
        keras_resmem.ResidualMemory(search="ivf", ivf_options={"probes": 3})
    with pytest.raises(ValueError, match="search"):
        keras_resmem.ResidualMemory(search="faiss")


def test_scann_leaves_to_search_is_a_knob(rng):
    keys = rng.normal(size=(3000, 8)).astype("float32")
    search = keras_resmem.search.ScaNN(
        brute_force=False, num_leaves=30, num_leaves_to_search=2, training_sample_size=3000
    )
    memory = keras_resmem.ResidualMemory(k=20, search=search)
    memory.memorize(keys, np.zeros((3000, 2)), np.zeros(3000, int))
    queries = rng.normal(size=(64, 8)).astype("float32")
    exact = np.argsort(((queries[:, None] - keys[None]) ** 2).sum(-1), axis=1)[:, :20]
    call = tf.function(lambda q: memory.neighbors(q)[0])

    def recall():
        found = call(queries).numpy()
        return np.mean([len(set(a) & set(b)) / 20 for a, b in zip(found, exact, strict=True)])

    few = recall()
    memory.set_search_knob("leaves_to_search", 30)  # reaches the traced function
    assert memory.search_knobs == {"leaves_to_search": 30}
    assert recall() == 1.0 > few


# Bug 1: a ScaNN memory filled again, or loaded into, searched its old index.


def test_scann_refill_reaches_compiled_predict(rng):
    x, y = _data(rng, n=400)
    x2, y2 = _data(rng, n=400)
    base = _base()
    model = keras_resmem.attach_memory(
        base, "pre_logits", (x, y), k=5, sigma=0.3, search="scann", verbose=0
    )
    memory = model.get_layer("residual_memory")
    model.predict(x[:64], verbose=0)
    model(x[:200])  # an eager call keeps its own reference to the searcher
    emb2, scores2 = _features(model).predict(x2, verbose=0)
    memory.memorize(emb2, scores2, y2)
    fresh = keras_resmem.attach_memory(
        base, "pre_logits", (x2, y2), k=5, sigma=0.3, search="scann", verbose=0
    )
    np.testing.assert_allclose(
        model.predict(x[:64], verbose=0), fresh.predict(x[:64], verbose=0), atol=1e-6
    )


def test_scann_load_weights_into_a_live_model(rng, tmp_path):
    x, y = _data(rng, n=400)
    base = _base()
    a = keras_resmem.attach_memory(base, "pre_logits", (x, y), k=5, search="scann", verbose=0)
    y2 = (y + 1) % 4
    b = keras_resmem.attach_memory(base, "pre_logits", (x[::-1], y2[::-1]), k=5, search="scann",
                                   verbose=0)  # fmt: skip
    a.predict(x[:64], verbose=0)
    a(x[:200])
    b.save_weights(str(tmp_path / "b.weights.h5"))
    a.load_weights(str(tmp_path / "b.weights.h5"))
    np.testing.assert_allclose(
        a.predict(x[:64], verbose=0), b.predict(x[:64], verbose=0), atol=1e-6
    )


# Bug 2: mixed precision.


@pytest.fixture
def global_policy():
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", ["mixed_float16", "bfloat16", "mixed_bfloat16"])
def test_memory_computes_in_float32_under_any_policy(rng, global_policy, policy):
    """Like keras-hub's `run_precision_test`: the memory's state and output stay float32."""
    x, y = _data(rng)
    global_policy(policy)
    base = _base()
    model = keras_resmem.attach_memory(base, "pre_logits", (x, y), k=5, search="exact", verbose=0)
    memory = model.get_layer("residual_memory")
    assert memory.compute_dtype == "float32"
    assert {v.dtype for v in memory.variables if v.name in ("keys", "memory_scores")} == {"float32"}
    out = model.predict(x[:32], verbose=0)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    emb, scores = (np.asarray(t, np.float32) for t in _features(model).predict(x[:32], verbose=0))
    expected = ref.resmem_classification(
        np.asarray(memory.keys), np.asarray(memory.memory_scores), y, emb, scores, 5, 1.0, 1.0
    )
    np.testing.assert_allclose(out, expected, atol=2e-5)
    with pytest.raises(ValueError, match="float32"):
        keras_resmem.ResidualMemory(dtype="mixed_float16")


# Bug 3: get_best_models(2) returned one object twice.


def test_best_models_are_distinct_and_the_tuned_model_is_not_changed(rng, tmp_path):
    x, y = _data(rng, n=400)
    model = keras_resmem.attach_memory(_base(), "pre_logits", (x[:300], y[:300]), k=5, verbose=0)
    memory = model.get_layer("residual_memory")
    before = model.predict(x[300:], verbose=0)
    tuner = keras_resmem.tuning.ResMemTuner(
        model, (x[300:], y[300:]), max_trials=6, seed=3, directory=str(tmp_path),
        tensorboard=False,
    )  # fmt: skip
    tuner.search(verbose=0)
    first, second = tuner.get_best_models(2)
    hps = tuner.get_best_hyperparameters(2)
    assert first is not second
    for best, hp in zip((first, second), hps, strict=True):
        layer = best.get_layer("residual_memory")
        assert (layer.k, layer.sigma) == (hp.values["k"], hp.values["sigma"])
        assert layer.keys is memory.keys  # shared, not copied
    assert (memory.k, memory.sigma, memory.temperature) == (5, 1.0, 1.0)
    np.testing.assert_array_equal(model.predict(x[300:], verbose=0), before)


def test_tuning_never_sets_the_live_layers_k(rng, tmp_path, monkeypatch):
    x, y = _data(rng, n=400)
    model = keras_resmem.attach_memory(_base(), "pre_logits", (x[:300], y[:300]), k=5, verbose=0)
    memory = model.get_layer("residual_memory")
    writes = []
    prop = type(memory).k
    monkeypatch.setattr(
        type(memory), "k", property(prop.fget, lambda s, v: writes.append(v) or prop.fset(s, v))
    )
    emb, scores = _features(model).predict(x[300:], verbose=0)
    NeighborCache(memory, emb, scores, max_k=50)
    tuner = keras_resmem.tuning.ResMemTuner(
        model, (x[300:], y[300:]), max_trials=2, directory=str(tmp_path), tensorboard=False
    )
    tuner.search(verbose=0)
    assert writes == []


# Bug 4: a sparse memory could not be tuned.


def test_sparse_memory_can_be_tuned(rng, tmp_path):
    x, y = _data(rng, n=400)
    model = keras_resmem.attach_memory(
        _base(), "pre_logits", (x[:300], y[:300]), k=5, sparse_residuals=2, temperature=1.5,
        verbose=0,
    )  # fmt: skip
    tuner = keras_resmem.tuning.ResMemTuner(
        model, (x[300:], y[300:]), max_trials=4, directory=str(tmp_path), tensorboard=False
    )
    tuner.search(verbose=0)
    assert sorted(tuner.get_best_hyperparameters()[0].values) == ["k", "sigma"]
    assert all(t.status == "COMPLETED" for t in tuner.oracle.trials.values())
    assert tuner.get_best_models(1)[0].get_layer("residual_memory").temperature == 1.5


# Bug 5: the getters failed inside a tf.function.


def test_hyperparameter_getters_work_inside_tf_function(rng):
    memory = keras_resmem.ResidualMemory(k=3, sigma=0.5, search="ivf")
    memory.memorize(rng.normal(size=(50, 4)), rng.normal(size=(50, 3)), rng.integers(0, 3, 50))

    @tf.function
    def read():
        return memory.k * 2, memory.sigma * 2.0, memory.num_probes + 0

    k, sigma, probes = read()
    assert (int(k), float(sigma), int(probes)) == (6, 1.0, memory.num_probes)
    memory.k = 4  # a variable: the traced function sees the change
    assert int(read()[0]) == 8


# Bug 6: a failed fill left a built layer that later calls and saves used.


def test_a_failed_fill_is_not_used_or_saved(rng, tmp_path, monkeypatch):
    memory = keras_resmem.ResidualMemory(k=3, search="ivf")

    def fail(*args, **kwargs):
        raise RuntimeError("k-means failed")

    monkeypatch.setattr(keras_resmem.search.ivf, "train_ivf", fail)
    keys, scores, targets = rng.normal(size=(50, 4)), rng.normal(size=(50, 3)), np.arange(50) % 3
    with pytest.raises(RuntimeError, match="k-means failed"):
        memory.memorize(keys, scores, targets)
    with pytest.raises(ValueError, match="last fill failed"):
        memory([keys[:2], scores[:2]])
    with pytest.raises(ValueError, match="last fill failed"):
        memory.save_own_variables({})
    monkeypatch.undo()
    memory.memorize(keys, scores, targets)  # a good fill makes it usable again
    assert memory([keys[:2], scores[:2]]).shape == (2, 3)


def test_bad_rows_fail_before_the_layer_is_touched(rng):
    memory = keras_resmem.ResidualMemory(k=3)
    keys = rng.normal(size=(50, 4))
    keys[-1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite.*entry 49"):
        memory.memorize(keys, rng.normal(size=(50, 3)), np.arange(50) % 3)
    assert not memory.built and memory.memory_size is None


# Bug 7: from_logits="False" became True.


@pytest.mark.parametrize("value", ["False", 0, 1.0])
def test_attach_rejects_a_from_logits_that_is_not_a_bool(rng, value):
    x, y = _data(rng, n=50)
    with pytest.raises(ValueError, match="from_logits"):
        keras_resmem.attach_memory(_base(), "pre_logits", (x, y), from_logits=value, verbose=0)


# Bug 8: two threads could build two ScaNN indexes.


def test_one_thread_builds_a_missing_scann_index(rng, tmp_path, monkeypatch):
    keys = rng.normal(size=(500, 8)).astype("float32")
    memory = keras_resmem.ResidualMemory(k=5, search="scann")
    memory.memorize(keys, np.zeros((500, 2)), np.zeros(500, int))
    memory.save_weights = None
    store = {}
    memory.save_own_variables(store)
    fresh = keras_resmem.ResidualMemory.from_config(memory.get_config())
    fresh.build()
    fresh.load_own_variables(store)  # no assets: the index is rebuilt on first use
    builds = []
    original = search_lib.ScannSearch.build.__func__

    def counting(cls, *args, **kwargs):
        builds.append(1)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(search_lib.ScannSearch, "build", classmethod(counting))
    barrier = threading.Barrier(4)
    errors = []

    def search():
        try:
            barrier.wait()
            fresh.neighbors(keys[:3])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=search) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(builds) == 1


# Bug 9: errors were swallowed.


def test_dataset_loader_lets_unexpected_errors_through(tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("a bug, not a missing file")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        keras_resmem.datasets.load_fashion_mnist(str(tmp_path))

    def offline():
        raise Exception("URL fetch failure on https://...: None -- [Errno -3]")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        keras_resmem.datasets.load_fashion_mnist(str(tmp_path))


# Export never changes the model it is given.


def test_export_does_not_touch_the_model(rng, tmp_path):
    x, y = _data(rng)
    model = keras_resmem.attach_memory(_base(), "pre_logits", (x, y), search="scann", verbose=0)
    memory = model.get_layer("residual_memory")
    backend, kernel = memory.search, memory.search._kernel
    before = model.predict(x[:32], verbose=0)
    keras_resmem.export_saved_model(model, str(tmp_path / "sm"), mode="scann")
    assert memory.search is backend and memory.search._kernel is kernel
    np.testing.assert_array_equal(model.predict(x[:32], verbose=0), before)


# The package's structure.


def _module_imports():
    root = pathlib.Path(keras_resmem.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("keras_resmem"):
                    imported.add(node.module)
                    imported.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith("keras_resmem"))
        modules[name] = imported
    return {
        name: {m for m in imported if m in modules and m != "keras_resmem" and m != name}
        for name, imported in modules.items()
    }


def test_no_module_imports_one_that_imports_it_back():
    graph = _module_imports()
    assert len(graph) > 10

    def reaches(start, target, seen):
        for nxt in graph[start]:
            if nxt == target or (
                nxt not in seen and not seen.add(nxt) and reaches(nxt, target, seen)
            ):
                return True
        return False

    cycles = sorted(m for m in graph if m != "keras_resmem" and reaches(m, m, set()))
    assert cycles == []


def test_the_layer_never_branches_on_the_backend():
    tree = ast.parse(pathlib.Path(keras_resmem.residual_memory.__file__).read_text())
    for node in ast.walk(tree):  # docstrings may name the backends; code may not
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                body[0] = ast.Pass()
    code = ast.unparse(tree)
    for needle in ("'exact'", "'ivf'", "'scann'", "search_backend ==", "IVF", "ScaNN", "Scann"):
        assert needle not in code, needle
