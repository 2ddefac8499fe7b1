"""Exact search: chunked matmul and top-k in stock TensorFlow ops."""

import numpy as np
import tensorflow as tf

from keras_resmem.api_export import keras_resmem_export
from keras_resmem.search.base import (
    SearchBackend,
    _Searcher,
    l2_ranking_scores,
    positive_int_option,
    smallest_k,
)


class ExactSearch(_Searcher):
    """Exact L2 search: chunked `||k||^2 - 2 q.k` (the ranking of `||q - k||^2`), then top-k.

    Peak memory is `batch * (chunk_size + k)` scores, however large the memory.

    Args:
        keys: the memory keys, a `(n, d)` float32 variable or tensor.
        chunk_size: how many keys are scored at once.
    """

    name = "exact"

    def __init__(self, keys, chunk_size=65536):
        self.keys = keys
        self.chunk_size = int(chunk_size)

    def _search(self, queries, k):
        # Nearest first. The number of keys is read at run time: the memory
        # grows and shrinks under a compiled graph.
        keys = tf.convert_to_tensor(self.keys)
        n = tf.shape(keys)[0]

        def whole():
            return smallest_k(l2_ranking_scores(queries, keys), k)[1]

        if keys.shape[0] is not None and keys.shape[0] <= self.chunk_size:
            return whole()
        return tf.cond(n <= self.chunk_size, whole, lambda: self._chunked(queries, keys, k))

    def _chunked(self, queries, keys, k):
        n = tf.shape(keys)[0]
        num_chunks = (n + self.chunk_size - 1) // self.chunk_size
        m = tf.shape(queries)[0]
        best_d = tf.fill([m, k], tf.constant(np.inf, tf.float32))
        best_i = tf.fill([m, k], tf.constant(-1, tf.int32))

        def body(c, best_d, best_i):
            # A slice of the keys, not a padded copy of them: the memory is
            # never copied whole, however large.
            start = c * self.chunk_size
            chunk = keys[start : start + self.chunk_size]
            d, ids = smallest_k(l2_ranking_scores(queries, chunk), k)
            all_d = tf.concat([best_d, d], axis=1)
            all_i = tf.concat([best_i, start + ids], axis=1)
            _, top = tf.math.top_k(-all_d, k=k)
            return (
                c + 1,
                tf.gather(all_d, top, batch_dims=1),
                tf.gather(all_i, top, batch_dims=1),
            )

        _, _, best_i = tf.while_loop(
            lambda c, *_: c < num_chunks,
            body,
            (tf.constant(0), best_d, best_i),
            shape_invariants=(
                tf.TensorShape([]),
                tf.TensorShape([None, None]),
                tf.TensorShape([None, None]),
            ),
            parallel_iterations=1,
        )
        return best_i


@keras_resmem_export("keras_resmem.search.Exact")
class Exact(SearchBackend):
    """Exact search in stock TensorFlow ops: every key is scored.

    Perfect recall; its cost grows with the memory (a matmul of the queries
    against every key). Exported models run on stock TensorFlow Serving.

    Args:
        chunk_size: how many keys are scored at once, which bounds the
            search's memory use.

    Example:

    >>> import numpy as np
    >>> import keras_resmem
    >>> memory = keras_resmem.ResidualMemory(k=1, search=keras_resmem.search.Exact())
    >>> memory.memorize(np.eye(2), np.zeros((2, 2)), np.array([0, 1]))
    >>> memory.search_backend
    'exact'
    """

    name = "exact"

    def __init__(self, chunk_size=65536):
        self.chunk_size = positive_int_option("Exact", "chunk_size", chunk_size)

    def get_config(self):
        return {"chunk_size": self.chunk_size}

    def build(self, keys, add_weight, initializer):
        super().build(keys, add_weight, initializer)
        self._kernel = ExactSearch(keys, self.chunk_size)

    def search(self, queries, k):
        return self._kernel.search(queries, k)

    def entries_added(self, start, verbose=0):
        """Nothing to do: every key is scored."""

    def entries_removed(self, kept, verbose=0):
        """Nothing to do: every key is scored."""
