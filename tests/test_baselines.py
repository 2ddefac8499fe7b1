"""The two baselines over a memory's neighbours, kNN on labels and kNN-LM-style
interpolation (`ResidualMemory(method=...)`), against the NumPy reference; the
same through `NeighborCache`, `choose`, the tuner, `compare` and a saved file."""

import keras
import keras_tuner
import numpy as np
import pytest

import keras_resmem
from keras_resmem import tuning
from tests import numpy_reference as ref
from tests.test_residual_memory import make_memory_data, make_queries


@pytest.mark.parametrize("search", ["exact", "ivf", "scann"])
@pytest.mark.parametrize("k,sigma", [(1, 0.5), (9, 0.7), (400, 2.0)])
def test_knn_on_labels_matches_numpy_reference(rng, search, k, sigma):
    keys, logits, labels = make_memory_data(rng)
    queries, query_logits = make_queries(rng)
    # Approximate backends set to find every neighbour: compare with the reference.
    search = {
        "exact": "exact",
        "scann": keras_resmem.search.ScaNN(brute_force=True),
        "ivf": keras_resmem.search.IVF(num_partitions=1),
    }[search]
    memory = keras_resmem.ResidualMemory(k=k, sigma=sigma, method="knn", search=search)
    memory.memorize(keys, logits, labels)
    want = ref.knn_labels(keys, labels, queries, k, sigma, 4)
    np.testing.assert_allclose(memory([queries, query_logits]).numpy(), want, atol=2e-5)


@pytest.mark.parametrize("k,sigma,temperature,lam", [(1, 0.5, 1.0, 0.5), (25, 0.7, 1.4, 0.2)])
def test_interpolation_matches_numpy_reference(rng, k, sigma, temperature, lam):
    keys, logits, labels = make_memory_data(rng)
    queries, query_logits = make_queries(rng)
    memory = keras_resmem.ResidualMemory(
        k=k, sigma=sigma, temperature=temperature, method="interpolation", knn_weight=lam
    )
    memory.memorize(keys, logits, labels)
    want = ref.interpolation_classification(
        keys, labels, queries, query_logits, k, sigma, temperature, lam
    )
    np.testing.assert_allclose(memory([queries, query_logits]).numpy(), want, atol=2e-5)


def test_interpolation_ends_are_the_network_and_the_knn(rng):
    keys, logits, labels = make_memory_data(rng)
    queries, query_logits = make_queries(rng)
    memory = keras_resmem.ResidualMemory(k=5, sigma=0.5, temperature=2.0, method="interpolation")
    memory.memorize(keys, logits, labels)
    memory.knn_weight = 0.0
    np.testing.assert_allclose(
        memory([queries, query_logits]).numpy(), ref.softmax(query_logits / 2.0), atol=1e-6
    )
    memory.knn_weight = 1.0
    np.testing.assert_allclose(
        memory([queries, query_logits]).numpy(),
        ref.knn_labels(keys, labels, queries, 5, 0.5, 4),
        atol=2e-5,
    )


def test_regression_baselines_match_numpy_reference(rng):
    keys = rng.normal(size=(300, 3)).astype("float32")
    predictions = rng.normal(size=(300, 2)).astype("float32")
    targets = rng.normal(size=(300, 2)).astype("float32")
    queries, query_predictions = make_queries(rng, d=3, c=2)
    memory = keras_resmem.ResidualMemory(k=5, sigma=0.3, task="regression", method="knn")
    memory.memorize(keys, predictions, targets)
    np.testing.assert_allclose(
        memory([queries, query_predictions]).numpy(),
        ref.knn_targets(keys, targets, queries, 5, 0.3),
        atol=2e-5,
    )
    memory.method, memory.knn_weight = "interpolation", 0.3
    np.testing.assert_allclose(
        memory([queries, query_predictions]).numpy(),
        ref.interpolation_regression(keys, targets, queries, query_predictions, 5, 0.3, 0.3),
        atol=2e-5,
    )


