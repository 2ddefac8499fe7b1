"""The tuner's objectives: what a trial reports, and the paper's constrained TPR."""

from keras_resmem.diagnostics import compare

OBJECTIVES = ("val_accuracy", "val_gain", "val_tpr_at_fpr")


def constrained_tpr(tpr, fpr, fpr_bound):
    """The paper's conservative objective as one number to maximise.

    `tpr` where `fpr < fpr_bound`; otherwise `-fpr`, which is negative and so
    ranks every setting that breaks the bound below every one that keeps it
    (and, among those that break it, the smaller FPR first). Such a trial is
    ranked, not failed.
    """
    return tpr if fpr < fpr_bound else -fpr


def trial_metrics(y_true, deepnet, resmem_scores, fpr_bound):
    """A trial's validation metrics, from `keras_resmem.compare` of the two predictions."""
    c = compare(y_true, deepnet, resmem_scores)
    return {
        "val_accuracy": c.resmem_accuracy,
        "val_gain": c.gain,
        "val_tpr": c.tpr,
        "val_fpr": c.fpr,
        "val_tpr_at_fpr": constrained_tpr(c.tpr, c.fpr, fpr_bound),
    }
