import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resmem
from tests import numpy_reference as ref
from tests.test_residual_memory import read_shares_the_buffer


def toy_data(rng, n=600, num_classes=3):
    x = rng.normal(size=(n, 8)).astype("float32")
    y = ((x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)).clip(0, num_classes - 1)
    return x, y


def functional_model(softmax=False, num_classes=3):
    inputs = keras.Input((8,))
    h = keras.layers.Dense(6, activation="tanh", name="pre_logits")(inputs)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax" if softmax else None, name="head"
    )(h)
    return keras.Model(inputs, outputs, name="toy")


def test_attach_matches_numpy_reference_and_leaves_base_untouched(rng):
    x, y = toy_data(rng)
    base = functional_model()
    base_weights = [w.copy() for w in base.get_weights()]
    base_layers = [layer.name for layer in base.layers]
    model = keras_resmem.attach_memory(
        base, "pre_logits", (x, y), k=7, sigma=0.3, temperature=1.4, batch_size=64, verbose=0
    )
    features = keras.Model(base.inputs, [base.get_layer("pre_logits").output, base.output])
    keys, logits = features.predict(x, verbose=0)
    queries = rng.normal(size=(40, 8)).astype("float32")
    q_keys, q_logits = features.predict(queries, verbose=0)
    want = ref.resmem_classification(keys, logits, y, q_keys, q_logits, 7, 0.3, 1.4)
    np.testing.assert_allclose(model.predict(queries, verbose=0), want, atol=2e-5)
    assert [layer.name for layer in base.layers] == base_layers
    for before, after in zip(base_weights, base.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    assert model.name == "toy_resmem"
    assert model.get_layer("residual_memory").memory_size == len(x)


def test_softmax_output_is_detected_and_equals_logits_model(rng):
    x, y = toy_data(rng)
    logits_model = functional_model(softmax=False)
    softmax_model = functional_model(softmax=True)
    softmax_model.set_weights(logits_model.get_weights())
    a = keras_resmem.attach_memory(
        logits_model, "pre_logits", (x, y), k=5, temperature=2.0, verbose=0
    )
    b = keras_resmem.attach_memory(
        softmax_model, "pre_logits", (x, y), k=5, temperature=2.0, verbose=0
    )
    assert a.get_layer("residual_memory").from_logits is True
    assert b.get_layer("residual_memory").from_logits is False
    np.testing.assert_allclose(a.predict(x, verbose=0), b.predict(x, verbose=0), atol=1e-5)


def test_sequential_model_and_datasets_batched_or_not(rng):
    x, y = toy_data(rng)
    seq = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(6, name="pre_logits"), keras.layers.Dense(3)]
    )
    from_arrays = keras_resmem.attach_memory(seq, "pre_logits", (x, y), k=3, verbose=0)
    unbatched = tf.data.Dataset.from_tensor_slices((x, y))
    from_unbatched = keras_resmem.attach_memory(seq, "pre_logits", unbatched, k=3, verbose=0)
    onehot = tf.data.Dataset.from_tensor_slices((x, np.eye(3)[y])).batch(50)
    from_onehot = keras_resmem.attach_memory(seq, "pre_logits", onehot, k=3, verbose=0)
    want = from_arrays.predict(x, verbose=0)
    np.testing.assert_allclose(from_unbatched.predict(x, verbose=0), want, atol=1e-6)
    np.testing.assert_allclose(from_onehot.predict(x, verbose=0), want, atol=1e-6)


def test_small_k_and_sigma_give_full_training_accuracy(rng):
    x, y = toy_data(rng)
    base = functional_model()  # untrained: far from fitting the data
    model = keras_resmem.attach_memory(base, "pre_logits", (x, y), k=2, sigma=1e-4, verbose=0)
    assert (base.predict(x, verbose=0).argmax(-1) == y).mean() < 0.9
    assert (model.predict(x, verbose=0).argmax(-1) == y).mean() == 1.0


