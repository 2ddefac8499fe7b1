"""The search backend interface, and the graph code every backend shares."""

import abc

import numpy as np
import tensorflow as tf


class SearchBackend(abc.ABC):
    """A nearest-neighbour search over a memory's keys, which owns its state.

    A backend is created from its options (it is its own config object:
    `keras_resmem.search.IVF(num_probes=8)`), and `ResidualMemory` drives it
    through this interface only, in this order:

    1. `resolve(memory_size, key_dim)` once the memory's shape is known:
       the backend to use (itself, or a concrete one for `Auto`);
    2. `build(keys, add_weight, initializer)`: create its variables with the
       layer's `add_weight` (so they are saved with the layer) and keep a
       reference to the key variable;
    3. `fit(verbose)`: index the keys, once they are written;
    4. `search(queries, k)`: the positions of the `k` nearest keys, in the graph;
    5. `entries_added(start)` / `entries_removed(kept)`: the memory grew or
       shrank in place (`add_examples`, `forget`); by default the index is
       built again, and a backend that can update in place overrides them;
    6. `keys_changed()`: the key variable was overwritten (weights loaded);
       `save_assets(dir)` / `load_assets(dir)`: state that is not a variable.

    The key variable's number of rows changes as the memory grows and
    shrinks, so a backend's graph reads it with `tf.shape`, never as a
    Python constant: a compiled `predict` then sees every change. Per-entry
    variables of its own are created with `add_weight(..., growable=True)`.

    `ResidualMemory` recomputes the exact distances of the ids a backend
    returns, so an approximate backend can miss a neighbour but never
    mis-weight one. A new backend is a subclass and nothing else: the layer,
    `attach_memory` and `export_saved_model` never branch on which backend
    they hold. To save a model that uses it, register the subclass with
    `keras.saving.register_keras_serializable`.

    Attributes:
        name: a short name (`"exact"`, `"ivf"`, `"scann"`).
        portable: whether the search runs in stock TensorFlow ops, so that a
            stock TensorFlow Serving loads an exported model.
        custom_op_namespaces: the custom op namespaces an exported graph
            holds (`("Scann",)`); empty when `portable`.
        knobs: the names of settings that can change at any time, even in a
            compiled or exported model (IVF's `num_probes`).
    """

    name = None
    portable = True
    custom_op_namespaces = ()
    knobs = ()

    def get_config(self):
        """The options this backend was created with."""
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def clone(self):
        """A new, unbuilt backend with the same options."""
        return type(self).from_config(self.get_config())

    def resolve(self, memory_size, key_dim):
        """The backend to use for a memory of this shape, with its options checked."""
        return self

    def build(self, keys, add_weight, initializer):
        """Creates the backend's variables; `keys` is the memory's key variable.

        Args:
            keys: the `(n, d)` float32 key variable.
            add_weight: the layer's `add_weight(name, shape, dtype,
                initializer, growable=False)`: variables created with it are
                saved and loaded with the layer, by name; `growable=True`
                gives one whose first dimension can change (per-entry state).
            initializer: the initializer of per-entry variables (`(n, ...)`),
                which may leave them unwritten until `fit`.
        """
        self.keys = keys

    def fit(self, verbose=0):  # noqa: B027 - an optional hook
        """Indexes the keys, once they are all written."""

    @abc.abstractmethod
    def search(self, queries, k):
        """The int32 positions `(m, k)` of the `k` nearest keys to each query `(m, d)`."""

    def adopt_index(self, **index):
        """Takes an index built elsewhere (a sharded memory's) instead of `fit`."""
        raise ValueError(f"The {self.name!r} search backend cannot take a prebuilt index.")

    def entries_added(self, start, verbose=0):
        """Entries were appended: keys `[start, n)` are new, earlier ones did not move.

        The default indexes the whole memory again.
        """
        self.resolve(*self.keys.shape)
        self.fit(verbose=verbose)

    def entries_removed(self, kept, verbose=0):
        """Entries were removed: the entry now at position `i` was at `kept[i]` before.

        `kept` is a sorted int64 array of the old positions that remain. The
        index must keep nothing of the removed entries. The default indexes
        the whole memory again.
        """
        self.resolve(*self.keys.shape)
        self.fit(verbose=verbose)

    def check_loaded(self, arrays, fail):  # noqa: B027 - an optional hook
        """Checks the backend's loaded variables before anything reads them.

        Args:
            arrays: the layer's variables as NumPy arrays, by name.
            fail: `fail(part, problem)` raises the layer's error.
        """

    def keys_changed(self):  # noqa: B027 - an optional hook
        """The key variable was overwritten (weights loaded): bring the index up to date."""

    def legacy_variable_names(self):
        """The names of the variables a 0.1 file saved for this backend, in order."""
        return []

    def save_assets(self, dir_path):  # noqa: B027 - an optional hook
        """Writes the state that is not a variable, if any."""

    def load_assets(self, dir_path):  # noqa: B027 - an optional hook
        """Reads what `save_assets` wrote."""

    def storage_bytes(self):
        """The bytes of the index, beyond the keys."""
        return 0

    def get_knob(self, name):
        raise ValueError(self._no_knob(name))

    def set_knob(self, name, value):
        raise ValueError(self._no_knob(name))

    def _no_knob(self, name):
        return (
            f"`{name}` is not a setting of the {self.name!r} search backend. "
            f"Its settings: {list(self.knobs)}"
        )

    def for_export(self):
        """`(searcher, trackables)` for a SavedModel: what the serving graph searches with.

        The default is the backend itself, whose variables are the layer's.
        """
        return self, []

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if v is not None)
        return f"{type(self).__name__}({options})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    __hash__ = None


