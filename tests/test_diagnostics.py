import numpy as np
import pytest

import keras_resmem


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