def test_sparse_memory_baselines_use_the_labels_and_any_temperature(rng):
    keys, logits, labels = make_memory_data(rng, c=50)
    queries, query_logits = make_queries(rng, c=50)
    memory = keras_resmem.ResidualMemory(
        k=7, sigma=0.5, temperature=1.0, sparse_residuals=3, method="interpolation"
    )
    memory.memorize(keys, logits, labels)
    memory.knn_weight = 0.4
    want = ref.interpolation_classification(keys, labels, queries, query_logits, 7, 0.5, 1.0, 0.4)
    np.testing.assert_allclose(memory([queries, query_logits]).numpy(), want, atol=2e-5)
    cache = tuning.NeighborCache(memory, queries, query_logits, max_k=7)
    want_t2 = ref.interpolation_classification(
        keys, labels, queries, query_logits, 7, 0.5, 2.0, 0.4
    )
    np.testing.assert_allclose(
        cache.predict(7, 0.5, 2.0, method="interpolation", knn_weight=0.4), want_t2, atol=2e-5
    )
    with pytest.raises(ValueError, match="sparse"):
        cache.predict(7, 0.5, 2.0, method="resmem")


def test_method_change_reaches_a_compiled_model_and_survives_a_keras_file(rng, tmp_path):
    keys, logits, labels = make_memory_data(rng)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(6, name="pre_logits")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(4)(h))
    model = keras_resmem.attach_memory(base, "pre_logits", (keys, labels), k=9, verbose=0)
    memory = model.get_layer("residual_memory")
    queries = rng.normal(size=(20, 6)).astype("float32")
    resmem = model.predict(queries, verbose=0)
    memory.method, memory.knn_weight = "interpolation", 0.25
    interpolated = model.predict(queries, verbose=0)  # same compiled predict function
    assert not np.allclose(resmem, interpolated)
    embeddings = keras.Model(base.inputs, [h, base.output]).predict(queries, verbose=0)
    direct = keras_resmem.ResidualMemory(**{**memory.get_config(), "name": "direct"})
    direct.memorize(*keras.Model(base.inputs, [h, base.output]).predict(keys, verbose=0), labels)
    np.testing.assert_allclose(interpolated, direct(list(embeddings)).numpy(), atol=1e-5)

    path = tmp_path / "interpolation.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    restored_memory = restored.get_layer("residual_memory")
    assert (restored_memory.method, restored_memory.knn_weight) == ("interpolation", 0.25)
    np.testing.assert_allclose(restored.predict(queries, verbose=0), interpolated, atol=1e-6)


def test_a_file_saved_before_the_method_variables_loads_as_resmem(rng):
    keys, logits, labels = make_memory_data(rng)
    queries, query_logits = make_queries(rng)
    memory = keras_resmem.ResidualMemory(k=9, sigma=0.7, search="ivf")
    memory.memorize(keys, logits, labels)
    store = {}
    memory.save_own_variables(store)
    # Version 0.1 saved by position, and before `method` and `knn_weight` existed:
    order = ["keys", "memory_scores", "memory_targets", "k", "sigma", "temperature"]
    order += ["ivf_centroids", "ivf_offsets", "ivf_ids", "num_probes"]
    old_store = {str(i): store[name] for i, name in enumerate(order)}
    fresh = keras_resmem.ResidualMemory.from_config(memory.get_config())
    fresh.build()
    fresh.load_own_variables(old_store)
    assert fresh.method == "resmem"
    np.testing.assert_allclose(
        fresh([queries, query_logits]).numpy(), memory([queries, query_logits]).numpy()
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "kNN-LM"}, "`method` must be one of"),
        (
            {"knn_weight": 1.5},
            r"`knn_weight` must be a number in \[0, 1\]. Received: knn_weight=1.5",
        ),
        ({"knn_weight": "0.5"}, "`knn_weight` must be a number"),
    ],
)
def test_bad_method_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_resmem.ResidualMemory(**kwargs)


def cache_and_layer(rng):
    keys, logits, labels = make_memory_data(rng)
    queries, query_logits = make_queries(rng, m=80)
    memory = keras_resmem.ResidualMemory(k=5)
    memory.memorize(keys, logits, labels)
    return (
        memory,
        tuning.NeighborCache(memory, queries, query_logits, max_k=30),
        queries,
        (query_logits),
    )


@pytest.mark.parametrize(
    "method,settings",
    [
        ("resmem", {"k": 12, "sigma": 0.4, "temperature": 1.7}),
        ("knn", {"k": 30, "sigma": 0.9}),
        ("interpolation", {"k": 3, "sigma": 0.2, "temperature": 0.6, "knn_weight": 0.7}),
    ],
)
def test_neighbor_cache_equals_the_layer_for_every_method(rng, method, settings):
    memory, cache, queries, query_logits = cache_and_layer(rng)
    tuning.Choice(method, settings, accuracy=0.0).apply(memory)
    np.testing.assert_allclose(
        cache.predict(method=method, **settings),
        memory([queries, query_logits]).numpy(),
        atol=1e-5,
    )


