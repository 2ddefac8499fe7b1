import numpy as np
import pytest

import keras_resmem
from keras_resmem import diagnostics


def test_compare_against_hand_computed_counts():
    y = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    deep = np.array([0, 1, 2, 3, 4, 0, 0, 0, 0, 9])  # right on 0-4 and 9
    res = np.array([0, 1, 2, 0, 4, 5, 6, 0, 0, 9])  # fixes 5, 6; breaks 3
    c = keras_resmem.compare(y, deep, res)
    assert c.deepnet_accuracy == pytest.approx(0.6)
    assert c.resmem_accuracy == pytest.approx(0.7)
    assert c.tpr == pytest.approx(0.2)
    assert c.fpr == pytest.approx(0.1)
    assert c.gain == pytest.approx(0.1)
    assert c.gain == pytest.approx(c.resmem_accuracy - c.deepnet_accuracy)
    assert c.num_examples == 10
    assert "tpr=20.00%" in repr(c)


def test_compare_accepts_scores_and_one_hot():
    y = np.eye(3)[[0, 1, 2]]
    deep = np.array([[0.9, 0.1, 0], [0.8, 0.2, 0], [0, 0, 1]])
    res = np.array([[0.9, 0.1, 0], [0.1, 0.9, 0], [1, 0, 0]])
    c = keras_resmem.compare(y, deep, res)
    assert (c.tpr, c.fpr) == pytest.approx((1 / 3, 1 / 3))


def test_compare_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="`resmem` has 2 examples; `y_true` has 3"):
        keras_resmem.compare([0, 1, 2], [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        keras_resmem.compare([], [], [])


def test_changed_examples_by_hand():
    y = [0, 1, 2, 3, 1]
    # DeepNet scores: example 1's true class (1) is DeepNet's 2nd choice, example 3's (3) its 4th.
    deepnet = np.array(
        [
            [0.9, 0.1, 0.0, 0.0],  # 0: right, ResMem right: unchanged
            [0.6, 0.3, 0.1, 0.0],  # 1: wrong (0), ResMem 1: fixed, rank 2
            [0.1, 0.2, 0.7, 0.0],  # 2: right, ResMem 1: broke, rank 1
            [0.1, 0.5, 0.3, 0.05],  # 3: wrong (1), ResMem 3: fixed, rank 4
            [0.5, 0.2, 0.2, 0.1],  # 4: wrong (0), ResMem 2: still wrong, not listed
        ]
    )
    resmem = [0, 1, 1, 3, 2]
    ids = np.array([[0, 1], [4, 2], [3, 0], [1, 2], [0, 0]])
    weights = np.array([[0.5, 0.5], [0.7, 0.3], [0.9, 0.1], [0.6, 0.4], [1.0, 0.0]])
    memory_labels = np.array([0, 3, 1, 1, 1])
    changed = diagnostics.changed_examples(y, deepnet, resmem, ids, weights, memory_labels)
    assert [(c.index, c.fixed, c.deepnet_class, c.resmem_class, c.label_rank) for c in changed] == [
        (1, True, 0, 1, 2),
        (3, True, 1, 3, 4),
        (2, False, 2, 1, 1),
    ]
    assert changed[0].neighbor_ids == (4, 2)
    assert changed[0].neighbor_labels == (1, 1)  # both neighbours carry the true label
    assert changed[0].neighbor_weights == (0.7, 0.3)
    assert changed[2].neighbor_labels == (1, 0)
    # Consistent with the TPR / FPR decomposition.
    comparison = keras_resmem.compare(y, deepnet, resmem)
    assert sum(c.fixed for c in changed) / 5 == comparison.tpr
    assert sum(not c.fixed for c in changed) / 5 == comparison.fpr
    with pytest.raises(ValueError, match="`neighbor_ids` has 2 rows; `y_true` has 5"):
        diagnostics.changed_examples(y, deepnet, resmem, ids[:2])
    with pytest.raises(ValueError, match="`memory_labels` needs `neighbor_ids`"):
        diagnostics.changed_examples(y, deepnet, resmem, memory_labels=memory_labels)


def test_neighbors_and_figure_from_a_resmem_model(rng, tmp_path):
    import keras

    inputs = keras.Input((4, 4, 1))
    h = keras.layers.Flatten(name="flat")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(3)(h))
    x = rng.random((60, 4, 4, 1)).astype("float32")
    y = rng.integers(0, 3, 60)
    model = keras_resmem.attach_memory(base, "flat", (x, y), k=3, sigma=0.01, verbose=0)
    ids, weights = diagnostics.neighbors_of(model, x[:10], batch_size=4)
    assert ids.shape == weights.shape == (10, 3)
    np.testing.assert_array_equal(ids[:, 0], np.arange(10))  # a training image is its own nearest
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    resmem = model.predict(x[:10], verbose=0)
    deepnet = base.predict(x[:10], verbose=0)
    memory = model.get_layer("residual_memory")
    changed = diagnostics.changed_examples(
        y[:10], deepnet, resmem, ids, weights, memory.memory_targets.numpy()
    )
    assert changed and all(c.fixed for c in changed)  # sigma=0.01: ResMem returns the label
    path = diagnostics.plot_changed_examples(changed, x, x, tmp_path / "fig.png", neighbors_shown=3)
    import matplotlib.pyplot as plt

    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50
    with pytest.raises(ValueError, match="carry no neighbours"):
        diagnostics.plot_changed_examples(
            diagnostics.changed_examples(y[:10], deepnet, resmem), x, x, tmp_path / "f.png"
        )


def test_plot_changed_examples_draws_feature_rows_and_refuses_other_shapes(tmp_path):
    changed = diagnostics.changed_examples(
        [1, 0], [0, 0], [1, 1], neighbor_ids=[[2, 3], [3, 2]],
        neighbor_weights=[[0.6, 0.4], [0.5, 0.5]], memory_labels=[0, 0, 1, 1],
    )  # fmt: skip
    rows = np.random.default_rng(0).normal(size=(4, 16))  # tabular: 16 features
    path = diagnostics.plot_changed_examples(
        changed, rows[:2], rows, str(tmp_path / "rows.png"), neighbors_shown=2
    )
    assert path.endswith("rows.png")
    volumes = np.zeros((4, 2, 3, 5, 7))
    with pytest.raises(ValueError, match=r"Received an example of shape \(2, 3, 5, 7\)"):
        diagnostics.plot_changed_examples(
            changed, volumes[:2], volumes, str(tmp_path / "v.png"), neighbors_shown=2
        )
    assert not (tmp_path / "v.png").exists()
