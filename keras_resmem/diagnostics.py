"""Where ResMem's gain comes from: the TPR / FPR decomposition of the paper (Section 4.2)."""

import dataclasses

import numpy as np

from keras_resmem.api_export import keras_resmem_export


@keras_resmem_export("keras_resmem.Comparison")
@dataclasses.dataclass(frozen=True)
class Comparison:
    """DeepNet against ResMem on one labelled set.

    Attributes:
        deepnet_accuracy: fraction of examples DeepNet gets right.
        resmem_accuracy: fraction ResMem gets right.
        tpr: fraction DeepNet got wrong and ResMem fixed.
        fpr: fraction DeepNet got right and ResMem broke.
        num_examples: the number of examples `m`.
    """

    deepnet_accuracy: float
    resmem_accuracy: float
    tpr: float
    fpr: float
    num_examples: int

    @property
    def gain(self):
        """`tpr - fpr`, which equals `resmem_accuracy - deepnet_accuracy`."""
        return self.tpr - self.fpr

    def __repr__(self):
        return (
            f"Comparison(deepnet={self.deepnet_accuracy:.2%}, resmem={self.resmem_accuracy:.2%}, "
            f"tpr={self.tpr:.2%}, fpr={self.fpr:.2%}, gain={self.gain:+.2%}, m={self.num_examples})"
        )


def _as_classes(name, values, m=None):
    values = np.asarray(values)
    if values.ndim == 2:
        values = values.argmax(axis=-1)
    if values.ndim != 1:
        raise ValueError(
            f"`{name}` must be class ids (m,) or scores (m, c). Received shape {values.shape}"
        )
    if m is not None and len(values) != m:
        raise ValueError(f"`{name}` has {len(values)} examples; `y_true` has {m}.")
    return values


@keras_resmem_export("keras_resmem.compare")
def compare(y_true, deepnet, resmem):
    """TPR, FPR and gain of ResMem over DeepNet, as the paper defines them.

    `TPR = #{DeepNet wrong, ResMem right} / m`, `FPR = #{DeepNet right,
    ResMem wrong} / m`, `gain = TPR - FPR`.

    Args:
        y_true: `(m,)` class ids (or one-hot rows).
        deepnet: DeepNet's class ids `(m,)` or scores `(m, c)`.
        resmem: ResMem's class ids `(m,)` or scores `(m, c)`.

    Returns:
        A `keras_resmem.Comparison`.

    Example:

    >>> import keras_resmem
    >>> keras_resmem.compare([0, 1, 2, 3], [0, 1, 0, 0], [0, 0, 2, 3])
    Comparison(deepnet=50.00%, resmem=75.00%, tpr=50.00%, fpr=25.00%, gain=+25.00%, m=4)
    """
    y_true = _as_classes("y_true", y_true)
    m = len(y_true)
    if m == 0:
        raise ValueError("`y_true` is empty.")
    deep_ok = _as_classes("deepnet", deepnet, m) == y_true
    res_ok = _as_classes("resmem", resmem, m) == y_true
    return Comparison(
        deepnet_accuracy=float(deep_ok.mean()),
        resmem_accuracy=float(res_ok.mean()),
        tpr=float((~deep_ok & res_ok).mean()),
        fpr=float((deep_ok & ~res_ok).mean()),
        num_examples=m,
    )