def l2_ranking_scores(queries, keys, keys_sq=None):
    """`||k||^2 - 2 q.k` for every query and key: `||q - k||^2` less `||q||^2`.

    `||q||^2` is the same for every key of a query, so these scores rank the
    keys exactly as the squared L2 distances do, for one matmul. Pass
    `keys_sq` (`||k||^2`) when it is already computed.
    """
    if keys_sq is None:
        keys_sq = tf.reduce_sum(tf.square(keys), axis=-1)
    return keys_sq[None, :] - 2.0 * tf.matmul(queries, keys, transpose_b=True)


def nearest_centroids(points, centroids, max_scores=2**22):
    """Index of the nearest centroid of each point (L2), in chunks of points.

    A chunk scores at most about `max_scores` (point, centroid) pairs at once
    (16 MiB of float32), so that memory stays flat however many centroids:
    65,536 points at a time against the 8,944 centroids of a 5M-entry memory
    was a 2.3 GB score matrix, and its argmin ran on one core; chunks of
    ~500 points were 1.6x faster there.
    """
    centroids = tf.convert_to_tensor(centroids)
    c_sq = tf.reduce_sum(tf.square(centroids), axis=-1)
    chunk_size = int(min(65_536, max(256, max_scores // int(centroids.shape[0]))))
    out = np.empty(len(points), dtype=np.int32)
    for start in range(0, len(points), chunk_size):
        chunk = tf.convert_to_tensor(points[start : start + chunk_size])
        scores = l2_ranking_scores(chunk, centroids, c_sq)
        out[start : start + len(chunk)] = tf.argmin(scores, axis=-1, output_type=tf.int32).numpy()
    return out


def rescore(keys, queries, candidates, k, valid=None, sorted=True):
    """The `k` of each query's `candidates` `(m, c)` nearest it by squared L2, float32.

    For approximate scorings (IVF's bfloat16 blocks, ScaNN's int8 codes) that
    shortlist candidates and re-score them against the key table. `keys` is
    a read tensor, not a variable: a gather from the variable itself
    (`ResourceGather`) would put it in copy-on-read mode. Candidates where
    `valid` is false (padding) rank last. `sorted=False` leaves the `k` in
    any order (the memory sorts its neighbours itself).
    """
    squared = tf.reduce_sum(tf.square(tf.gather(keys, candidates) - queries[:, None, :]), axis=-1)
    if valid is not None:
        squared = tf.where(valid, squared, np.inf)
    _, best = tf.math.top_k(-squared, k=k, sorted=sorted)
    return tf.gather(candidates, best, batch_dims=1)


def smallest_k(values, k, block=32):
    """The `k` smallest entries of each row of `values` `(m, n)`: `(values, indices)`.

    Exact, and ascending. Rows wider than `2 * k * block` are split into blocks
    of `block`: the `k` smallest entries lie in the `k` blocks with the smallest
    minima, so one cheap pass (block minima) and a top-k over `k * block`
    entries replace a top-k over the whole row, several times faster on CPU.
    """
    k = tf.cast(k, tf.int32)
    m, n = tf.shape(values)[0], tf.shape(values)[1]

    def whole_row():
        # Rows narrower than k (a small last chunk) are padded with +inf.
        padded = tf.pad(values, [[0, 0], [0, tf.maximum(k - n, 0)]], constant_values=np.inf)
        top, ids = tf.math.top_k(-padded, k=k)
        return -top, ids

    def blocked():
        num_blocks = (n + block - 1) // block
        padded = tf.pad(values, [[0, 0], [0, num_blocks * block - n]], constant_values=np.inf)
        blocks = tf.reshape(padded, [m, num_blocks, block])
        _, best_blocks = tf.math.top_k(-tf.reduce_min(blocks, axis=-1), k=k)
        candidates = tf.reshape(tf.gather(blocks, best_blocks, batch_dims=1), [m, k * block])
        top, pos = tf.math.top_k(-candidates, k=k)
        ids = best_blocks[:, :, None] * block + tf.range(block)[None, None, :]
        return -top, tf.gather(tf.reshape(ids, [m, k * block]), pos, batch_dims=1)

    return tf.cond(n >= 2 * k * block, blocked, whole_row)


def _as_tensor(value, dtype):
    # `tf.convert_to_tensor` costs microseconds even when `value` is already
    # such a tensor; an eager single-query search takes tens of them.
    if isinstance(value, tf.Tensor) and value.dtype == dtype:
        return value
    return tf.convert_to_tensor(value, dtype)


class _Searcher:
    """What every search kernel shares: `search`, in a graph or called eagerly.

    Inside a graph (`predict`, `fit`, an export) `search` adds the kernel's
    ops. Called eagerly it runs them as one compiled `tf.function`, traced
    once: op by op, each op would cost a Python round trip, and the
    kernels' loops would run in Python. A kernel can answer some eager
    calls more directly (`_search_eagerly`).
    """

    _compiled = None

    def search(self, queries, k):
        """The int32 positions `(m, k)` of the `k` nearest keys of each query `(m, d)`."""
        if not tf.executing_eagerly():
            return self._search(queries, k)
        queries = _as_tensor(queries, tf.float32)
        k = _as_tensor(k, tf.int32)
        ids = self._search_eagerly(queries, k)
        if ids is not None:
            return ids
        if self._compiled is None:
            self._compiled = tf.function(self._search, reduce_retracing=True, autograph=False)
            # One per searcher (per memory), not a function traced again and again.
            self._compiled._omit_frequent_tracing_warning = True
        return self._compiled(queries, k)

    def _search_eagerly(self, queries, k):
        """An eager answer without the compiled graph, or None (use the graph)."""
        return None

    def _search(self, queries, k):
        raise NotImplementedError


def known_options(backend, options, valid, argument):
    """`options` without its `None` values; an error naming any option not in `valid`."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown {backend} option(s) {unknown}. Valid options: {sorted(valid)}. "
            f"Received: {argument}={options!r}"
        )
    return options


def positive_int_option(backend, name, value):
    """A backend option that must be a positive integer (`None`: the default)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"{backend} option `{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return int(value)
