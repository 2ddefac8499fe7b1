import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tuning"))
import sweep_fashion_mnist  # noqa: E402


def test_sweep_script_small_run(tmp_path):
    args = ["--max-epochs", "1", "--train-size", "2000", "--val-size", "800", "--trials", "4"]
    results = sweep_fashion_mnist.main([*args, "--output-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["val_tpr_at_fpr"]["best"] == results["val_tpr_at_fpr"]["best"]
    for objective in ("val_accuracy", "val_tpr_at_fpr", "any_method"):
        assert saved[objective]["trials"] == 4
        assert 0 <= saved[objective]["test"]["fpr"] <= 1
    assert (tmp_path / "sensitivity.png").stat().st_size > 10_000
    assert len((tmp_path / "trials.csv").read_text().splitlines()) == 1 + 3 * 4
    assert saved["training"]["epochs_run"] == 1
    assert saved["any_method"]["best"]["method"] in ("resmem", "knn", "interpolation")
    assert set(saved["sensitivity"]) == {"k", "sigma", "temperature"}
