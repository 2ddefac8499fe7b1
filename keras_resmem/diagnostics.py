"""Where ResMem's gain comes from: the TPR / FPR decomposition (Section 4.2), and the
examples ResMem fixed and broke, with the neighbours that drove each change (Figure 2).
"""

import dataclasses

import keras
import numpy as np

from keras_resmem import _io
from keras_resmem.api_export import keras_resmem_export
from keras_resmem.lifecycle import find_memory


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
    ResMem wrong} / m`, `gain = TPR - FPR`. Pass a dict as `resmem` to compare
    several methods with DeepNet at once (for example ResMem and the kNN
    baselines, `ResidualMemory(method=...)`).

    Args:
        y_true: `(m,)` class ids (or one-hot rows).
        deepnet: DeepNet's class ids `(m,)` or scores `(m, c)`.
        resmem: ResMem's class ids `(m,)` or scores `(m, c)`; or a dict from
            a method's name to its class ids or scores.

    Returns:
        A `keras_resmem.Comparison`, or for a dict, a dict from the same
        names to `keras_resmem.Comparison`s.

    Example:

    >>> import keras_resmem
    >>> keras_resmem.compare([0, 1, 2, 3], [0, 1, 0, 0], [0, 0, 2, 3])
    Comparison(deepnet=50.00%, resmem=75.00%, tpr=50.00%, fpr=25.00%, gain=+25.00%, m=4)
    >>> keras_resmem.compare([0, 1, 2, 3], [0, 1, 0, 0], {"knn": [0, 1, 2, 0]})["knn"].gain
    0.25
    """
    if isinstance(resmem, dict):
        return {name: compare(y_true, deepnet, values) for name, values in resmem.items()}
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


@dataclasses.dataclass(frozen=True)
class ChangedExample:
    """One example whose class ResMem changed, and the neighbours that changed it.

    Attributes:
        index: the example's index in the evaluated set.
        label: its true class.
        deepnet_class: DeepNet's class.
        resmem_class: ResMem's class.
        fixed: `True` if DeepNet was wrong and ResMem right (counts in TPR),
            `False` if DeepNet was right and ResMem wrong (counts in FPR).
        label_rank: the rank of the true class in DeepNet's scores (1 = its
            top class, 2 = a near miss); `None` when DeepNet gave class ids.
        neighbor_ids, neighbor_weights, neighbor_labels: the memory entries
            (training example indices), their weights and labels, nearest
            first; empty when no neighbours were given.
    """

    index: int
    label: int
    deepnet_class: int
    resmem_class: int
    fixed: bool
    label_rank: int | None = None
    neighbor_ids: tuple = ()
    neighbor_weights: tuple = ()
    neighbor_labels: tuple = ()


def changed_examples(
    y_true, deepnet, resmem, neighbor_ids=None, neighbor_weights=None, memory_labels=None
):
    """The examples ResMem fixed (the paper's TPR) and broke (FPR), fixed first.

    Args:
        y_true: `(m,)` class ids (or one-hot rows).
        deepnet, resmem: class ids `(m,)` or scores `(m, c)`. With DeepNet
            scores, each example also gets the rank of its true class.
        neighbor_ids, neighbor_weights: optional `(m, k)` neighbours of each
            example and their weights (`neighbors_of` gives them).
        memory_labels: optional labels of the memory entries indexed by
            entry id, to report the neighbours' labels: with default ids
            (positions in the training data), the training labels.

    Returns:
        A list of `ChangedExample`: the fixed ones, then the broken ones, each
        in index order.

    Example:

    >>> from keras_resmem import diagnostics
    >>> changed = diagnostics.changed_examples([0, 1, 2], [0, 0, 2], [0, 1, 1])
    >>> [(c.index, c.deepnet_class, c.resmem_class, c.fixed) for c in changed]
    [(1, 0, 1, True), (2, 2, 1, False)]
    """
    y = _as_classes("y_true", y_true)
    m = len(y)
    deep = _as_classes("deepnet", deepnet, m)
    res = _as_classes("resmem", resmem, m)
    deep_scores = np.asarray(deepnet)
    ranks = None
    if deep_scores.ndim == 2:
        true_score = deep_scores[np.arange(m), y]
        ranks = 1 + (deep_scores > true_score[:, None]).sum(axis=1)
    for name, value in (("neighbor_ids", neighbor_ids), ("neighbor_weights", neighbor_weights)):
        if value is not None and len(value) != m:
            raise ValueError(f"`{name}` has {len(value)} rows; `y_true` has {m}.")
    if memory_labels is not None and neighbor_ids is None:
        raise ValueError("`memory_labels` needs `neighbor_ids`.")
    ids = None if neighbor_ids is None else np.asarray(neighbor_ids)
    weights = None if neighbor_weights is None else np.asarray(neighbor_weights)
    labels = None if memory_labels is None else np.asarray(memory_labels)
    if (
        labels is not None
        and ids is not None
        and ids.size
        and not 0 <= ids.min() <= ids.max() < len(labels)
    ):
        raise ValueError(
            f"`memory_labels` is indexed by neighbour id, but it has {len(labels)} rows and "
            f"the neighbour ids run from {ids.min()} to {ids.max()}. Pass labels indexed by "
            "entry id (with default ids: the training labels)."
        )
    out = []
    for fixed, mask in ((True, (deep != y) & (res == y)), (False, (deep == y) & (res != y))):
        for i in np.flatnonzero(mask):
            out.append(
                ChangedExample(
                    index=int(i),
                    label=int(y[i]),
                    deepnet_class=int(deep[i]),
                    resmem_class=int(res[i]),
                    fixed=fixed,
                    label_rank=None if ranks is None else int(ranks[i]),
                    neighbor_ids=() if ids is None else tuple(int(v) for v in ids[i]),
                    neighbor_weights=() if weights is None else tuple(float(v) for v in weights[i]),
                    neighbor_labels=() if labels is None else tuple(int(v) for v in labels[ids[i]]),
                )
            )
    return out


def neighbors_of(model, x, batch_size=256):
    """The memory neighbours of inputs `x` in a ResMem model: `(ids, weights)`.

    Args:
        model: a model holding one `ResidualMemory` (from `attach_memory`).
        x: inputs of the model.
        batch_size: prediction batch size.

    Returns:
        `(ids, weights)`, numpy arrays `(m, k)`, nearest first; ids index the
        memory, which `attach_memory` fills in the order of the training data.

    Example:

    >>> import keras, numpy as np
    >>> import keras_resmem
    >>> inputs = keras.Input((2,))
    >>> h = keras.layers.Dense(4, name="pre_logits")(inputs)
    >>> base = keras.Model(inputs, keras.layers.Dense(2)(h))
    >>> x = np.random.default_rng(0).normal(size=(20, 2)).astype("float32")
    >>> model = keras_resmem.attach_memory(base, "pre_logits", (x, np.arange(20) % 2),
    ...                                    k=3, verbose=0)
    >>> ids, weights = keras_resmem.diagnostics.neighbors_of(model, x[:2])
    >>> ids[:, 0]  # each training example is its own nearest neighbour
    array([0, 1])
    """
    memory = find_memory(model)
    features = keras.Model(model.inputs, memory.input[0])
    embeddings = features.predict(x, batch_size=batch_size, verbose=0)
    ids, weights = [], []
    for start in range(0, len(embeddings), batch_size):
        batch_ids, _, batch_weights = memory.neighbors(embeddings[start : start + batch_size])
        ids.append(batch_ids.numpy())
        weights.append(batch_weights.numpy())
    return np.concatenate(ids), np.concatenate(weights)


def plot_changed_examples(
    examples, images, memory_images, path, *, max_rows=8, neighbors_shown=5, class_names=None
):
    """A PNG grid of changed examples and their nearest memory entries (the paper's Figure 2).

    Each row shows one example (true class, DeepNet's class, ResMem's class)
    and its `neighbors_shown` nearest memory entries with their labels and
    weights. Fixed examples come first. Images are drawn as images; rows of
    tabular features `(d,)` as a bar per feature.

    Args:
        examples: `ChangedExample`s with neighbours (from `changed_examples`).
        images: the evaluated images (or feature rows), indexed by
            `ChangedExample.index`.
        memory_images: the training images (or feature rows), indexed by
            entry id (with default ids: the training images).
        path: the PNG file to write (atomically).
        max_rows: at most this many examples.
        neighbors_shown: neighbours per row.
        class_names: optional names of the classes.

    Returns:
        `path`.

    Example:

    >>> import numpy as np, tempfile
    >>> from keras_resmem import diagnostics
    >>> images = np.random.default_rng(0).random((4, 8, 8))
    >>> changed = diagnostics.changed_examples(
    ...     [1, 0], [0, 0], [1, 1], neighbor_ids=[[2, 3], [3, 2]],
    ...     neighbor_weights=[[0.6, 0.4], [0.5, 0.5]], memory_labels=[0, 0, 1, 1])
    >>> path = diagnostics.plot_changed_examples(
    ...     changed, images[:2], images, tempfile.mkdtemp() + "/changed.png", neighbors_shown=2)
    >>> path.endswith("changed.png")
    True
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the examples extra
        raise ImportError(
            "plot_changed_examples needs matplotlib: `pip install 'keras-resmem[examples]'`."
        ) from e

    examples = list(examples)[:max_rows]
    if not examples:
        raise ValueError("`examples` is empty: there is nothing to plot.")
    if any(not e.neighbor_ids for e in examples):
        raise ValueError(
            "The examples carry no neighbours; pass `neighbor_ids` to `changed_examples`."
        )
    name = (lambda c: class_names[c]) if class_names else str
    cols = 1 + neighbors_shown
    fig, axes = plt.subplots(
        len(examples), cols, figsize=(1.4 * cols, 1.6 * len(examples)), squeeze=False
    )
    for row, ex in zip(axes, examples, strict=True):
        verb = "fixed" if ex.fixed else "broke"
        _show(row[0], images[ex.index])
        row[0].set_title(
            f"{verb} #{ex.index}\ntrue {name(ex.label)}\n"
            f"{name(ex.deepnet_class)} -> {name(ex.resmem_class)}",
            fontsize=6,
            color="green" if ex.fixed else "red",
        )
        for j, ax in enumerate(row[1:]):
            if j >= len(ex.neighbor_ids):
                ax.axis("off")
                continue
            _show(ax, memory_images[ex.neighbor_ids[j]])
            label = name(ex.neighbor_labels[j]) if ex.neighbor_labels else "?"
            ax.set_title(f"{label}\nw={ex.neighbor_weights[j]:.2f}", fontsize=6)
    fig.tight_layout()
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def _show(ax, row):
    """An image as an image; a feature row (tabular data) as a bar per feature."""
    row = np.asarray(row)
    if row.ndim == 3 and row.shape[-1] == 1:
        row = row[..., 0]
    if row.ndim == 1:
        ax.bar(np.arange(len(row)), row, width=1.0, color="0.3")
        ax.axhline(0, color="0.7", linewidth=0.5)
    elif row.ndim == 2 or (row.ndim == 3 and row.shape[-1] in (3, 4)):
        ax.imshow(row, cmap="gray" if row.ndim == 2 else None)
    else:
        raise ValueError(
            "plot_changed_examples draws images (h, w), (h, w, 1), (h, w, 3) or (h, w, 4), "
            f"and feature rows (d,) as bars. Received an example of shape {row.shape}; "
            "pass one of those (for example, a reshaped view) as `images` and `memory_images`."
        )
    ax.set_xticks([])
    ax.set_yticks([])
