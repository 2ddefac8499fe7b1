"""`NeighborCache`: neighbours searched once, reused for every (method, k, sigma, T)."""

import dataclasses
import itertools

import numpy as np
import tensorflow as tf

from keras_resmem import _validation
from keras_resmem import residuals as residuals_lib
from keras_resmem.api_export import keras_resmem_export

_BLOCK = 4096


@keras_resmem_export("keras_resmem.tuning.NeighborCache")
class NeighborCache:
    """The `max_k` nearest memory entries of a fixed set of queries.

    Searching is the expensive part of ResMem; combining residuals is cheap.
    The cache searches once, for the largest `k` of a sweep, and then gives the
    prediction for any `k <= max_k`, `sigma` and `temperature` by truncating
    the (nearest-first) neighbour lists. Neither the network nor the search
    runs again.

    The same neighbours give ResMem and the two baselines it should beat, a
    kNN on the labels and kNN-LM-style interpolation (`method`; see
    `keras_resmem.ResidualMemory`). `choose_all` picks each one's best
    setting on a validation split, which answers "is the memory worth it on
    my model?" and says which method to ship (`Choice.apply`).

    A sparse memory (`sparse_residuals`) fixes ResMem's temperature when it
    is built, so ResMem accepts only that `temperature` (the baselines accept
    any).

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
    >>> cache.predict(k=1, sigma=0.1, method="knn").argmax(-1)
    array([0, 1, 2])
    >>> sorted(cache.choose_all([0, 1, 2]))
    ['interpolation', 'knn', 'resmem']
    """

    def __init__(self, memory, embeddings, scores, max_k, batch_size=1024):
        if not memory.built or not memory.memory_size:
            raise ValueError("`memory` holds no memory yet: call `memory.memorize(...)` first.")
        max_k = _validation.k_within(max_k, memory.memory_size, name="max_k")
        batch_size = _validation.positive_int("batch_size", batch_size)
        queries = tf.reshape(tf.cast(embeddings, tf.float32), [-1, memory.key_dim])
        # `k` is passed to the search: the memory itself is not changed.
        found = [
            memory.nearest_positions(queries[start : start + batch_size], k=max_k)
            for start in range(0, int(queries.shape[0]), batch_size)
        ]
        ids = tf.concat([f[0] for f in found], axis=0)
        distances = tf.concat([f[1] for f in found], axis=0)
        self.memory = memory
        self.task, self.max_k = memory.task, max_k
        self.scores = tf.reshape(tf.constant(np.asarray(scores, np.float32)), [len(ids), -1])
        self.ids, self.distances = ids, distances
        self.sparse = memory.sparse_residuals is not None
        self.memory_temperature = memory.temperature
        # The neighbours' stored rows, gathered once.
        self.neighbors = memory.neighbor_rows(ids)

    def _check_k(self, k):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.max_k:
            raise ValueError(
                f"`k` must be an integer in [1, max_k={self.max_k}]. Received: k={k!r}"
            )

    def predict(self, k, sigma, temperature=1.0, *, method="resmem", knn_weight=0.5):
        """One setting's predictions `(m, c)`, as a NumPy array.

        Args:
            k, sigma, temperature: as for `keras_resmem.ResidualMemory`
                (`temperature` is not used by `method="knn"`).
            method: `"resmem"`, `"knn"` (kNN on labels) or `"interpolation"`
                (kNN-LM-style, with weight `knn_weight` on the kNN).
            knn_weight: `"interpolation"` only, in `[0, 1]`.
        """
        self._check_k(k)
        _validation.one_of("method", method, residuals_lib.METHODS)
        sigma = _validation.positive_float("sigma", sigma)
        temperature = _validation.positive_float("temperature", temperature)
        knn_weight = _validation.unit_float("knn_weight", knn_weight)
        if method == "knn" and self.task == "classification":
            temperature = 1.0  # not used; any valid value
        if method == "resmem" and self.sparse and temperature != self.memory_temperature:
            raise ValueError(
                "The memory's residuals are sparse, computed with temperature="
                f"{self.memory_temperature} when it was built. Received: "
                f"temperature={temperature} (the baselines accept any temperature)"
            )
        settings = {
            "sigma": tf.constant(sigma, tf.float32),
            "temperature": tf.constant(temperature, tf.float32),
            "knn_weight": tf.constant(knn_weight, tf.float32),
        }
        # In blocks of queries: each is a (block, k, ...) gather and a dense
        # (block, c) result, and c can be a vocabulary. The combine step is
        # the memory layer's own.
        return np.concatenate(
            [
                self.memory.combine(
                    method,
                    self.scores[i : i + _BLOCK],
                    {name: rows[i : i + _BLOCK, :k] for name, rows in self.neighbors.items()},
                    self.distances[i : i + _BLOCK, :k],
                    **settings,
                )[0].numpy()
                for i in range(0, len(self.ids), _BLOCK)
            ]
        )

    def default_grid(self, method="resmem"):
        """A grid of settings for `method`, with `sigma` on the scale of the distances.

        `sigma` spans 1/20 to 20 times the median distance from a query to its
        nearest memory entry; `k` is a log-spaced set up to `max_k`.
        """
        scale = float(np.median(self.distances[:, 0].numpy()))
        scale = scale if scale > 0 else 1.0
        ks = sorted({k for k in (1, 3, 10, 25, 50, 100, 200, 400) if k < self.max_k} | {self.max_k})
        grid = {"k": ks, "sigma": [scale * f for f in (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)]}
        if method != "knn" and self.task == "classification":
            if method == "resmem" and self.sparse:
                grid["temperature"] = [self.memory_temperature]
            else:
                grid["temperature"] = [0.5, 1.0, 1.4, 2.0, 3.0]
        if method == "interpolation":
            grid["knn_weight"] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
        return grid

    def choose(self, y_true, method="resmem", grid=None):
        """The setting of `method` that scores best on labelled queries (validation).

        Tries every point of `grid` (default: `default_grid(method)`).
        Classification is scored by accuracy, regression by mean squared
        error (lower is better); ties go to the first point tried.

        Args:
            y_true: `(m,)` class ids of the queries (regression: `(m, c)` targets).
            method: `"resmem"`, `"knn"` or `"interpolation"`.
            grid: a dict from argument name (`k`, `sigma`, `temperature`,
                `knn_weight`) to the values to try.

        Returns:
            A `keras_resmem.tuning.Choice`.

        Example:

        >>> import numpy as np
        >>> import keras_resmem
        >>> memory = keras_resmem.ResidualMemory(k=1)
        >>> memory.memorize(np.eye(3), np.zeros((3, 3)), np.array([0, 1, 2]))
        >>> cache = keras_resmem.tuning.NeighborCache(memory, np.eye(3), np.zeros((3, 3)), 2)
        >>> cache.choose([0, 1, 2], "knn", {"k": [1, 2], "sigma": [0.1]})
        Choice(method='knn', settings={'k': 1, 'sigma': 0.1}, accuracy=1.0000)
        """
        grid = self.default_grid(method) if grid is None else dict(grid)
        y_true = np.asarray(y_true)
        regression = self.task == "regression"
        if regression:
            y_true = y_true.reshape(len(self.ids), -1)
        elif y_true.ndim == 2:
            y_true = y_true.argmax(-1)
        best = None
        for values in itertools.product(*grid.values()):
            settings = dict(zip(grid, values, strict=True))
            predictions = self.predict(method=method, **settings)
            if regression:
                score = -float(np.mean((predictions - y_true) ** 2))
            else:
                score = float((predictions.argmax(-1) == y_true).mean())
            if best is None or score > best[1]:
                best = (settings, score)
        settings, score = best
        if regression:
            return Choice(method, settings, mse=-score)
        return Choice(method, settings, accuracy=score)

    def choose_all(self, y_true, grids=None):
        """`choose` for each of ResMem and the two baselines: which method to ship.

        Args:
            y_true: the queries' labels (validation).
            grids: an optional dict from method name to its grid.

        Returns:
            A dict from method name to its `keras_resmem.tuning.Choice`.
        """
        grids = grids or {}
        return {
            method: self.choose(y_true, method, grids.get(method))
            for method in residuals_lib.METHODS
        }


@keras_resmem_export("keras_resmem.tuning.Choice")
@dataclasses.dataclass(frozen=True)
class Choice:
    """The best setting of one method on validation (`NeighborCache.choose`).

    Attributes:
        method: `"resmem"`, `"knn"` or `"interpolation"`.
        settings: the keyword arguments of `NeighborCache.predict` (and of
            the memory layer's attributes of the same names).
        accuracy: classification: its validation accuracy.
        mse: regression: its validation mean squared error.
    """

    method: str
    settings: dict
    accuracy: float | None = None
    mse: float | None = None

    def apply(self, memory):
        """Sets `memory` (a `keras_resmem.ResidualMemory`) to this method and setting."""
        memory.method = self.method
        for name, value in self.settings.items():
            setattr(memory, name, value)

    def __repr__(self):
        score = f"accuracy={self.accuracy:.4f}" if self.mse is None else f"mse={self.mse:.6g}"
        return f"Choice(method={self.method!r}, settings={self.settings}, {score})"