def test_regression_model(rng):
    x = rng.normal(size=(500, 8)).astype("float32")
    y = np.sin(3 * x[:, :1]) + x[:, 1:2] ** 2
    inputs = keras.Input((8,))
    h = keras.layers.Dense(4, name="pre_logits")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(1)(h))
    base.compile("adam", "mse")
    base.fit(x, y, epochs=3, verbose=0)
    model = keras_resmem.attach_memory(
        base, "pre_logits", (x, y), task="regression", k=3, sigma=0.05, verbose=0
    )
    features = keras.Model(base.inputs, [base.get_layer("pre_logits").output, base.output])
    keys, preds = features.predict(x, verbose=0)
    xq = rng.normal(size=(30, 8)).astype("float32")
    q_keys, q_preds = features.predict(xq, verbose=0)
    want = ref.resmem_regression(keys, preds, y, q_keys, q_preds, 3, 0.05)
    np.testing.assert_allclose(model.predict(xq, verbose=0), want, atol=1e-4)
    base_mse = float(((base.predict(x, verbose=0) - y) ** 2).mean())
    resmem_mse = float(((model.predict(x, verbose=0) - y) ** 2).mean())
    assert resmem_mse < 0.1 * base_mse


def test_unknown_layer_name_lists_valid_names(rng):
    x, y = toy_data(rng)
    with pytest.raises(
        ValueError, match=r"Received: layer_name='prelogits'. Valid names: \[.*'pre_logits'"
    ):
        keras_resmem.attach_memory(functional_model(), "prelogits", (x, y), verbose=0)


def test_subclassed_model_is_refused(rng):
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    x, y = toy_data(rng)
    model = Subclassed()
    model(x[:2])
    with pytest.raises(TypeError, match="functional or Sequential"):
        keras_resmem.attach_memory(model, "dense", (x, y), verbose=0)
    with pytest.raises(TypeError, match="must be a Keras model"):
        keras_resmem.attach_memory(lambda v: v, "dense", (x, y), verbose=0)


def test_labels_that_do_not_match_the_output(rng):
    x, y = toy_data(rng)
    base = functional_model()
    wrong_width = r"outputs of shape \(256, 3\) but labels of shape \(256, 5\)"
    with pytest.raises(ValueError, match=wrong_width):
        keras_resmem.attach_memory(base, "pre_logits", (x, np.eye(5)[y]), verbose=0)
    with pytest.raises(ValueError, match=r"Class ids must lie in \[0, 3\).*label 3 at entry 10"):
        y_bad = y.copy()
        y_bad[10] = 3
        keras_resmem.attach_memory(base, "pre_logits", (x, y_bad), verbose=0)
    with pytest.raises(ValueError, match="soft labels are not supported"):
        keras_resmem.attach_memory(base, "pre_logits", (x, np.full((len(x), 3), 1 / 3)), verbose=0)
    with pytest.raises(ValueError, match="600 examples and 599 rows of labels"):
        keras_resmem.attach_memory(base, "pre_logits", (x, y[:-1]), verbose=0)


def test_k_larger_than_the_memory(rng):
    x, y = toy_data(rng, n=30)
    with pytest.raises(ValueError, match=r"at most the memory size \(30 entries\). Received: k=50"):
        keras_resmem.attach_memory(functional_model(), "pre_logits", (x, y), k=50, verbose=0)


def test_nan_or_infinite_embeddings(rng):
    x, y = toy_data(rng)
    x[123, 0] = np.nan  # tanh(inf) is finite; NaN propagates to the embedding
    with pytest.raises(ValueError, match="NaN or infinite values.*example 123"):
        keras_resmem.attach_memory(
            functional_model(), "pre_logits", (x, y), batch_size=50, verbose=0
        )


def test_empty_data(rng):
    x, y = toy_data(rng)
    empty = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).take(0)
    with pytest.raises(ValueError, match="`data` is empty"):
        keras_resmem.attach_memory(functional_model(), "pre_logits", empty, verbose=0)


def test_bad_options_fail_before_the_pass_over_the_data(rng):
    x, y = toy_data(rng)

    def never():
        raise AssertionError("the data was read before the options were checked")
        yield

    spec = (tf.TensorSpec((None, 8), tf.float32), tf.TensorSpec((None,), tf.int64))
    data = tf.data.Dataset.from_generator(never, output_signature=spec)
    with pytest.raises(ValueError, match="`sigma` must be a positive"):
        keras_resmem.attach_memory(functional_model(), "pre_logits", data, sigma=-1, verbose=0)
    with pytest.raises(ValueError, match="`search` must be one of"):
        keras_resmem.attach_memory(
            functional_model(), "pre_logits", data, search="faiss", verbose=0
        )
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        keras_resmem.attach_memory(
            functional_model(), "pre_logits", (x, y), batch_size=0, verbose=0
        )


