"""Cheap hyperparameter sweeps: neighbours searched once, reused for every (k, sigma, T).

`NeighborCache` does the caching; `ResMemTuner` (which needs Keras Tuner,
imported on first use) runs Keras Tuner searches over it.
"""

import numpy as np
import tensorflow as tf

from keras_resmem import residuals as residuals_lib
from keras_resmem.api_export import keras_resmem_export
from keras_resmem.diagnostics import compare

_SPARSE_BLOCK = 1024


@keras_resmem_export("keras_resmem.tuning.NeighborCache")
class NeighborCache:
    """The `max_k` nearest memory entries of a fixed set of queries.

    Searching is the expensive part of ResMem; combining residuals is cheap.
    The cache searches once, for the largest `k` of a sweep, and then gives the
    ResMem prediction for any `k <= max_k`, `sigma` and `temperature` by
    truncating the (nearest-first) neighbour lists. Neither the network nor
    the search runs again. A sparse memory (`sparse_residuals`) fixes the
    temperature when it is built, so only that `temperature` is accepted.

    Args:
        memory: a `keras_resmem.ResidualMemory` holding a memory.
        embeddings: `(m, ...)` the queries' embeddings.
        scores: `(m, c)` the network's outputs on the queries.
        max_k: the largest `k` the sweep will ask for.
        batch_size: queries searched at once (bounds the search's memory use).

    Example:

    >>> import numpy as np
    >>> import keras_resmem
    >>> memory = keras_resmem.ResidualMemory(k=1)
    >>> memory.memorize(np.eye(3), np.zeros((3, 3)), np.array([0, 1, 2]))
    >>> cache = keras_resmem.tuning.NeighborCache(memory, np.eye(3), np.zeros((3, 3)), max_k=3)
    >>> cache.predict(k=1, sigma=0.1, temperature=1.0).argmax(-1)
    array([0, 1, 2])
    """

    def __init__(self, memory, embeddings, scores, max_k, batch_size=1024):
        if not memory.built:
            raise ValueError("`memory` holds no memory yet: call `memory.memorize(...)` first.")
        if max_k > memory.memory_size:
            raise ValueError(
                f"`max_k` must be at most the memory size ({memory.memory_size}). "
                f"Received: max_k={max_k}"
            )
        old_k = memory.k
        memory.k = max_k
        try:
            queries = tf.reshape(tf.cast(embeddings, tf.float32), [-1, memory.key_dim])
            found = [
                memory._search(queries[start : start + batch_size])
                for start in range(0, int(queries.shape[0]), batch_size)
            ]
        finally:
            memory.k = old_k
        ids = tf.concat([f[0] for f in found], axis=0)
        distances = tf.concat([f[1] for f in found], axis=0)
        self.task, self.from_logits, self.max_k = memory.task, memory.from_logits, max_k
        self.scores = tf.reshape(tf.constant(np.asarray(scores, np.float32)), [len(ids), -1])
        self.ids, self.distances = ids, distances
        self.neighbor_targets = tf.gather(memory.memory_targets, ids)
        self.sparse = memory.sparse_residuals is not None
        if self.sparse:
            self.memory_temperature = memory.temperature
            self.neighbor_residual_ids = tf.gather(memory.residual_ids, ids)
            self.neighbor_residual_values = tf.gather(memory.residual_values, ids)
        else:
            self.neighbor_scores = tf.gather(memory.memory_scores, ids)

    def _check_k(self, k):
        if not 1 <= k <= self.max_k:
            raise ValueError(f"`k` must be in [1, max_k={self.max_k}]. Received: k={k}")

    def predict(self, k, sigma, temperature):
        """ResMem predictions `(m, c)` for one setting, as a NumPy array."""
        self._check_k(k)
        if self.sparse:
            if temperature != self.memory_temperature:
                raise ValueError(
                    "The memory's residuals are sparse, computed with temperature="
                    f"{self.memory_temperature} when it was built. Received: "
                    f"temperature={temperature}"
                )
            # In blocks of queries: each is a (block, k, m) gather and a dense
            # (block, vocabulary) result.
            return np.concatenate(
                [
                    residuals_lib.sparse_resmem_prediction(
                        self.scores[i : i + _SPARSE_BLOCK],
                        self.neighbor_residual_ids[i : i + _SPARSE_BLOCK, :k],
                        self.neighbor_residual_values[i : i + _SPARSE_BLOCK, :k],
                        self.distances[i : i + _SPARSE_BLOCK, :k],
                        sigma=tf.constant(sigma, tf.float32),
                        temperature=tf.constant(temperature, tf.float32),
                        from_logits=self.from_logits,
                    )[0].numpy()
                    for i in range(0, len(self.ids), _SPARSE_BLOCK)
                ]
            )
        prediction, _ = residuals_lib.resmem_prediction(
            self.scores,
            self.neighbor_scores[:, :k],
            self.neighbor_targets[:, :k],
            self.distances[:, :k],
            sigma=tf.constant(sigma, tf.float32),
            temperature=tf.constant(temperature, tf.float32),
            task=self.task,
            from_logits=self.from_logits,
        )
        return prediction.numpy()

    def knn_label_scores(self, k, sigma):
        """A plain kNN on the labels (classification): `sum_i w_i onehot(y_i)`."""
        self._check_k(k)
        if self.task != "classification":
            raise ValueError("kNN on labels needs a classification memory.")
        weights = residuals_lib.neighbor_weights(self.distances[:, :k], sigma)
        onehot = tf.one_hot(self.neighbor_targets[:, :k], tf.shape(self.scores)[-1])
        return tf.einsum("mk,mkc->mc", weights, onehot).numpy()


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


def __getattr__(name):
    # Keras Tuner is an optional dependency: imported on first use of the tuner.
    if name == "ResMemTuner":
        try:
            from keras_resmem._tuner import ResMemTuner
        except ImportError as e:
            if "keras_tuner" not in str(e):
                raise
            raise ImportError(
                "keras_resmem.tuning.ResMemTuner needs Keras Tuner: `pip install keras-tuner` "
                "(or `pip install 'keras-resmem[tuning]'`)."
            ) from e
        return ResMemTuner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
