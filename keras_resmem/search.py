"""Nearest-neighbour search backends behind one small interface.

A backend answers one question, inside the TensorFlow graph: the ids of the
`k` memory keys nearest to each query under L2 distance. `ResidualMemory`
recomputes the exact distances of those `k` keys itself, so the weights are
exact whatever the backend; an approximate backend can only miss neighbours.

- `ExactSearch`: matmul + top-k in stock TensorFlow ops, streamed over chunks
  of the memory so that peak memory is `batch * (chunk_size + k)` distances,
  however large the memory.
- `IVFSearch`: an inverted-file index in stock TensorFlow ops: k-means
  partitions of the memory, probe the partitions nearest to the query, score
  their entries exactly. Approximate, fast on large memories, and it runs on
  stock TensorFlow Serving (no custom ops).
- `ScannSearch`: ScaNN's TensorFlow ops (a custom op library that ships with
  `scann[tf]`), for memories too large for exact search. A SavedModel that
  uses it needs a ScaNN-enabled TensorFlow Serving build.
"""

import math
import os
import uuid
import weakref

import keras
import numpy as np
import tensorflow as tf

BACKENDS = ("auto", "exact", "ivf", "scann")
# Backends whose graph holds only stock TensorFlow ops.
PORTABLE_BACKENDS = ("exact", "ivf")
# Below this many entries exact search is fast enough (a 64-d memory of this
# size is ~13 MFLOP per query) and has perfect recall. From it, "auto" picks
# IVF: on 1M real embeddings it had higher recall than ScaNN's defaults at a
# similar speed (benchmarks/ivf_search.py), and its SavedModels run on stock
# TensorFlow Serving.
AUTO_APPROXIMATE_THRESHOLD = 200_000


def resolve_backend(search, memory_size):
    """Maps `search` ("auto", "exact", "ivf", "scann") to a concrete backend name."""
    if search not in BACKENDS:
        raise ValueError(f"`search` must be one of {BACKENDS}. Received: search={search!r}")
    if search == "auto":
        return "ivf" if memory_size >= AUTO_APPROXIMATE_THRESHOLD else "exact"
    return search


def l2_ranking_scores(queries, keys, keys_sq=None):
    """`||k||^2 - 2 q.k` for every query and key: `||q - k||^2` less `||q||^2`.

    `||q||^2` is the same for every key of a query, so these scores rank the
    keys exactly as the squared L2 distances do, for one matmul. Pass
    `keys_sq` (`||k||^2`) when it is already computed.
    """
    if keys_sq is None:
        keys_sq = tf.reduce_sum(tf.square(keys), axis=-1)
    return keys_sq[None, :] - 2.0 * tf.matmul(queries, keys, transpose_b=True)


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
    """What every backend shares: `search`, in a graph or called eagerly.

    Inside a graph (`predict`, `fit`, an export) `search` adds the backend's
    ops. Called eagerly it runs them as one compiled `tf.function`, traced
    once: op by op, each op would cost a Python round trip, and the
    searchers' loops would run in Python. A backend can answer some eager
    calls more directly (`_search_eagerly`).
    """

    _compiled = None

    def search(self, queries, k):
        """The int32 ids `(m, k)` of the `k` nearest keys of each query `(m, d)`."""
        if not tf.executing_eagerly():
            return self._search(queries, k)
        queries = _as_tensor(queries, tf.float32)
        k = _as_tensor(k, tf.int32)
        ids = self._search_eagerly(queries, k)
        if ids is not None:
            return ids
        if self._compiled is None:
            self._compiled = tf.function(self._search, reduce_retracing=True, autograph=False)
        return self._compiled(queries, k)

    def _search_eagerly(self, queries, k):
        """An eager answer without the compiled graph, or None (use the graph)."""
        return None

    def _search(self, queries, k):
        raise NotImplementedError


class ExactSearch(_Searcher):
    """Exact L2 search: chunked `||k||^2 - 2 q.k` (the ranking of `||q - k||^2`), then top-k.

    Args:
        keys: the memory keys, a `(n, d)` float32 variable or tensor.
        chunk_size: how many keys are scored at once.
    """

    name = "exact"

    def __init__(self, keys, chunk_size=65536):
        self.keys = keys
        self.chunk_size = int(chunk_size)

    def _search(self, queries, k):
        # Nearest first.
        keys = tf.convert_to_tensor(self.keys)
        n = int(keys.shape[0])

        if n <= self.chunk_size:
            return smallest_k(l2_ranking_scores(queries, keys), k)[1]

        num_chunks = math.ceil(n / self.chunk_size)
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


