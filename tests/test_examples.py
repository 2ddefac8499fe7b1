import json
import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import fashion_mnist  # noqa: E402
import linear_regression_theory as theory  # noqa: E402


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


def test_constrained_least_squares_is_on_the_ball_and_beats_feasible_points(rng):
    x = rng.normal(size=(200, 5))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0, 1.0]) + 0.1 * rng.normal(size=200)
    theta = theory.constrained_least_squares(x, y, 0.7)
    assert np.linalg.norm(theta) == pytest.approx(0.7, rel=1e-6)
    loss = lambda t: np.sum((x @ t - y) ** 2)  # noqa: E731
    for _ in range(200):
        other = rng.normal(size=5)
        other *= 0.7 / np.linalg.norm(other) * rng.random()
        assert loss(theta) <= loss(other) + 1e-9
    unconstrained = np.linalg.lstsq(x, y, rcond=None)[0]
    np.testing.assert_allclose(theory.constrained_least_squares(x, y, 100.0), unconstrained)


def test_theory_example_small_run(tmp_path):
    results = theory.main(
        [
            "--dims",
            "2",
            "--ns",
            "100,1000,3000",
            "--seeds",
            "1",
            "--test-size",
            "500",
            "--output-dir",
            str(tmp_path),
        ]
    )
    by_n = {r["n"]: r for r in results["risks"]}
    assert by_n[3000]["base"] == pytest.approx(0.25, rel=0.2)  # plateaus near (1 - L)^2
    assert by_n[3000]["resmem"] < by_n[100]["resmem"] < by_n[100]["base"]
    assert by_n[3000]["resmem"] < by_n[3000]["nn_labels"]
    assert results["slopes"]["2"]["resmem"] < -0.5
    assert (tmp_path / "risk_vs_n.png").exists() and (tmp_path / "results.md").exists()