def test_memory_from_a_dataset_of_unknown_size_is_read_without_copying_it(rng):
    x, y = toy_data(rng)
    dataset = tf.data.Dataset.from_generator(
        lambda: iter([(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]),
        output_signature=(tf.TensorSpec((None, 8)), tf.TensorSpec((None,), tf.int64)),
    )
    model = keras_resmem.attach_memory(functional_model(), "pre_logits", dataset, verbose=0)
    model.predict(x, verbose=0)
    memory = model.get_layer("residual_memory")
    assert memory.memory_size == len(x)
    for table in (memory.keys, memory.memory_scores, memory.memory_targets):
        assert read_shares_the_buffer(table), table.path


def test_returned_model_is_compiled_for_probabilities(rng):
    x, y = toy_data(rng)
    base = functional_model()
    base.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model = keras_resmem.attach_memory(base, "pre_logits", (x, y), k=5, verbose=0)
    loss, accuracy = model.evaluate(x, y, verbose=0)
    probs = model.predict(x, verbose=0)
    ce = keras.losses.sparse_categorical_crossentropy
    # The loss of probabilities, not of logits (the base model's loss would be wrong).
    np.testing.assert_allclose(loss, np.mean(ce(y, probs, from_logits=False)), rtol=1e-4)
    assert abs(loss - np.mean(ce(y, probs, from_logits=True))) > 0.1
    assert accuracy == pytest.approx(float((probs.argmax(-1) == y).mean()))
    regression = keras_resmem.attach_memory(
        base, "pre_logits", (x, rng.normal(size=(len(x), 3))), task="regression", verbose=0
    )
    assert set(regression.evaluate(x, rng.normal(size=(len(x), 3)), return_dict=True)) == {
        "loss",
        "mean_absolute_error",
    }


def test_attaching_several_memories_prints_no_retracing_warning(rng, caplog):
    x, y = toy_data(rng, n=200)
    base = functional_model()
    with caplog.at_level("WARNING", logger="tensorflow"):
        for k in range(1, 8):
            model = keras_resmem.attach_memory(base, "pre_logits", (x, y), k=k, verbose=0)
            model.get_layer("residual_memory").neighbors(np.zeros((3, 6), "float32"))
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]


def _transfer_model(num_classes=3):
    """A backbone model nested in the outer model, as transfer learning builds it."""
    inputs = keras.Input((8,), name="image")
    h = keras.layers.Dense(8, activation="relu", name="block1")(inputs)
    h = keras.layers.Dense(6, activation="relu", name="block2")(h)
    backbone = keras.Model(inputs, h, name="backbone")
    outer = keras.Input((8,), name="x")
    z = keras.layers.Dense(5, activation="tanh", name="head")(backbone(outer))
    return keras.Model(outer, keras.layers.Dense(num_classes)(z), name="transfer")


@pytest.mark.parametrize(
    "layer_name,inner",
    [("backbone", "block2"), ("block1", "block1"), ("backbone/block2", "block2")],
)
def test_key_layer_can_be_a_nested_model_or_inside_one(rng, tmp_path, layer_name, inner):
    x, y = toy_data(rng)
    base = _transfer_model()
    model = keras_resmem.attach_memory(base, layer_name, (x, y), k=7, sigma=0.3, verbose=0)
    backbone = base.get_layer("backbone")
    keys = keras.Model(backbone.inputs, backbone.get_layer(inner).output).predict(x, verbose=0)
    logits = base.predict(x, verbose=0)
    want = ref.resmem_classification(keys, logits, y, keys[:50], logits[:50], 7, 0.3, 1.0)
    np.testing.assert_allclose(model.predict(x[:50], verbose=0), want, atol=2e-5)
    model.save(tmp_path / "transfer.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no optimizer-loading warning from the compiled model
        loaded = keras.saving.load_model(tmp_path / "transfer.keras")
    np.testing.assert_allclose(loaded.predict(x[:50], verbose=0), want, atol=2e-5)


def test_unknown_or_ambiguous_nested_layer_names(rng):
    x, y = toy_data(rng)
    base = _transfer_model()
    with pytest.raises(ValueError, match=r"Valid names: \[.*'backbone/block1'"):
        keras_resmem.attach_memory(base, "block9", (x, y), verbose=0)