def test_choose_picks_the_best_point_of_the_grid(rng):
    memory, cache, queries, query_logits = cache_and_layer(rng)
    y = rng.integers(0, 4, size=80)
    grid = {"k": [1, 5, 30], "sigma": [0.1, 1.0], "temperature": [1.0], "knn_weight": [0.2, 0.9]}
    choice = cache.choose(y, "interpolation", grid)
    accuracies = {
        (k, s, w): (
            cache.predict(k, s, 1.0, method="interpolation", knn_weight=w).argmax(-1) == y
        ).mean()
        for k in grid["k"]
        for s in grid["sigma"]
        for w in grid["knn_weight"]
    }
    assert choice.accuracy == max(accuracies.values())
    s = choice.settings
    assert accuracies[(s["k"], s["sigma"], s["knn_weight"])] == choice.accuracy
    chosen = cache.choose_all(y)
    assert sorted(chosen) == ["interpolation", "knn", "resmem"]
    assert "temperature" not in chosen["knn"].settings


def test_choose_on_regression_minimises_the_squared_error(rng):
    keys = rng.normal(size=(200, 3)).astype("float32")
    memory = keras_resmem.ResidualMemory(k=5, task="regression")
    memory.memorize(keys, np.zeros((200, 1)), keys[:, :1] * 2)
    queries = rng.normal(size=(40, 3)).astype("float32")
    cache = tuning.NeighborCache(memory, queries, np.zeros((40, 1)), max_k=10)
    choice = cache.choose(queries[:, :1] * 2, "knn", {"k": [1, 10], "sigma": [0.01, 100.0]})
    assert choice.accuracy is None and choice.mse < 0.5
    assert "mse=" in repr(choice)


def test_compare_takes_several_methods():
    got = keras_resmem.compare([0, 1, 1], [0, 0, 0], {"a": [0, 1, 1], "b": [1, 0, 0]})
    assert got["a"].gain == pytest.approx(2 / 3) and got["b"].fpr == pytest.approx(1 / 3)


def test_tuner_searches_several_methods_and_applies_the_best(rng, tmp_path):
    from tests.test_tuning import memory_model

    model, val = memory_model(rng)
    tuner = keras_resmem.tuning.ResMemTuner(
        model,
        val,
        method=["resmem", "knn", "interpolation"],
        max_trials=12,
        seed=1,
        directory=tmp_path,
        tensorboard=False,
    )
    tuner.search(verbose=0)
    methods = {t.hyperparameters.values["method"] for t in tuner.oracle.trials.values()}
    assert methods == {"resmem", "knn", "interpolation"}
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best = tuner.get_best_models(1)[0]
    memory = best.get_layer("residual_memory")
    assert memory.method == best_trial.hyperparameters.values["method"]
    accuracy = (best.predict(val[0], verbose=0).argmax(-1) == val[1]).mean()
    assert accuracy == pytest.approx(best_trial.metrics.get_last_value("val_accuracy"), abs=1e-9)


def test_tuner_for_one_baseline_needs_only_its_hyperparameters(rng, tmp_path):
    from tests.test_tuning import memory_model

    model, val = memory_model(rng)
    hp = keras_tuner.HyperParameters()
    hp.Choice("k", [1, 5])
    hp.Fixed("sigma", 1.0)
    tuner = keras_resmem.tuning.ResMemTuner(
        model,
        val,
        method="knn",
        hyperparameters=hp,
        max_trials=3,
        directory=tmp_path,
        tensorboard=False,
    )
    tuner.search(verbose=0)
    assert tuner.get_best_models(1)[0].get_layer("residual_memory").method == "knn"
    with pytest.raises(ValueError, match=r"missing \['knn_weight', 'temperature'\]"):
        keras_resmem.tuning.ResMemTuner(
            model,
            val,
            method="interpolation",
            hyperparameters=hp,
            directory=tmp_path,
            tensorboard=False,
        )
    with pytest.raises(ValueError, match="`method` must be one of"):
        keras_resmem.tuning.ResMemTuner(model, val, method="lm", directory=tmp_path)
