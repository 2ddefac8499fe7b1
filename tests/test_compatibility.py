"""Files saved by earlier releases load, and predict exactly as they did.

The fixtures under `tests/fixtures/<version>/` were written by
`tests/fixtures/make_fixtures.py` with that release's code and are never
regenerated: a change that breaks them breaks users' saved models.
"""

import json
import os

import keras
import numpy as np
import pytest

import keras_resmem  # noqa: F401  (registers the layer)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "v0_1")
CASES = ("exact", "ivf", "scann", "sparse", "regression")


def _load(name):
    return keras.saving.load_model(os.path.join(FIXTURES, f"{name}.keras"))


@pytest.mark.parametrize("name", CASES)
def test_v0_1_file_loads_and_predicts_identically(name):
    queries = np.load(os.path.join(FIXTURES, "queries.npy"))
    model = _load(name)
    expected = np.load(os.path.join(FIXTURES, f"{name}_predictions.npy"))
    np.testing.assert_allclose(model.predict(queries, verbose=0), expected, rtol=1e-6, atol=1e-6)
    memory = model.get_layer("residual_memory")
    features = keras.Model(model.inputs, memory.input)
    _, ids, _ = memory(list(features(queries)), return_neighbors=True)
    np.testing.assert_array_equal(
        np.asarray(ids), np.load(os.path.join(FIXTURES, f"{name}_neighbor_ids.npy"))
    )


@pytest.mark.parametrize("name", CASES)
def test_v0_1_hyperparameters_survive(name):
    with open(os.path.join(FIXTURES, "fixtures.json")) as f:
        saved = json.load(f)[name]["config"]
    memory = _load(name).get_layer("residual_memory")
    for key in ("k", "sigma", "temperature", "task", "from_logits", "sparse_residuals"):
        assert getattr(memory, key) == saved[key], key
