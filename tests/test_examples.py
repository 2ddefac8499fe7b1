import json
import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import fashion_mnist  # noqa: E402
import key_projection  # noqa: E402
import language_model  # noqa: E402
import linear_regression_theory as theory  # noqa: E402


def test_fashion_mnist_main_job_small_run(tmp_path):
    results = fashion_mnist.main(
        [
            "--max-epochs", "1", "--train-size", "3000", "--val-size", "1000",
            "--train-eval-size", "500", "--layers", "pre_logits,pool2", "--ks", "5,10",
            "--output-dir", str(tmp_path),
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][0]["test"] == results["runs"][0]["test"]
    run = saved["runs"][0]
    assert run["memory_entries"] == 3000 and run["training"]["epochs_run"] == 1
    assert run["training"]["capped"]  # one epoch: the cap stopped it, and it says so
    text = (tmp_path / "results.md").read_text()
    for label in ("| DeepNet |", "| ResMem |", "| kNN on labels |", "| interpolation |"):
        assert label in text
    for method in ("resmem", "knn", "interpolation"):
        test = run["test"][method]
        assert test["gain"] == pytest.approx(test["accuracy"] - run["test"]["deepnet_accuracy"])
        assert test["gain"] == pytest.approx(test["tpr"] - test["fpr"])
        chosen = run["chosen"][method]
        layer_val = run["per_layer_validation"][chosen["layer"]][method]["val"]
        assert (
            chosen["val_accuracy"]
            == layer_val
            == max(v[method]["val"] for v in run["per_layer_validation"].values())
        )
    model = keras.models.load_model(tmp_path / "resmem.keras")
    memory = model.get_layer("residual_memory")
    assert memory.method == "resmem" and memory.k == run["chosen"]["resmem"]["settings"]["k"]
    assert run["export"]["mode"] == "portable"
    assert run["export"]["class_agreement_256_test_images"] == 1.0
    assert (tmp_path / "saved_model" / "1" / "saved_model.pb").exists()


def test_fashion_mnist_several_seeds_give_mean_and_spread(tmp_path):
    args = "--max-epochs 1 --train-size 1000 --val-size 500 --train-eval-size 200 "
    args += f"--layers pre_logits --ks 5 --seeds 0,1 --output-dir {tmp_path}"
    results = fashion_mnist.main(args.split())
    assert [r["seed"] for r in results["runs"]] == [0, 1]
    assert (tmp_path / "seed0" / "resmem.keras").exists()
    accuracies = [r["test"]["resmem"]["accuracy"] * 100 for r in results["runs"]]
    mean, std = np.mean(accuracies), np.std(accuracies, ddof=1)
    assert f"| ResMem | {mean:.2f} ± {std:.2f}% |" in (tmp_path / "results.md").read_text()


@pytest.mark.large
def test_fashion_mnist_main_job_full_run(tmp_path):
    """The main job converges before its cap, and its memory helps the converged network."""
    results = fashion_mnist.main(["--output-dir", str(tmp_path)])
    run = results["runs"][0]
    assert run["deepnet_parameters"] <= 20_000
    assert not run["training"]["capped"]
    assert run["test"]["resmem"]["gain"] > 0
    assert run["train"]["resmem"]["accuracy"] > run["train"]["deepnet_accuracy"]


def test_key_projection_small_run(tmp_path):
    results = key_projection.main(
        [
            "--max-epochs", "1", "--train-size", "1500", "--val-size", "500", "--dims", "8,32",
            "--ks", "5,10", "--timing-rounds", "2", "--timing-calls", "2",
            "--output-dir", str(tmp_path),
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    run = saved["runs"][0]
    assert run == json.loads(json.dumps(results["runs"][0]))
    assert list(run["configs"]) == ["none (1568-d)", "PCA 8", "PCA 32"]
    full, pca = run["configs"]["none (1568-d)"], run["configs"]["PCA 32"]
    assert full["stored_key_dim"] == 1568 and pca["stored_key_dim"] == 32
    assert full["vs_full"]["bytes"] == 1.0 and pca["vs_full"]["bytes"] < 0.1
    assert pca["storage_bytes"]["projection"] == 1568 * 33 * 4
    assert 0 < run["configs"]["PCA 8"]["explained_variance"] < pca["explained_variance"] < 1
    assert pca["keras_file_bytes"] < full["keras_file_bytes"]
    text = (tmp_path / "results.md").read_text()
    assert "| PCA 32 | 32 |" in text and "| DeepNet (no memory) |" in text


def test_language_model_tiny_run_end_to_end(tmp_path, capsys):
    """A tiny Transformer on 12 real speeches: train to convergence, sparse memory,
    ResMem and the two baselines tuned on val, test."""
    results = language_model.main(
        "--max-speeches 12 --test-speeches 2 --val-speeches 2 --vocab-size 400 --dim 16 "
        "--heads 2 --blocks 1 --length 32 --stride 24 --max-epochs 2 --patience 1 "
        "--sparse-residuals 16 --val-positions 1000 --temperatures 1.0,2.0 "
        f"--output-dir {tmp_path}".split()
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"] == results["test"]
    assert saved["command"].startswith("python examples/language_model.py --max-speeches 12")
    training = saved["training"]
    assert 1 <= training["best_epoch"] <= training["epochs_run"] <= 2
    assert training["capped"] == (training["epochs_run"] == 2 and training["best_epoch"] == 2)
    assert ("WARNING: training hit the 2-epoch cap" in capsys.readouterr().out) == (
        training["capped"]
    )
    assert saved["deepnet"]["max_epochs"] == 2 and saved["deepnet"]["patience"] == 1
    assert list(tmp_path.glob("deepnet_*_me2_p1_*.keras"))
    memory = saved["memory"]
    # Every training position (a token with a next token) is one memory entry.
    assert memory["entries"] == saved["corpus"]["train_tokens"] - 1
    assert memory["bytes"]["residuals"] == memory["entries"] * 16 * 6
    assert memory["bytes_per_entry"] <= memory["bytes_per_entry_bound"]
    test = saved["test"]
    assert test["positions"] == saved["corpus"]["test_tokens"] - 1
    for method in ("resmem", "knn", "interpolation"):
        t = test[method]
        assert t["gain"] == pytest.approx(t["accuracy"] - test["deepnet_accuracy"])
        assert t["gain"] == pytest.approx(t["tpr"] - t["fpr"])
    assert test["resmem_minus_interpolation"] == pytest.approx(
        test["resmem"]["accuracy"] - test["interpolation"]["accuracy"]
    )
    chosen = saved["chosen"]
    assert set(chosen) == {"resmem", "knn", "interpolation"}
    assert chosen["resmem"]["settings"]["k"] in (10, 25, 50, 100, 200, 400)
    assert chosen["resmem"]["settings"]["temperature"] == memory["temperature"]
    assert set(chosen["knn"]["settings"]) == {"k", "sigma"}
    assert chosen["interpolation"]["settings"]["temperature"] in (1.0, 2.0)
    assert 0 < chosen["interpolation"]["settings"]["knn_weight"] < 1
    validation = saved["validation"]
    per_temperature = validation["per_temperature"]
    assert set(per_temperature) == {"1.0", "2.0"}
    assert chosen["resmem"]["val_accuracy"] == max(
        v["resmem"]["val_accuracy"] for v in per_temperature.values()
    )
    for method in ("knn", "interpolation"):
        grid = validation["baselines"][f"{method}_grid"]
        assert chosen[method]["val_accuracy"] == max(grid.values())
    for row in saved["near_misses"]:
        assert row["deepnet"] != row["resmem"]
    text = (tmp_path / "results.md").read_text()
    assert "| context | DeepNet | ResMem |" in text
    for label in ("| DeepNet |", "| ResMem |", "| kNN on labels |", "| kNN-LM interpolation |"):
        assert label in text
    assert "ResMem minus kNN-LM interpolation" in text


def test_sliding_windows_score_every_position_once():
    stream = np.arange(1, 101, dtype=np.int32)
    for length, stride in [(10, 10), (10, 7), (16, 12), (200, 150)]:
        inputs, targets, weights = language_model.sliding_windows(stream, length, stride)
        scored = targets[weights > 0]
        np.testing.assert_array_equal(np.sort(scored), stream[1:])
        # Each scored target follows its input token, with >= length - stride of context
        # (except in the first window).
        np.testing.assert_array_equal(targets[weights > 0], inputs[weights > 0] + 1)
        later = weights[1:]
        assert (later[:, : length - stride] == 0).all()


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


def _fake_cifar100(folder, rng, n):
    """A tiny data set in CIFAR-100's own file format (the tests have no network)."""
    import pickle

    folder.mkdir(parents=True)
    for name, size in (("train", n), ("test", n // 2)):
        batch = {
            b"data": rng.integers(0, 256, (size, 3072), dtype=np.uint8),
            b"fine_labels": [int(v) for v in rng.integers(0, 100, size)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar100_recipe_runs_end_to_end_on_cifar_format_files(rng, tmp_path):
    import cifar100_resnet

    _fake_cifar100(tmp_path / "data" / "cifar-100-python", rng, 256)
    results = cifar100_resnet.main(
        ["--epochs", "1", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path)]
    )
    assert results["epochs_run"] == 1 and results["val_size"] == 51  # 256 // 5
    assert set(results["chosen"]) == {"resmem", "knn", "interpolation"}
    test = results["test"]
    assert test["resmem"]["gain"] == pytest.approx(test["resmem"]["accuracy"] - test["deepnet"])
    assert "| DeepNet (paper, 256 epochs) | 56.46% |" in (tmp_path / "results.md").read_text()
    assert cifar100_resnet.cifar_resnet(8).count_params() < 100_000


def test_cifar100_recipe_loads_through_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import cifar100_resnet

    with tfds.testing.mock_data(num_examples=128):
        (x_train, y_train), (x_test, y_test) = cifar100_resnet.load_cifar100()
    assert x_train.shape == (128, 32, 32, 3) and x_train.dtype == np.uint8
    assert y_train.shape == (128,) and 0 <= y_train.min() <= y_train.max() < 100
    assert x_test.shape == (128, 32, 32, 3)


def test_cifar100_without_data_says_what_to_do(tmp_path, capsys):
    import cifar100_resnet

    with pytest.raises(SystemExit) as exit_info:
        cifar100_resnet.main(["--data-dir", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "pass --data-dir to the folder that holds `cifar-100-python`" in capsys.readouterr().err


def test_learning_rate_schedule_follows_the_paper():
    import cifar100_resnet

    schedule = cifar100_resnet.learning_rate(256, steps_per_epoch=10)
    lr = lambda epoch: float(schedule(epoch * 10))  # noqa: E731
    assert lr(0) == pytest.approx(0.4 / 150)  # linear warm-up over 15 epochs
    assert lr(15) == pytest.approx(0.4)
    assert lr(95.9) == pytest.approx(0.4)
    assert lr(96) == pytest.approx(0.04)
    assert lr(192) == pytest.approx(0.004)
    assert lr(224) == pytest.approx(0.0004)


def test_trends_example_small_run(tmp_path):
    import fashion_mnist_trends as trends

    results = trends.main(
        [
            "--max-epochs", "1", "--noise-max-epochs", "2", "--train-size", "2000",
            "--val-size", "500", "--test-size", "500", "--train-eval-size", "300",
            "--noise-train-size", "300", "--noise-val-size", "100", "--fractions", "0.5,1.0",
            "--widths", "4,16", "--noise", "0,1.0", "--seeds", "0,1", "--output-dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert [r["fraction"] for r in results["data"]] == [0.5, 1.0]
    for row in results["data"]:  # mean and spread over the two seeds
        runs = [r["test_resmem"] for r in row["runs"]]
        assert len(runs) == 2 and row["test_resmem"] == pytest.approx(np.mean(runs))
        assert row["test_resmem_std"] == pytest.approx(np.std(runs, ddof=1))
    # The cap is one epoch of the full data in optimizer steps: two epochs of half of it.
    assert [r["epochs_run"] for r in results["data"]] == [2, 1]
    assert results["data"][0]["train_size"] == 1000
    assert [r["width"] for r in results["width"]] == [4, 16]
    assert results["width"][0]["parameters"] < results["width"][1]["parameters"]
    assert [r["train_size"] for r in results["noise"]] == [300, 300]
    assert results["noise"][1]["epochs_run"] == 2  # fitting random labels: its own cap
    for rows in results.values():
        for r in rows:
            assert r["gain"] == pytest.approx(r["tpr"] - r["fpr"])
            for run in r["runs"]:
                assert run["resmem_minus_best_baseline"] == pytest.approx(
                    run["test_resmem"] - max(run["test_knn"], run["test_interpolation"])
                )
    for name in ("data_size.png", "width.png", "random_labels.png", "near_misses.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "Random labels" in (tmp_path / "results.md").read_text()


def test_randomize_replaces_the_requested_fraction(rng):
    import fashion_mnist_trends as trends

    labels = np.zeros(10000, dtype=np.int32)
    noisy = trends.randomize(labels, 0.5, seed=0)
    changed = (noisy != labels).mean()
    assert 0.5 * 0.9 - 0.02 < changed < 0.5 * 0.9 + 0.02  # 1 in 10 random labels stays 0
    assert (trends.randomize(labels, 0.0, seed=0) == labels).all()


def test_randomized_labels_are_not_the_training_accuracy_subset():
    # Regression: both used default_rng(seed).permutation, so the subset that
    # measured training accuracy was exactly the randomized examples.
    import fashion_mnist_trends as trends

    labels = np.zeros(20000, dtype=np.int32)
    changed = trends.randomize(labels, 0.2, seed=0) != labels
    subset = np.random.default_rng(0).permutation(len(labels))[:5000]
    assert 0.12 < changed[subset].mean() < 0.24  # about 0.2 x 0.9, not ~0.9