def default_ivf_options(memory_size):
    """IVF settings: ~4 sqrt(n) k-means partitions, 16 of them probed per query.

    `num_partitions`: the number of k-means partitions (inverted lists).
    `num_probes`: the partitions searched per query, nearest centroids first.
    `training_sample_size`: the k-means training sample (64 per partition).
    `iterations`: k-means (Lloyd) iterations. `seed`: the k-means seed.

    Measured on Fashion-MNIST `pre_logits` embeddings: recall@50 of 0.99 at
    1,020,000 entries (4,040 partitions; 5x the queries per second of exact
    search at batch 256, `benchmarks/ivf_search.py`) and 0.994 at 60,000.
    Isotropic Gaussian clusters are harder (0.89 on 40k 16-d keys): where
    recall matters, measure it and raise `num_probes`.
    """
    num_partitions = int(min(max(round(4 * math.sqrt(memory_size)), 1), 65_536))
    return {
        "num_partitions": num_partitions,
        "num_probes": min(num_partitions, 16),
        "training_sample_size": 64 * num_partitions,
        "iterations": 10,
        "seed": 0,
    }


def resolve_ivf_options(memory_size, options):
    """The defaults for `memory_size`, overridden by `options` (validated)."""
    opts = default_ivf_options(memory_size)
    unknown = sorted(set(options or {}) - set(opts))
    if unknown:
        raise ValueError(
            f"Unknown IVF option(s) {unknown}. Valid options: {sorted(opts)}. "
            f"Received: ivf_options={options!r}"
        )
    opts.update(options or {})
    for name in ("num_partitions", "num_probes", "training_sample_size", "iterations"):
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(
                f"IVF option `{name}` must be a positive integer. Received: {name}={value!r}"
            )
        opts[name] = int(value)
    opts["num_partitions"] = min(opts["num_partitions"], memory_size)
    return opts


def _nearest_centroids(points, centroids, max_scores=2**22):
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


def train_ivf(keys, options, verbose=0):
    """Builds an inverted-file index of `keys` with k-means.

    Args:
        keys: `(n, d)` float32 array.
        options: resolved options (`resolve_ivf_options`).
        verbose: 1 shows a progress bar (k-means iterations, then the assignment).

    Returns:
        `(centroids, offsets, ids)`: `(P, d)` float32 centroids; `(P + 1,)`
        int32 offsets; `(n,)` int32 memory ids sorted by partition, so that
        partition `p` holds `ids[offsets[p]:offsets[p + 1]]`.
    """
    keys = np.asarray(keys, dtype=np.float32)
    n = len(keys)
    num_partitions = options["num_partitions"]
    rng = np.random.default_rng(options["seed"])
    sample_size = min(n, max(options["training_sample_size"], num_partitions))
    sample = keys[np.sort(rng.choice(n, size=sample_size, replace=False))]
    centroids = sample[rng.choice(sample_size, size=num_partitions, replace=False)]
    progbar = keras.utils.Progbar(options["iterations"] + 1, verbose=verbose, unit_name="step")
    for step in range(options["iterations"]):
        assign = _nearest_centroids(sample, centroids)
        sums = tf.math.unsorted_segment_sum(sample, assign, num_partitions).numpy()
        counts = np.bincount(assign, minlength=num_partitions)
        empty = counts == 0
        centroids = np.where(empty[:, None], 0.0, sums / np.maximum(counts, 1)[:, None])
        if empty.any():  # re-seed empty partitions on random sample points
            centroids[empty] = sample[rng.choice(sample_size, size=int(empty.sum()))]
        centroids = centroids.astype(np.float32)
        progbar.update(step + 1)
    assign = _nearest_centroids(keys, centroids)
    progbar.update(options["iterations"] + 1)
    ids = np.argsort(assign, kind="stable").astype(np.int32)
    offsets = np.zeros(num_partitions + 1, dtype=np.int32)
    np.cumsum(np.bincount(assign, minlength=num_partitions), out=offsets[1:])
    return centroids, offsets, ids


