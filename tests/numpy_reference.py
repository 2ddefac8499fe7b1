"""An independent NumPy implementation of ResMem, written from the paper's text.

Brute force and literal on purpose: every pairwise plain L2 distance, the k
nearest by a full sort, raw weights exp(-d / sigma) normalised by their sum,
residuals onehot(y) - softmax(logits / T). No code is shared with the library.
"""

import numpy as np


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def knn(keys, queries, k):
    """ids and plain L2 distances of the k nearest keys, nearest first."""
    keys, queries = np.float64(keys), np.float64(queries)
    d = np.sqrt(((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1))
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(d, ids, axis=1)


def weights(distances, sigma):
    w = np.exp(-distances / sigma)
    return w / w.sum(axis=1, keepdims=True)


def resmem_classification(
    keys, train_logits, train_labels, queries, query_logits, k, sigma, temperature
):
    num_classes = train_logits.shape[1]
    residuals = np.eye(num_classes)[train_labels] - softmax(np.float64(train_logits) / temperature)
    ids, d = knn(keys, queries, k)
    w = weights(d, sigma)
    r_knn = (w[:, :, None] * residuals[ids]).sum(axis=1)
    return softmax(np.float64(query_logits) / temperature) + r_knn


def resmem_regression(keys, train_predictions, train_targets, queries, query_predictions, k, sigma):
    residuals = np.float64(train_targets) - train_predictions
    ids, d = knn(keys, queries, k)
    w = weights(d, sigma)
    return query_predictions + (w[:, :, None] * residuals[ids]).sum(axis=1)


def sparse_residuals(train_logits, train_labels, m, temperature):
    """Each residual with all but its m largest-magnitude entries set to 0 (dense)."""
    num_classes = train_logits.shape[1]
    r = np.eye(num_classes)[train_labels] - softmax(np.float64(train_logits) / temperature)
    dropped = np.argsort(-np.abs(r), axis=1, kind="stable")[:, m:]
    np.put_along_axis(r, dropped, 0.0, axis=1)
    return r


def resmem_with_residuals(keys, residuals, queries, query_logits, k, sigma, temperature):
    """ResMem classification from given (e.g. sparsified) residuals."""
    ids, d = knn(keys, queries, k)
    w = weights(d, sigma)
    r_knn = (w[:, :, None] * residuals[ids]).sum(axis=1)
    return softmax(np.float64(query_logits) / temperature) + r_knn


def knn_labels(keys, train_labels, queries, k, sigma, num_classes):
    """kNN on labels: sum_i w_i onehot(y_i) over the k nearest."""
    ids, d = knn(keys, queries, k)
    w = weights(d, sigma)
    return (w[:, :, None] * np.eye(num_classes)[train_labels][ids]).sum(axis=1)


def knn_targets(keys, train_targets, queries, k, sigma):
    """Regression kNN: sum_i w_i y_i over the k nearest."""
    ids, d = knn(keys, queries, k)
    w = weights(d, sigma)
    return (w[:, :, None] * np.float64(train_targets)[ids]).sum(axis=1)


def interpolation_classification(
    keys, train_labels, queries, query_logits, k, sigma, temperature, lam
):
    """kNN-LM (Khandelwal et al.): (1 - lam) softmax(logits / T) + lam p_kNN."""
    p_knn = knn_labels(keys, train_labels, queries, k, sigma, query_logits.shape[1])
    return (1 - lam) * softmax(np.float64(query_logits) / temperature) + lam * p_knn


def interpolation_regression(keys, train_targets, queries, query_predictions, k, sigma, lam):
    p_knn = knn_targets(keys, train_targets, queries, k, sigma)
    return (1 - lam) * np.float64(query_predictions) + lam * p_knn
