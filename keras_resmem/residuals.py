"""The paper's residual formulas, in TensorFlow ops.

Classification: `r = onehot(y) - softmax(logits / T)`, prediction
`softmax(logits / T) + r_kNN`. Regression: `r = y - f(x)`, prediction
`f(x) + r_kNN`. A dense memory computes residuals from the stored network
outputs when a neighbour is used, so changing `T` never needs another pass of
the network over the training set. A sparse memory (for outputs as wide as a
vocabulary) stores each residual's `m` largest-magnitude entries instead, with
`T` fixed when it is built; the entries not stored count as zero.
"""

import tensorflow as tf

TASKS = ("classification", "regression")
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


def sparse_resmem_prediction(
    scores, neighbor_ids, neighbor_values, distances, *, sigma, temperature, from_logits
):
    """`softmax(logits / T) + sum_i w_i r_i` with sparse residuals, and the weights.

    Args:
        scores: `(m, c)` the network's outputs on the queries.
        neighbor_ids, neighbor_values: `(m, k, s)` the neighbours' stored
            residual entries (see `sparse_residuals`).
        distances: `(m, k)` L2 distances to the neighbours.
    """
    weights = neighbor_weights(distances, sigma)
    base = base_prediction(
        scores, task="classification", temperature=temperature, from_logits=from_logits
    )
    r_knn = sparse_combination(weights, neighbor_ids, neighbor_values, tf.shape(scores)[-1])
    return base + r_knn, weights