class IVFSearch(_Searcher):
    """Inverted-file (IVF) search in stock TensorFlow ops.

    Each query is compared with the `P` partition centroids, the `num_probes`
    nearest partitions are opened, and all their entries are scored exactly;
    the `k` best are returned. A query whose probed partitions hold fewer than
    `k` entries makes its batch fall back to exact search, so `k` ids are
    always real neighbours. Queries are scored in blocks so that at most
    about `max_candidates` candidate keys are gathered at once.

    Args:
        keys: the memory keys `(n, d)`.
        centroids, offsets, ids: the index (see `train_ivf`), variables or tensors.
        num_probes: the number of partitions probed (a scalar variable or int).
        chunk_size: chunk size of the exact fallback.
        max_candidates: the budget of gathered key values per query block.
    """

    name = "ivf"

    def __init__(
        self, keys, centroids, offsets, ids, num_probes, chunk_size=65536, max_candidates=2**24
    ):
        self.keys = keys
        self.centroids = centroids
        self.offsets = offsets
        self.ids = ids
        self.num_probes = num_probes
        self.exact = ExactSearch(keys, chunk_size)
        self.max_candidates = int(max_candidates)

    def _search(self, queries, k):
        keys = tf.convert_to_tensor(self.keys)
        centroids = tf.convert_to_tensor(self.centroids)
        offsets = tf.convert_to_tensor(self.offsets)
        ids = tf.convert_to_tensor(self.ids)
        k = tf.cast(k, tf.int32)
        n, dim = int(keys.shape[0]), int(keys.shape[1])
        num_partitions = int(centroids.shape[0])
        probes = tf.minimum(tf.cast(self.num_probes, tf.int32), num_partitions)
        c_sq = tf.reduce_sum(tf.square(centroids), axis=-1)
        # Queries per block: about `max_candidates` gathered key values each.
        per_query = tf.cast(probes, tf.float32) * (n / num_partitions) * dim
        block = tf.maximum(1, tf.cast(self.max_candidates / per_query, tf.int32))

        def search_block(q):
            _, probed = tf.math.top_k(-l2_ranking_scores(q, centroids, c_sq), k=probes)
            starts = tf.gather(offsets, probed)
            lengths = tf.gather(offsets, probed + 1) - starts
            row_lengths = tf.reduce_sum(lengths, axis=1)

            def ivf():
                flat_starts = tf.reshape(starts, [-1])
                positions = tf.ragged.range(
                    flat_starts, flat_starts + tf.reshape(lengths, [-1])
                ).flat_values
                candidates = tf.gather(ids, positions)
                owner = tf.repeat(tf.range(tf.shape(q)[0]), row_lengths)
                diff = tf.gather(keys, candidates) - tf.gather(q, owner)
                dist = tf.reduce_sum(tf.square(diff), axis=-1)
                dist = tf.RaggedTensor.from_row_lengths(dist, row_lengths).to_tensor(np.inf)
                cand = tf.RaggedTensor.from_row_lengths(candidates, row_lengths).to_tensor(0)
                _, top = tf.math.top_k(-dist, k=k)
                return tf.gather(cand, top, batch_dims=1)

            return tf.cond(tf.reduce_min(row_lengths) >= k, ivf, lambda: self.exact._search(q, k))

        m = tf.shape(queries)[0]

        def search_all():
            results = tf.TensorArray(tf.int32, size=0, dynamic_size=True, infer_shape=False)

            def body(i, start, results):
                q = queries[start : start + block]
                return i + 1, start + block, results.write(i, search_block(q))

            _, _, results = tf.while_loop(
                lambda i, start, _: start < m,
                body,
                (tf.constant(0), tf.constant(0), results),
                parallel_iterations=1,
            )
            return tf.reshape(results.concat(), [m, k])

        return tf.cond(m > 0, search_all, lambda: tf.zeros([0, k], tf.int32))


# ScaNN's search ops only read their searcher. Declared so, TensorFlow's
# automatic control dependencies stop serialising them, and the query shards
# of one batch (`ScannSearch.search`) run on several cores at once.
_SCANN_READ_ONLY_OPS = ("Scann>ScannSearch", "Scann>ScannSearchBatched")
_scann_ops_module = None


