"""The tuner's objectives: what a trial reports, and the paper's constrained TPR."""

import numpy as np

from keras_resmem.diagnostics import compare

CLASSIFICATION_OBJECTIVES = ("val_accuracy", "val_gain", "val_tpr_at_fpr")
# Regression: errors, lower is better.
REGRESSION_OBJECTIVES = ("val_mse", "val_mae")
OBJECTIVES = CLASSIFICATION_OBJECTIVES + REGRESSION_OBJECTIVES


def direction(objective):
    """`"min"` for an error, `"max"` for the rest."""
    return "min" if objective in REGRESSION_OBJECTIVES else "max"


def constrained_tpr(tpr, fpr, fpr_bound):
    """The paper's conservative objective as one number to maximise.

    `tpr` where `fpr < fpr_bound`; otherwise `-fpr`, which is negative and so
    ranks every setting that breaks the bound below every one that keeps it
    (and, among those that break it, the smaller FPR first). Such a trial is
    ranked, not failed.
    """
    return tpr if fpr < fpr_bound else -fpr


def trial_metrics(y_true, deepnet, resmem_scores, fpr_bound, task="classification"):
    """A trial's validation metrics.

    Classification: from `keras_resmem.compare` of the two predictions.
    Regression: ResMem's mean squared and absolute errors, and DeepNet's.
    """
    if task == "regression":
        y_true = np.asarray(y_true, np.float64).reshape(np.shape(resmem_scores))
        error = np.asarray(resmem_scores, np.float64) - y_true
        return {
            "val_mse": float(np.mean(error**2)),
            "val_mae": float(np.mean(np.abs(error))),
            "val_deepnet_mse": float(np.mean((np.asarray(deepnet) - y_true) ** 2)),
        }
    c = compare(y_true, deepnet, resmem_scores)
    return {
        "val_accuracy": c.resmem_accuracy,
        "val_gain": c.gain,
        "val_tpr": c.tpr,
        "val_fpr": c.fpr,
        "val_tpr_at_fpr": constrained_tpr(c.tpr, c.fpr, fpr_bound),
    }
