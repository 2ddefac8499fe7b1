"""Sharded search: every shard of a memory searched exactly on its own, the top-k merged."""

import numpy as np
import tensorflow as tf

from keras_resmem.api_export import keras_resmem_export
from keras_resmem.search.base import SearchBackend, _Searcher, positive_int_option, rescore
from keras_resmem.search.exact import ExactSearch


class ShardedSearch(_Searcher):
    """The kernel: each shard's exact top-k, then the `k` nearest of all of them.

    Shard `s` holds the keys `offsets[s]:offsets[s + 1]`. Each shard is
    searched alone (`ExactSearch`, chunked), as a shard server searches its
    own keys, and the shards' candidates are merged by their exact squared
    distances: the merged `k` are the memory's exact `k` nearest.

    Args:
        keys: the `(n, d)` key variable (all shards, in shard order).
        offsets: the `(S + 1,)` int64 shard offsets, a variable or tensor.
        num_shards: `S`.
        chunk_size: as `ExactSearch`'s.
    """

    name = "sharded"

    def __init__(self, keys, offsets, num_shards, chunk_size=65536):
        self.keys = keys
        self.offsets = offsets
        self.num_shards = num_shards
        self.chunk_size = chunk_size

    def _search(self, queries, k):
        keys = tf.convert_to_tensor(self.keys)
        offsets = tf.cast(tf.convert_to_tensor(self.offsets), tf.int32)
        k = tf.cast(k, tf.int32)
        with tf.name_scope("shards"):
            candidates = []
            for s in range(self.num_shards):
                start, end = offsets[s], offsets[s + 1]
                # A shard smaller than k gives all it has.
                found = ExactSearch(keys[start:end], self.chunk_size)._search(
                    queries, tf.minimum(k, end - start)
                )
                candidates.append(found + start)
        with tf.name_scope("merge"):
            return rescore(keys, queries, tf.concat(candidates, axis=1), k)


@keras_resmem_export("keras_resmem.search.Sharded")
class Sharded(SearchBackend):
    """Exact search of a memory held as shards: each shard searched alone, then merged.

    The layer's view of a sharded memory (`keras_resmem.attach_memory(...,
    shards="manifest.json")`): the memory holds every shard's entries, one
    after another, and each query searches every shard exactly, keeps each
    shard's `k` nearest and merges them into the `k` nearest of all, as a
    fan-out to one server per shard does (`keras_resmem.sharded.serving`).
    The answer is exact search's. Exported models run on stock TensorFlow
    Serving.

    Entries added later (`keras_resmem.add_examples`) join the last shard;
    forgotten ones leave their own.

    Args:
        shard_sizes: the number of entries of each shard, in storage order.
        chunk_size: how many keys of a shard are scored at once (see `Exact`).

    Example:

    >>> import numpy as np
    >>> import keras_resmem
    >>> search = keras_resmem.search.Sharded(shard_sizes=[60, 40])
    >>> memory = keras_resmem.ResidualMemory(k=3, search=search)
    >>> x = np.random.default_rng(0).normal(size=(100, 8))
    >>> memory.memorize(x, np.zeros((100, 3)), np.arange(100) % 3)
    >>> memory.search.shard_sizes
    [60, 40]
    """

    name = "sharded"

    def __init__(self, shard_sizes, chunk_size=65536):
        if isinstance(shard_sizes, (str, bytes)) or not hasattr(shard_sizes, "__len__"):
            raise ValueError(
                "Sharded option `shard_sizes` must be a list of the shards' entry counts. "
                f"Received: shard_sizes={shard_sizes!r}"
            )
        sizes = []
        for size in shard_sizes:
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
                raise ValueError(
                    "Sharded option `shard_sizes` must hold non-negative integers. "
                    f"Received: shard_sizes={list(shard_sizes)!r}"
                )
            sizes.append(int(size))
        if not sizes or sum(sizes) < 1:
            raise ValueError(
                "Sharded option `shard_sizes` must list at least one shard and one entry. "
                f"Received: shard_sizes={sizes!r}"
            )
        self._sizes = sizes
        self.chunk_size = positive_int_option("Sharded", "chunk_size", chunk_size)
        self.offsets = None

    @property
    def num_shards(self):
        return len(self._sizes)

    @property
    def shard_sizes(self):
        """The shards' current sizes (they change with `add_examples` and `forget`)."""
        if self.offsets is not None:
            return np.diff(self.offsets.numpy()).astype(int).tolist()
        return list(self._sizes)

    def get_config(self):
        return {"shard_sizes": self.shard_sizes, "chunk_size": self.chunk_size}

    def resolve(self, memory_size, key_dim):
        if self.offsets is None and sum(self._sizes) != memory_size:
            raise ValueError(
                f"Sharded option `shard_sizes` adds up to {sum(self._sizes)} entries, but the "
                f"memory holds {memory_size}. Received: shard_sizes={self._sizes!r}"
            )
        return self

    def build(self, keys, add_weight, initializer):
        super().build(keys, add_weight, initializer)
        self.offsets = add_weight(
            name="shard_offsets", shape=(self.num_shards + 1,), dtype="int64", initializer="zeros"
        )
        self._set_sizes(self._sizes)
        self._kernel = ShardedSearch(keys, self.offsets, self.num_shards, self.chunk_size)

    def _set_sizes(self, sizes):
        offsets = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        self.offsets.assign(offsets)

    def fit(self, verbose=0):
        if int(self.offsets.numpy()[-1]) != int(self.keys.shape[0]):
            raise ValueError(
                f"This memory's shards hold {int(self.offsets.numpy()[-1])} entries, but it was "
                f"filled with {int(self.keys.shape[0])}: a sharded memory is filled from its "
                "shards (`attach_memory(..., shards=...)`). To fill it from data, attach a "
                "memory with search='exact'."
            )

    def search(self, queries, k):
        return self._kernel.search(queries, k)

    def entries_added(self, start, verbose=0):
        """The new entries join the last shard."""
        sizes = self.shard_sizes
        sizes[-1] += int(self.keys.shape[0]) - start
        self._set_sizes(sizes)

    def entries_removed(self, kept, verbose=0):
        """Each shard keeps its entries that remain."""
        offsets = self.offsets.numpy()
        self.offsets.assign(np.searchsorted(kept, offsets).astype(np.int64))

    def check_loaded(self, arrays, fail):
        n = len(arrays["keys"])
        offsets = arrays["shard_offsets"]
        if offsets.shape != (self.num_shards + 1,):
            fail("`shard_offsets`", f"has shape {offsets.shape}, not ({self.num_shards + 1},)")
        if offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
            fail("`shard_offsets`", f"must rise from 0 to the {n} entries")

    def storage_bytes(self):
        return 8 * (self.num_shards + 1)
