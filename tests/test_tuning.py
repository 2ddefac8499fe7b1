import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf

import keras_resmem
from keras_resmem import tuning


def test_trial_metrics_against_hand_computed_counts():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    deepnet = np.array([0, 1, 2, 0, 0, 0, 0, 0, 0, 0])  # right on 0-3, 6, 9
    resmem = np.array([0, 1, 0, 0, 1, 2, 0, 0, 0, 0])  # fixes 4, 5; breaks 2
    metrics = tuning.trial_metrics(y, deepnet, np.eye(3)[resmem], fpr_bound=0.05)
    assert metrics["val_tpr"] == pytest.approx(0.2)
    assert metrics["val_fpr"] == pytest.approx(0.1)
    assert metrics["val_gain"] == pytest.approx(0.1)
    assert metrics["val_accuracy"] == pytest.approx(0.7)
    assert metrics["val_tpr_at_fpr"] == pytest.approx(-0.1)  # 0.1 >= 0.05 breaks the bound
    relaxed = tuning.trial_metrics(y, deepnet, np.eye(3)[resmem], fpr_bound=0.2)
    assert relaxed["val_tpr_at_fpr"] == pytest.approx(0.2)


def test_constrained_objective_orders_every_bound_breaker_last():
    keeps = [tuning.constrained_tpr(t, f, 0.05) for t, f in [(0.0, 0.0), (0.01, 0.049)]]
    breaks = [tuning.constrained_tpr(t, f, 0.05) for t, f in [(0.9, 0.05), (0.5, 0.5)]]
    assert min(keeps) > max(breaks)
    assert breaks[0] > breaks[1]  # among breakers, the smaller FPR first


def memory_model(rng, n=300):
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(6, activation="tanh", name="pre_logits")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(3)(h))
    base.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    base.fit(x, y, epochs=30, verbose=0)
    # Memorize noisy labels, so that a sharp memory breaks what DeepNet gets right.
    noisy = np.where(rng.random(n) < 0.4, rng.integers(0, 3, n), y)
    model = keras_resmem.attach_memory(base, "pre_logits", (x, noisy), verbose=0)
    x_val = rng.normal(size=(200, 4)).astype("float32")
    y_val = (x_val[:, 0] > 0).astype(int) + (x_val[:, 1] > 0)
    return model, (x_val, y_val)


def test_bound_breaking_trial_ranks_last_and_is_not_failed(rng, tmp_path):
    model, val = memory_model(rng)
    hp = keras_tuner.HyperParameters()
    hp.Choice("k", [1, 100])
    hp.Fixed("sigma", 100.0)  # uniform weights: k=100 averages the noise away, k=1 copies it
    hp.Fixed("temperature", 1.0)
    oracle = keras_tuner.oracles.GridSearchOracle(
        objective=keras_tuner.Objective("val_tpr_at_fpr", direction="max"), max_trials=10
    )
    tuner = keras_resmem.tuning.ResMemTuner(
        model, val, oracle=oracle, hyperparameters=hp, directory=tmp_path, tensorboard=False
    )
    tuner.search(verbose=0)
    trials = tuner.oracle.get_best_trials(2)
    assert [t.status for t in trials] == ["COMPLETED", "COMPLETED"]
    fprs = [t.metrics.get_last_value("val_fpr") for t in trials]
    assert fprs[0] < 0.05 <= fprs[1]  # the noisy 1-NN memory breaks the bound, ranks last
    assert trials[1].hyperparameters.values["k"] == 1
    assert trials[1].score == pytest.approx(-fprs[1])


def test_search_resumes_after_interruption(rng, tmp_path):
    model, val = memory_model(rng)
    kwargs = {"directory": tmp_path, "project_name": "sweep", "seed": 3, "tensorboard": False}
    first = keras_resmem.tuning.ResMemTuner(model, val, max_trials=4, **kwargs)
    first.search(verbose=0)
    done = set(first.oracle.trials)
    assert len(done) == 4

    # A new process would build a new tuner over the same directory.
    resumed = keras_resmem.tuning.ResMemTuner(model, val, max_trials=7, **kwargs)
    calls = []
    run_trial = resumed.run_trial
    resumed.run_trial = lambda trial, *a, **k: calls.append(trial.trial_id) or run_trial(trial)
    resumed.search(verbose=0)
    assert len(resumed.oracle.trials) == 7
    assert len(calls) == 3 and not done & set(calls)


