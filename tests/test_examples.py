import json
import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import fashion_mnist  # noqa: E402


def test_fashion_mnist_main_job_small_run(tmp_path):
    results = fashion_mnist.main(
        [
            "--epochs",
            "1",
            "--train-size",
            "3000",
            "--val-size",
            "1000",
            "--output-dir",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"] == results["test"]
    assert saved["memory_entries"] == 3000
    assert "| ResMem |" in (tmp_path / "results.md").read_text()
    test = saved["test"]
    assert test["gain"] == pytest.approx(test["resmem_accuracy"] - test["deepnet_accuracy"])
    model = keras.models.load_model(tmp_path / "resmem.keras")
    assert model.get_layer("residual_memory").k == saved["chosen"]["k"]
    assert saved["export"]["mode"] == "portable"
    assert saved["export"]["class_agreement_256_test_images"] == 1.0
    assert (tmp_path / "saved_model" / "1" / "saved_model.pb").exists()


@pytest.mark.large
def test_fashion_mnist_main_job_full_run(tmp_path):
    """The foundation issue's bar: >= 3 points over DeepNet with a <= 20k-parameter CNN."""
    results = fashion_mnist.main(["--output-dir", str(tmp_path)])
    assert results["deepnet_parameters"] <= 20_000
    assert results["test"]["gain"] >= 0.03
    assert results["train"]["resmem_accuracy"] >= 0.99
    assert np.isfinite(results["test"]["knn_labels_accuracy"])