def _scann_ops():
    global _scann_ops_module
    if _scann_ops_module is not None:
        return _scann_ops_module
    try:
        from scann.scann_ops.py import scann_ops
    except ImportError as e:  # pragma: no cover - scann is a hard dependency
        raise ImportError(
            "The ScaNN search backend needs ScaNN's TensorFlow ops: "
            "`pip install 'scann[tf]==1.4.2' 'tensorflow~=2.20.0'`."
        ) from e
    try:
        from tensorflow.python.framework import auto_control_deps_utils
    except ImportError:  # pragma: no cover - a TensorFlow without this module
        pass  # shards still give the right answer, one after another
    else:
        for op_type in _SCANN_READ_ONLY_OPS:
            auto_control_deps_utils.register_read_only_resource_op(op_type)
    _scann_ops_module = scann_ops
    return scann_ops


SCANN_SCORING = ("exact", "ah")
# Options that only asymmetric hashing uses: given without `scoring`, they ask for it.
_SCANN_AH_OPTIONS = ("dimensions_per_block", "reorder")
SCANN_OPTIONS = (
    "brute_force",
    "num_leaves",
    "num_leaves_to_search",
    "training_sample_size",
    "min_partition_size",
    "scoring",
) + _SCANN_AH_OPTIONS


def default_scann_options(memory_size, key_dim):
    """ScaNN settings: ~sqrt(n) leaves, a 128th of them (at least 16) scored exactly.

    `brute_force`: score every entry (no tree); the default below 20,000 entries.
    `num_leaves`: the k-means leaves of the tree. `num_leaves_to_search`: the
    leaves searched per query, nearest centroids first. `training_sample_size`:
    the k-means training sample. `min_partition_size`: k-means re-seeds a
    leaf given fewer training keys than this. `scoring`: how the entries of the searched
    leaves are scored: `"exact"` (float32 distances, the default) or `"ah"`
    (ScaNN's asymmetric hashing, `dimensions_per_block` dims per 4-bit code,
    then the best `reorder` candidates re-scored exactly).

    Measured on Fashion-MNIST `pre_logits` embeddings (32-d ReLU features of
    augmented near-duplicate images; 2 shared CPU cores, `benchmarks/scale.py`):
    at 1M entries, 1,000 leaves with 16 searched found 99.7-99.8% of the 50
    nearest at ~20x the queries per second of exact search (batch 256); at 5M,
    2,236 leaves with 16 searched found 99.7%. Asymmetric hashing with 1,000
    re-ranked candidates found only 88% at 1M (the 50 nearest lie closer
    together than its quantization error) and needed 2,000-4,000 to pass 95%,
    at a third of the speed. For keys of hundreds of dims, try `scoring="ah"`.
    """
    if memory_size < 20_000:
        return {"brute_force": True}
    num_leaves = int(min(max(round(math.sqrt(memory_size)), 16), 65_536))
    return {
        "brute_force": False,
        "num_leaves": num_leaves,
        "num_leaves_to_search": max(16, num_leaves // 128),
        # k-means on 100,000 keys (50 a leaf from 4M entries): at 1M entries
        # the build took 3.1 s against 5.0 s with 250,000, and found 99.7% of
        # the 50 nearest against 99.8%.
        "training_sample_size": int(min(memory_size, max(100_000, 50 * num_leaves))),
        # ScaNN's own default is 50: with a sample of ~50 keys a leaf, half
        # the leaves are re-seeded on every k-means iteration and never
        # settle. At 5M entries (2,236 leaves, 5 searched) recall@50 was
        # 0.868 with 50 and 0.954 with 1; at 1M, 0.952 and 0.958
        # (benchmarks/scann_partitions.py).
        "min_partition_size": 1,
        "scoring": "exact",
    }


def resolve_scann_options(memory_size, key_dim, options=None):
    """The defaults for the memory, overridden by `options` (validated).

    `dimensions_per_block` or `reorder` given without `scoring` select
    `scoring="ah"`; with `scoring="ah"` they default to one dim per block
    (two for keys of over 64 dims, when even) and 1,000 re-ranked candidates.

    Raises:
        ValueError: an unknown option name or a bad value.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(SCANN_OPTIONS))
    if unknown:
        raise ValueError(
            f"Unknown ScaNN option(s) {unknown}. Valid options: {sorted(SCANN_OPTIONS)}. "
            f"Received: scann_options={options!r}"
        )
    opts = default_scann_options(memory_size, key_dim)
    if opts["brute_force"] and options.get("brute_force") is False:
        opts = default_scann_options(20_000, key_dim)  # a tree for a small memory
    if "scoring" not in options and any(name in options for name in _SCANN_AH_OPTIONS):
        options["scoring"] = "ah"
    opts.update(options)
    if opts["brute_force"]:
        return opts
    if opts["scoring"] not in SCANN_SCORING:
        raise ValueError(
            f"ScaNN option `scoring` must be one of {SCANN_SCORING}. "
            f"Received: scoring={opts['scoring']!r}"
        )
    if opts["scoring"] == "ah":
        opts.setdefault("dimensions_per_block", 1 if key_dim <= 64 or key_dim % 2 else 2)
        opts.setdefault("reorder", 1000)
    for name in (
        "num_leaves",
        "num_leaves_to_search",
        "training_sample_size",
        "min_partition_size",
    ) + (_SCANN_AH_OPTIONS if opts["scoring"] == "ah" else ()):
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(
                f"ScaNN option `{name}` must be a positive integer. Received: {name}={value!r}"
            )
        opts[name] = int(value)
    opts["num_leaves_to_search"] = min(opts["num_leaves_to_search"], opts["num_leaves"])
    opts["training_sample_size"] = min(opts["training_sample_size"], memory_size)
    return opts


_search_threads = None


def search_threads():
    """The query shards `ScannSearch` splits a batch into: TensorFlow's inter-op threads.

    Read once: TensorFlow fixes its thread pools when its runtime starts.
    """
    global _search_threads
    if _search_threads is None:
        threads = tf.config.threading.get_inter_op_parallelism_threads()
        if threads <= 0:
            try:
                threads = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - not on Linux
                threads = os.cpu_count() or 1
        _search_threads = max(1, min(int(threads), 64))
    return _search_threads


# Order of ScaNN's serialized tensors, as `scann_to_tensors` returns them.
_SCANN_TENSORS = (
    ("scann_config", tf.string),
    ("serialized_partitioner", tf.string),
    ("datapoint_to_token", tf.int32),
    ("ah_codebook", tf.string),
    ("hashed_dataset", tf.uint8),
    ("int8_dataset", tf.int8),
    ("int8_multipliers", tf.float32),
    ("dp_norms", tf.float32),
)


def _destroy_resource(handle):
    # A finalizer: the garbage collector may call it while some function is
    # being traced. `init_scope` runs the op eagerly, outside that graph;
    # otherwise the op, and the handle, would become part of the trace.
    try:
        with tf.init_scope():
            tf.raw_ops.DestroyResourceOp(resource=handle, ignore_lookup_error=True)
    except Exception:  # pragma: no cover - TensorFlow already shut down
        pass


_SCANN_SHORT_RESULT = (
    "ScaNN found fewer than k neighbours for some query; search more leaves "
    "(scann_options num_leaves_to_search)."
)


class ScannSearch(_Searcher):
    """ScaNN search through its TensorFlow ops, so search runs in the graph.

    Build with `ScannSearch.build(keys, options)`; persist with `save(dir)`
    and `ScannSearch.load(dir, keys)`. The float dataset ScaNN re-ranks with
    is the memory's own key table, so it is not stored twice on disk.

    Args:
        handle: the searcher (a ScaNN resource handle).
        options: the resolved options it was built with.
        leaves_to_search: `None` (the leaves searched are the index's own
            `num_leaves_to_search`), or an int or int32 scalar variable that
            overrides it at search time, as `IVFSearch`'s `num_probes` does.
    """

    name = "scann"

    def __init__(self, handle, options, leaves_to_search=None):
        self.handle = handle
        self.options = dict(options)
        self.leaves_to_search = leaves_to_search

    @property
    def leaves_to_search(self):
        return self._leaves_to_search

    @leaves_to_search.setter
    def leaves_to_search(self, value):
        self._leaves_to_search = value
        self._compiled = None  # traced with the old value

    # Queries per shard at least: a shard is one ScaNN batch, and ScaNN
    # amortises its per-batch work over the queries of a batch.
    min_shard_size = 64

    @classmethod
    def build(cls, keys, options=None):
        """Builds the index of `keys` `(n, d)` (see `resolve_scann_options`).

        `keys` may be an array, a tensor or a variable; a variable's values
        are handed to ScaNN in place, not copied first.
        """
        scann_ops = _scann_ops()
        keys = tf.convert_to_tensor(keys, tf.float32)
        n, d = keys.shape
        opts = resolve_scann_options(n, d, options)
        builder = scann_ops.builder(keys, 10, "squared_l2")
        if opts["brute_force"]:
            builder = builder.score_brute_force()
        else:
            builder = builder.tree(
                num_leaves=opts["num_leaves"],
                num_leaves_to_search=opts["num_leaves_to_search"],
                training_sample_size=opts["training_sample_size"],
                min_partition_size=opts["min_partition_size"],
            )
            if opts["scoring"] == "exact":
                builder = builder.score_brute_force()
            else:
                builder = builder.score_ah(opts["dimensions_per_block"]).reorder(opts["reorder"])
        return cls._owning(builder.build().searcher_handle, opts)

    @classmethod
    def _owning(cls, handle, options):
        """A searcher that frees ScaNN's index once it is garbage-collected.

        ScaNN's index lives in TensorFlow's resource manager, outside Python's
        reach: without `DestroyResourceOp` every index built in a process
        stays in RAM until the process ends.
        """
        searcher = cls(handle, options)
        weakref.finalize(searcher, _destroy_resource, handle).atexit = False
        return searcher

    def search(self, queries, k):
        """The int32 ids `(m, k)` of the `k` nearest keys of each query `(m, d)`.

        A batch is split into up to `search_threads()` shards of at least
        `min_shard_size` queries; inside a `tf.function` (as in `predict`)
        they run in parallel, one core each. ScaNN's own parallel mode only
        splits batches of more than 256 queries. The number of shards is
        fixed when the graph is traced: an exported SavedModel keeps the
        exporting machine's. Called eagerly, a batch too small to shard is
        one call of ScaNN's op: no graph to run, so a single query costs
        little more than ScaNN's own search.
        """
        return super().search(queries, k)

    def _search(self, queries, k):
        k = tf.cast(k, tf.int32)
        handle = self.handle  # one TensorsToScann op for SavedScannSearch
        m = tf.shape(queries)[0]
        shards = search_threads()
        if shards == 1:
            return self._search_shard(handle, queries, k)
        size = tf.maximum((m + shards - 1) // shards, self.min_shard_size)
        parts = [
            self._search_shard(handle, queries[i * size : (i + 1) * size], k) for i in range(shards)
        ]
        return tf.concat(parts, axis=0)

    def _search_eagerly(self, queries, k):
        if search_threads() > 1 and queries.shape[0] >= 2 * self.min_shard_size:
            return None  # shards, in the compiled graph
        ids, _ = _scann_ops().scann_search_batched(
            self.handle, queries, k, *self._search_depth(k), False
        )
        if ids.shape[0] and ids.shape[1] != int(k):
            raise tf.errors.InvalidArgumentError(
                None, None, f"{_SCANN_SHORT_RESULT} k={int(k)}, ids found: {ids.shape[1]}"
            )
        return ids

    def _search_depth(self, k):
        """ScaNN's `pre_reorder_nn` and `leaves_to_search` inputs for a search of `k`.

        Unless overridden, the leaves searched and the candidates re-ranked
        come from the index's own config (-1): a memory saved by an older
        version, with other defaults, searches as it was built. `reorder`
        (asymmetric hashing only) is passed so that it is never below k.
        Eagerly they are Python ints: an eager op apiece would cost more than
        a small search.
        """
        reorder = self.options.get("reorder")
        leaves = self.leaves_to_search
        if tf.executing_eagerly():
            pre = max(int(k), int(reorder)) if reorder else -1
            return pre, -1 if leaves is None else int(leaves)
        pre = tf.maximum(k, int(reorder)) if reorder else tf.constant(-1)
        return pre, tf.constant(-1) if leaves is None else tf.cast(leaves, tf.int32)

    def _search_shard(self, handle, queries, k):
        ids, _ = _scann_ops().scann_search_batched(
            handle, queries, k, *self._search_depth(k), False
        )
        complete = tf.logical_or(tf.shape(ids)[0] == 0, tf.shape(ids)[1] == k)
        check = tf.debugging.Assert(
            complete, [_SCANN_SHORT_RESULT + " k and ids found:", k, tf.shape(ids)[1]]
        )
        with tf.control_dependencies([check]):
            return tf.reshape(ids, [-1, k])

    def index_tensors(self):
        """ScaNN's serialized index, `{name: tensor}` in `_SCANN_TENSORS` order.

        Without the float dataset (`scann_to_tensors`' last tensor): that is
        the memory's key table, which the memory stores itself.
        """
        *tensors, _dataset = _scann_ops().scann_to_tensors(self.handle)
        return {name: t for (name, _), t in zip(_SCANN_TENSORS, tensors, strict=True)}

    def save(self, dir_path):
        """Writes ScaNN's index tensors as plain files (`.npy`, raw bytes).

        A serialized proto is written raw to `<name>.bin`; one the index does
        not have (a scalar tensor: no AH codebook when leaves are scored
        exactly, no partitioner without a tree) as an empty `<name>.none`.
        """
        for (name, dtype), value in zip(_SCANN_TENSORS, self.index_tensors().values(), strict=True):
            present = value.shape.rank > 0
            value = value.numpy()
            if dtype == tf.string:
                with open(
                    os.path.join(dir_path, f"{name}.{'bin' if present else 'none'}"), "wb"
                ) as f:
                    f.write(value[0] if present else b"")
            else:
                np.save(os.path.join(dir_path, f"{name}.npy"), value, allow_pickle=False)

    @classmethod
    def load(cls, dir_path, keys, options):
        tensors = {}
        for name, dtype in _SCANN_TENSORS:
            if dtype == tf.string:
                path = os.path.join(dir_path, f"{name}.bin")
                if os.path.exists(os.path.join(dir_path, f"{name}.none")):
                    tensors[name] = tf.constant("")  # a scalar: the index has none
                    continue
                if not os.path.exists(path):
                    raise ValueError(
                        f"The saved ScaNN index has no '{name}' (looked in {dir_path})."
                    )
                with open(path, "rb") as f:
                    tensors[name] = tf.constant([f.read()])
            else:
                arr = np.load(os.path.join(dir_path, f"{name}.npy"), allow_pickle=False)
                tensors[name] = tf.constant(arr, dtype=dtype)
        handle = _scann_ops().tensors_to_scann(
            tf.convert_to_tensor(keys),
            **tensors,
            # A unique name per index: the op's kernel keeps the first searcher
            # it made, and an eager call with the same attributes reuses that
            # kernel, so a second load would otherwise return the first index.
            shared_name=f"keras_resmem_scann_{uuid.uuid4().hex}",
        )
        return cls._owning(handle, options)


class SavedScannSearch(tf.Module):
    """A ScaNN searcher that a SavedModel can hold: its index as variables.

    `ScannSearch` keeps an eager searcher handle, which a SavedModel cannot
    store. This module keeps ScaNN's serialized index as variables and makes
    the searcher inside the graph, with `TensorsToScann`. That op's kernel
    builds the searcher on its first run and returns it unchanged on every
    later run (it is a resource kernel), so a loaded model builds the index
    once, on its first request, not on every call. Each export gets its own
    `shared_name`, so two exported models in one server never share a searcher.

    Args:
        searcher: the `ScannSearch` to export.
        keys: the memory's key variable (ScaNN's float dataset).
    """

    name = "scann"

    def __init__(self, searcher, keys):
        super().__init__(name="scann_index")
        self.options = dict(searcher.options)
        self._keys = keys
        self.index = {
            name: tf.Variable(value, trainable=False, validate_shape=False, name=name)
            for name, value in searcher.index_tensors().items()
        }
        self.shared_name = f"keras_resmem_scann_{uuid.uuid4().hex}"

    @property
    def handle(self):
        return _scann_ops().tensors_to_scann(
            tf.convert_to_tensor(self._keys),
            **{name: tf.convert_to_tensor(v) for name, v in self.index.items()},
            shared_name=self.shared_name,
        )

    # Always in a graph (an export): the graph path, without the eager one.
    min_shard_size = ScannSearch.min_shard_size
    leaves_to_search = None
    search = ScannSearch._search
    _search_shard = ScannSearch._search_shard
    _search_depth = ScannSearch._search_depth
