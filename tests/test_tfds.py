"""Data from TensorFlow Datasets (`tfds.load(..., as_supervised=True)`), offline with mock data."""

import keras
import numpy as np
import pytest

import keras_resmem

tfds = pytest.importorskip("tensorflow_datasets")


def _mnist(split, n=128):
    with tfds.testing.mock_data(num_examples=n):
        return tfds.load("mnist", split=split, as_supervised=True)


def _base():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu", name="pre_logits")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def test_as_supervised_data_works_wherever_data_is_accepted(tmp_path):
    train, val = _mnist("train"), _mnist("test", 64)
    base = _base()
    base.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    watch = keras_resmem.callbacks.ResidualMemoryCallback("pre_logits", train, val, k=5)
    history = base.fit(train.batch(32), epochs=1, callbacks=[watch], verbose=0)
    assert len(history.history["val_resmem_accuracy"]) == 1

    model = keras_resmem.attach_memory(base, "pre_logits", train, k=5, verbose=0)
    memory = model.get_layer("residual_memory")
    assert memory.memory_size == 128
    keras_resmem.add_examples(model, val, verbose=0)
    assert memory.memory_size == 192
    keras_resmem.forget(model, np.arange(128, 192))
    keras_resmem.memorize(model, train, verbose=0)
    assert memory.memory_size == 128
    x_val, y_val = (np.stack(a) for a in zip(*tfds.as_numpy(val), strict=True))
    assert model.evaluate(val.batch(32), verbose=0)[1] == pytest.approx(
        float((model.predict(x_val, verbose=0).argmax(-1) == y_val).mean())
    )

    tuner = keras_resmem.tuning.ResMemTuner(model, val, max_trials=2, directory=tmp_path)
    tuner.search(verbose=0)
    assert len(tuner.oracle.trials) == 2
