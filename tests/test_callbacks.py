import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resmem


def _base():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu", name="pre_logits")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4)(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data(rng, n=500):
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] * x[:, 2] > 0.3)
    return x, y


def test_logged_accuracy_equals_a_memory_built_after_training(rng):
    x, y = _data(rng)
    train, val = (x[:400], y[:400]), (x[400:], y[400:])
    base = _base()
    watch = keras_resmem.callbacks.ResidualMemoryCallback(
        "pre_logits", train, val, k=10, sigma=0.5, search="exact"
    )
    history = base.fit(*train, epochs=3, batch_size=64, callbacks=[watch], verbose=0)
    logged = history.history
    assert len(logged["val_resmem_accuracy"]) == 3
    model = keras_resmem.attach_memory(
        base, "pre_logits", train, k=10, sigma=0.5, search="exact", verbose=0
    )
    after = keras_resmem.compare(
        val[1], base.predict(val[0], verbose=0), model.predict(val[0], verbose=0)
    )
    assert logged["val_resmem_accuracy"][-1] == after.resmem_accuracy
    assert logged["val_resmem_gain"][-1] == pytest.approx(after.gain)
    assert logged["val_resmem_tpr"][-1] == after.tpr and logged["val_resmem_fpr"][-1] == after.fpr


def test_every_and_tf_data_and_regression(rng):
    x, y = _data(rng)
    base = _base()
    val = tf.data.Dataset.from_tensor_slices((x[400:], np.eye(4)[y[400:]])).batch(32)
    watch = keras_resmem.callbacks.ResidualMemoryCallback(
        "pre_logits", (x[:400], y[:400]), val, every=2, k=5
    )
    history = base.fit(x[:400], y[:400], epochs=4, callbacks=[watch], verbose=0)
    # Keras's History keeps a key from the first epoch that logs it on.
    assert len(history.history["val_resmem_accuracy"]) == 2
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="pre_logits")(inputs)
    reg = keras.Model(inputs, keras.layers.Dense(1)(h))
    reg.compile("adam", "mse")
    t = x[:, :1] * 2
    watch = keras_resmem.callbacks.ResidualMemoryCallback(
        "pre_logits", (x[:400], t[:400]), (x[400:], t[400:]), task="regression", k=5
    )
    history = reg.fit(x[:400], t[:400], epochs=2, callbacks=[watch], verbose=0)
    assert len(history.history["val_resmem_mse"]) == 2
    with pytest.raises(ValueError, match="every"):
        keras_resmem.callbacks.ResidualMemoryCallback("pre_logits", (x, y), (x, y), every=0)