@pytest.mark.parametrize("oracle_cls", ["RandomSearchOracle", "BayesianOptimizationOracle"])
def test_any_oracle_drives_the_tuner_and_best_model_gets_best_values(rng, tmp_path, oracle_cls):
    model, val = memory_model(rng)
    oracle = getattr(keras_tuner.oracles, oracle_cls)(
        objective=keras_tuner.Objective("val_accuracy", direction="max"), max_trials=6, seed=1
    )
    tuner = keras_resmem.tuning.ResMemTuner(model, val, oracle=oracle, directory=tmp_path)
    tuner.search(verbose=0)
    best_hp = tuner.get_best_hyperparameters()[0].values
    best = tuner.get_best_models()[0]
    memory = best.get_layer("residual_memory")
    assert (memory.k, memory.sigma) == (best_hp["k"], pytest.approx(best_hp["sigma"]))
    accuracy = (best.predict(val[0], verbose=0).argmax(-1) == val[1]).mean()
    best_trial = tuner.oracle.get_best_trials(1)[0]
    assert accuracy == pytest.approx(best_trial.metrics.get_last_value("val_accuracy"), abs=1e-9)
    assert list((tmp_path / "resmem" / "tensorboard").glob("trial_*/events.out.tfevents.*"))


def test_neighbor_cache_equals_the_layer(rng):
    model, (x_val, _) = memory_model(rng)
    memory = model.get_layer("residual_memory")
    features = keras.Model(model.inputs, memory.input)
    cache = tuning.NeighborCache(memory, *features.predict(x_val, verbose=0), max_k=40)
    memory.k, memory.sigma, memory.temperature = 17, 0.3, 2.2
    np.testing.assert_allclose(
        cache.predict(17, 0.3, 2.2), model.predict(x_val, verbose=0), atol=1e-5
    )


def test_bad_tuner_arguments(rng, tmp_path):
    model, val = memory_model(rng)
    with pytest.raises(ValueError, match="`objective` must be one of"):
        keras_resmem.tuning.ResMemTuner(model, val, objective="loss", directory=tmp_path)
    with pytest.raises(ValueError, match="`fpr_bound` must be in"):
        keras_resmem.tuning.ResMemTuner(model, val, fpr_bound=5, directory=tmp_path)
    with pytest.raises(ValueError, match="has no layer 'memory'"):
        keras_resmem.tuning.ResMemTuner(model, val, memory_layer="memory", directory=tmp_path)


def test_tuner_for_regression_minimises_mse(rng, tmp_path):
    x = rng.normal(size=(400, 4)).astype("float32")
    y = np.stack([np.sin(3 * x[:, 0]), x[:, 1] ** 2], axis=1).astype("float32")
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", name="pre_logits")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(2)(h))
    model = keras_resmem.attach_memory(
        base, "pre_logits", (x[:300], y[:300]), task="regression", verbose=0
    )
    tuner = keras_resmem.tuning.ResMemTuner(
        model, (x[300:], y[300:]), max_trials=5, seed=0, directory=str(tmp_path),
        tensorboard=False,
    )  # fmt: skip
    tuner.search(verbose=0)
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: t.score)
    assert [t.status for t in trials] == ["COMPLETED"] * 5
    best = tuner.oracle.get_best_trials(1)[0]
    assert best.score == trials[0].score  # the lowest MSE wins
    predictions = tuner.get_best_models(1)[0].predict(x[300:], verbose=0)
    np.testing.assert_allclose(np.mean((predictions - y[300:]) ** 2), best.score, rtol=1e-4)
    with pytest.raises(ValueError, match="val_mse"):
        keras_resmem.tuning.ResMemTuner(
            model, (x[300:], y[300:]), objective="val_accuracy", directory=str(tmp_path)
        )


def test_tuner_takes_tf_data_and_one_hot_labels(rng, tmp_path):
    x = rng.normal(size=(400, 4)).astype("float32")
    y = rng.integers(0, 3, 400)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", name="pre_logits")(inputs)
    model = keras_resmem.attach_memory(
        keras.Model(inputs, keras.layers.Dense(3)(h)), "pre_logits", (x[:300], y[:300]), verbose=0
    )
    scores = {}
    for name, data in {
        "arrays": (x[300:], y[300:]),
        "one_hot": (x[300:], np.eye(3)[y[300:]]),
        "dataset": tf.data.Dataset.from_tensor_slices((x[300:], y[300:])).batch(32),
        "unbatched": tf.data.Dataset.from_tensor_slices((x[300:], np.eye(3)[y[300:]])),
    }.items():
        tuner = keras_resmem.tuning.ResMemTuner(
            model, data, max_trials=3, seed=1, directory=str(tmp_path), project_name=name,
            tensorboard=False,
        )  # fmt: skip
        tuner.search(verbose=0)
        scores[name] = sorted(t.score for t in tuner.oracle.trials.values())
    assert all(s == scores["arrays"] for s in scores.values()), scores


