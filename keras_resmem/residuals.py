"""The paper's residual formulas, in TensorFlow ops.

Classification: `r = onehot(y) - softmax(logits / T)`, prediction
`softmax(logits / T) + r_kNN`. Regression: `r = y - f(x)`, prediction
`f(x) + r_kNN`. A dense memory computes residuals from the stored network
outputs when a neighbour is used, so changing `T` never needs another pass of
the network over the training set. A sparse memory (for outputs as wide as a
vocabulary) stores each residual's `m` largest-magnitude entries instead, with
`T` fixed when it is built; the entries not stored count as zero.

The same neighbours also give the two baselines a user should weigh ResMem
against: a kNN on the labels, `p_kNN = sum_i w_i onehot(y_i)` (regression:
`sum_i w_i y_i`), and kNN-LM-style interpolation (Khandelwal et al., 2020),
`(1 - lambda) softmax(logits / T) + lambda p_kNN`.
"""

import tensorflow as tf

TASKS = ("classification", "regression")
# How a memory's neighbours are combined with the network (see `combine`).
METHODS = ("resmem", "knn", "interpolation")
# log(p) for p = 0 (float32 softmax underflow); exp(-87) is float32's smallest normal.
_MIN_LOG_PROB = -87.0


def to_logits(scores, from_logits):
    """Logits from network scores; for probabilities, `log(p)`.

    `softmax(log(p) / T) == softmax(z / T)` for `p = softmax(z)`, because `log(p)`
    differs from `z` by one constant per row; so a model that ends in a softmax
    gets exactly the temperature scaling of its logits.
    """
    if from_logits:
        return scores
    return tf.maximum(tf.math.log(scores), _MIN_LOG_PROB)


def base_prediction(scores, *, task, temperature, from_logits):
    """The DeepNet part of the prediction: `softmax(logits / T)` or `f(x)`."""
    if task == "regression":
        return scores
    return tf.nn.softmax(to_logits(scores, from_logits) / temperature, axis=-1)


def residuals(scores, targets, *, task, temperature, from_logits):
    """Residuals of memory entries from their stored scores and targets.

    Args:
        scores: `(..., c)` network outputs of the entries.
        targets: int class ids `(...)` for classification, `(..., c)` for regression.
    """
    base = base_prediction(scores, task=task, temperature=temperature, from_logits=from_logits)
    if task == "regression":
        return targets - base
    return tf.one_hot(targets, tf.shape(scores)[-1], dtype=base.dtype) - base


def neighbor_weights(distances, sigma):
    """`exp(-d / sigma)` normalised over the k neighbours (nearest first).

    Computed as `softmax(-d / sigma)`, the same value without the underflow to
    0 / 0 when every neighbour is far away.
    """
    return tf.nn.softmax(-distances / sigma, axis=-1)


def resmem_prediction(
    scores, neighbor_scores, neighbor_targets, distances, *, sigma, temperature, task, from_logits
):
    """`base(x) + sum_i w_i r_i` over the neighbours, and the weights `w`.

    Args:
        scores: `(m, c)` the network's outputs on the queries.
        neighbor_scores: `(m, k, c)` its stored outputs on their neighbours.
        neighbor_targets: `(m, k)` class ids, or `(m, k, c)` regression targets.
        distances: `(m, k)` L2 distances to the neighbours.
    """
    options = {"task": task, "temperature": temperature, "from_logits": from_logits}
    weights = neighbor_weights(distances, sigma)
    r = residuals(neighbor_scores, neighbor_targets, **options)
    return base_prediction(scores, **options) + tf.einsum("mk,mkc->mc", weights, r), weights


def sparse_residuals(scores, targets, size, *, temperature, from_logits):
    """The `size` largest-magnitude entries of each classification residual.

    Args:
        scores: `(n, c)` network outputs.
        targets: `(n,)` int class ids.
        size: `m`, the entries kept per residual.

    Returns:
        `(ids, values)`, each `(n, m)`: int32 class ids and float16 residual
        values, largest magnitude first.
    """
    r = residuals(
        scores, targets, task="classification", temperature=temperature, from_logits=from_logits
    )
    _, ids = tf.math.top_k(tf.abs(r), k=size)
    return ids, tf.cast(tf.gather(r, ids, batch_dims=1), tf.float16)


def sparse_combination(weights, ids, values, num_outputs):
    """`sum_i w_i r_i` for sparse residuals, as a dense `(m, c)` tensor.

    Args:
        weights: `(m, k)` neighbour weights.
        ids: `(m, k, s)` the class ids of the stored residual entries.
        values: `(m, k, s)` their values; every other entry is zero.
        num_outputs: `c`, the width of the result.
    """
    contributions = weights[:, :, None] * tf.cast(values, weights.dtype)
    rows = tf.broadcast_to(tf.range(tf.shape(ids)[0])[:, None, None], tf.shape(ids))
    indices = tf.stack([rows, ids], axis=-1)
    # scatter_nd adds up repeated indices: the same class in several neighbours.
    return tf.scatter_nd(indices, contributions, tf.stack([tf.shape(ids)[0], num_outputs]))


def knn_prediction(weights, neighbor_targets, num_outputs, *, task):
    """The neighbours' labels, weighted: `sum_i w_i onehot(y_i)`, or `sum_i w_i y_i`.

    Args:
        weights: `(m, k)` neighbour weights.
        neighbor_targets: `(m, k)` class ids, or `(m, k, c)` regression targets.
        num_outputs: `c`.
    """
    if task == "regression":
        return tf.einsum("mk,mkc->mc", weights, neighbor_targets)
    # A scatter, not a (m, k, c) one-hot: c can be a vocabulary.
    ones = tf.ones_like(weights, dtype=tf.float16)[:, :, None]
    return sparse_combination(weights, neighbor_targets[:, :, None], ones, num_outputs)


def combine(
    method,
    scores,
    neighbors,
    distances,
    *,
    sigma,
    temperature,
    knn_weight,
    task,
    from_logits,
    sparse,
):
    """A memory's prediction for one of `METHODS`, and the neighbour weights.

    - `"resmem"`: `base(x) + sum_i w_i r_i` (the paper);
    - `"knn"`: `sum_i w_i onehot(y_i)` (regression: `sum_i w_i y_i`), the network ignored;
    - `"interpolation"`: `(1 - knn_weight) base(x) + knn_weight * knn`.

    Args:
        method: one of `METHODS` (a Python string).
        scores: `(m, c)` the network's outputs on the queries.
        neighbors: a dict of the neighbours' stored rows: `"targets"` `(m, k)`
            (or `(m, k, c)`), and for `"resmem"` either `"scores"` `(m, k, c)`
            (dense) or `"residual_ids"`, `"residual_values"` `(m, k, s)` (sparse).
        distances: `(m, k)` L2 distances, nearest first.
        sparse: whether the residuals are stored sparse.
    """
    weights = neighbor_weights(distances, sigma)
    options = {"task": task, "temperature": temperature, "from_logits": from_logits}
    num_outputs = tf.shape(scores)[-1]
    if method == "resmem":
        if sparse:
            r_knn = sparse_combination(
                weights, neighbors["residual_ids"], neighbors["residual_values"], num_outputs
            )
        else:
            r = residuals(neighbors["scores"], neighbors["targets"], **options)
            r_knn = tf.einsum("mk,mkc->mc", weights, r)
        return base_prediction(scores, **options) + r_knn, weights
    knn = knn_prediction(weights, neighbors["targets"], tf.shape(scores)[-1], task=task)
    if method == "knn":
        return knn, weights
    if method == "interpolation":
        base = base_prediction(scores, task=task, temperature=temperature, from_logits=from_logits)
        knn_weight = tf.cast(knn_weight, base.dtype)
        return (1.0 - knn_weight) * base + knn_weight * knn, weights
    raise ValueError(f"`method` must be one of {METHODS}. Received: method={method!r}")