def test_tuner_chooses_the_key_layer_on_validation(tmp_path):
    # The label is in the input's first two features; the "noise" layer
    # sees only the other eight, so its neighbours carry no label.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 10)).astype("float32")
    y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0).astype(int)
    inputs = keras.Input((10,))
    signal = keras.layers.Dense(6, activation="tanh", name="signal")(inputs[:, :2] * 1.0)
    noise = keras.layers.Dense(6, activation="tanh", name="noise")(inputs[:, 2:] * 1.0)
    h = keras.layers.Concatenate()([signal * 0.0, noise])  # the network itself is weak
    base = keras.Model(inputs, keras.layers.Dense(4, name="logits")(h))
    train, val = (x[:400], y[:400]), (x[400:], y[400:])
    model = keras_resmem.attach_memory(base, "noise", train, k=5, verbose=0)
    with pytest.raises(ValueError, match="pass `train_data`"):
        tuning.ResMemTuner(model, val, layers=["signal", "noise"], directory=tmp_path)
    oracle = keras_tuner.oracles.GridSearchOracle(
        objective=keras_tuner.Objective("val_accuracy", "max"), max_trials=100
    )
    hp = keras_tuner.HyperParameters()
    hp.Choice("layer", ["signal", "noise"])
    hp.Choice("k", [5])
    hp.Choice("sigma_scale", [1.0])
    hp.Fixed("temperature", 1.0)
    tuner = tuning.ResMemTuner(
        model, val, layers=["signal", "noise"], train_data=train, oracle=oracle,
        hyperparameters=hp, directory=tmp_path, tensorboard=False,
    )  # fmt: skip
    assert tuner.candidates["noise"][0] is model  # its own memory is reused
    tuner.search(verbose=0)
    by_layer = {
        t.hyperparameters.values["layer"]: t.metrics.get_last_value("val_accuracy")
        for t in tuner.oracle.trials.values()
    }
    assert by_layer["signal"] > by_layer["noise"] + 0.2
    assert tuner.get_best_hyperparameters()[0].values["layer"] == "signal"
    best = tuner.get_best_models()[0]
    accuracy = float((best.predict(val[0], verbose=0).argmax(-1) == val[1]).mean())
    assert accuracy == pytest.approx(by_layer["signal"])


def test_tuner_chooses_the_key_projection_on_validation(tmp_path):
    # The label is in the input's first two features, of the largest variance;
    # PCA(2) keeps them and drops the eight features of noise.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 10)).astype("float32") * np.float32([3, 3] + [2] * 8)
    y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0).astype(int)
    inputs = keras.Input((10,))
    keys = keras.layers.Activation("linear", name="keys")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(4, name="logits")(keys * 0.0))
    train, val = (x[:400], y[:400]), (x[400:], y[400:])
    model = keras_resmem.attach_memory(base, "keys", train, k=5, verbose=0)
    with pytest.raises(ValueError, match="`key_projections` must be a non-empty list"):
        tuning.ResMemTuner(model, val, key_projections=[], train_data=train, directory=tmp_path)
    oracle = keras_tuner.oracles.GridSearchOracle(
        objective=keras_tuner.Objective("val_accuracy", "max"), max_trials=100
    )
    hp = keras_tuner.HyperParameters()
    hp.Choice("key_projection", [0, 2, 9])
    hp.Choice("k", [5])
    hp.Choice("sigma_scale", [0.5, 2.0])
    hp.Fixed("temperature", 1.0)
    projections = [None, 2, keras_resmem.projection.PCA(9)]
    tuner = tuning.ResMemTuner(
        model, val, key_projections=projections, train_data=train, oracle=oracle,
        hyperparameters=hp, directory=tmp_path, tensorboard=False,
    )  # fmt: skip
    assert tuner.candidates[0][0] is model  # its own memory is reused
    assert tuner.candidates[2][1].stored_key_dim == 2
    assert "key_projection" in tuner.default_hyperparameters()
    tuner.search(verbose=0)
    by_dim = {}
    for t in tuner.oracle.trials.values():
        dim = t.hyperparameters.values["key_projection"]
        by_dim[dim] = max(by_dim.get(dim, 0), t.metrics.get_last_value("val_accuracy"))
    assert by_dim[2] > max(by_dim[0], by_dim[9]) + 0.05
    best_values = tuner.get_best_hyperparameters()[0].values
    assert best_values["key_projection"] == 2
    best = tuner.get_best_models()[0]
    accuracy = float((best.predict(val[0], verbose=0).argmax(-1) == val[1]).mean())
    assert accuracy == pytest.approx(by_dim[best_values["key_projection"]])
