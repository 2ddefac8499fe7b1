"""IVF search: an inverted-file index (k-means partitions) in stock TensorFlow ops."""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_resmem.api_export import keras_resmem_export
from keras_resmem.search.base import (
    SearchBackend,
    _Searcher,
    known_options,
    nearest_centroids,
    positive_int_option,
    rescore,
)
from keras_resmem.search.exact import ExactSearch


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
    opts.update(known_options("IVF", options, opts, "ivf_options"))
    for name in ("num_partitions", "num_probes", "training_sample_size", "iterations"):
        opts[name] = positive_int_option("IVF", name, opts[name])
    opts["num_partitions"] = min(opts["num_partitions"], memory_size)
    return opts


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
        assign = nearest_centroids(sample, centroids)
        sums = tf.math.unsorted_segment_sum(sample, assign, num_partitions).numpy()
        counts = np.bincount(assign, minlength=num_partitions)
        empty = counts == 0
        centroids = np.where(empty[:, None], 0.0, sums / np.maximum(counts, 1)[:, None])
        if empty.any():  # re-seed empty partitions on random sample points
            centroids[empty] = sample[rng.choice(sample_size, size=int(empty.sum()))]
        centroids = centroids.astype(np.float32)
        progbar.update(step + 1)
    assign = nearest_centroids(keys, centroids)
    progbar.update(options["iterations"] + 1)
    ids = np.argsort(assign, kind="stable").astype(np.int32)
    offsets = np.zeros(num_partitions + 1, dtype=np.int32)
    np.cumsum(np.bincount(assign, minlength=num_partitions), out=offsets[1:])
    return centroids, offsets, ids


IVF_SCORING = ("exact", "bfloat16")

# bfloat16 scoring re-scores the best k + SHORTLIST_EXTRA candidates exactly.
SHORTLIST_EXTRA = 16

# Rows of a partition scored together: a query's candidates are whole blocks
# of this many consecutive entries of its probed partitions (see `IVFSearch`).
BLOCK_ROWS = 16


def partition_major(keys, ids, centroids, offsets):
    """The arrays of IVF's bfloat16 scoring, by name, from the keys and the lists.

    The lists in blocks of `BLOCK_ROWS` rows, each partition starting a new
    block:

    - `block_offsets` `(P + 1,)`: partition `p` holds blocks
      `block_offsets[p]:block_offsets[p + 1]`;
    - `block_keys` `(B, BLOCK_ROWS, d)` bfloat16: each entry's residual to
      its partition's centroid, `keys[i] - centroids[p]` (zeros for padding).
      A residual is small, so bfloat16's 8-bit mantissa costs far less than
      on the key itself, whose dot product with a query is rounded to
      bfloat16 as well;
    - `block_norms` `(B, BLOCK_ROWS)`: `||keys[i]||^2`, +inf for padding;
    - `block_ids` `(B, BLOCK_ROWS)` int32: the entries' positions, 0 for padding.

    Computed in chunks: no float64 copy of the keys is made.
    """
    keys = np.asarray(keys)
    ids = np.asarray(ids)
    chunk = 65536

    def squared_norms(rows):
        rows = rows.astype(np.float64)
        return np.einsum("ij,ij->i", rows, rows).astype(np.float32)

    rows = BLOCK_ROWS
    sizes = np.diff(np.asarray(offsets, np.int64))
    blocks = (sizes + rows - 1) // rows
    block_offsets = np.zeros(len(sizes) + 1, np.int32)
    np.cumsum(blocks, out=block_offsets[1:])
    owner = np.repeat(np.arange(len(sizes)), sizes)
    # Where each entry of the lists goes in the blocks' rows.
    slot = block_offsets[owner] * rows + (np.arange(len(ids)) - np.repeat(offsets[:-1], sizes))
    total = int(block_offsets[-1]) * rows
    block_keys = np.zeros((total, keys.shape[1]), tf.bfloat16.as_numpy_dtype)
    block_norms = np.full(total, np.inf, np.float32)
    block_ids = np.zeros(total, np.int32)
    centroids = np.asarray(centroids, np.float32)
    for start in range(0, len(ids), chunk):
        where = slot[start : start + chunk]
        entries = keys[ids[start : start + chunk]]
        residual = entries - centroids[owner[start : start + chunk]]
        block_keys[where] = residual.astype(block_keys.dtype)
        block_norms[where] = squared_norms(entries)
        block_ids[where] = ids[start : start + chunk]
    return {
        "block_offsets": block_offsets,
        "block_keys": block_keys.reshape(-1, rows, keys.shape[1]),
        "block_norms": block_norms.reshape(-1, rows),
        "block_ids": block_ids.reshape(-1, rows),
    }


class IVFSearch(_Searcher):
    """Inverted-file (IVF) search in stock TensorFlow ops.

    Each query is compared with the `P` partition centroids, the `num_probes`
    nearest partitions are opened, and all their entries are scored; the `k`
    best are returned. A query whose probed partitions hold fewer than `k`
    entries is answered by exact search (that query alone, not its batch), so
    `k` ids are always real neighbours. Queries are scored in blocks so that
    at most about `max_candidates` candidate key values are gathered at once.

    Two ways to score the candidates:

    - from the key table (`blocks=None`): each candidate's key is gathered
      and its squared L2 distance to the query computed;
    - from `blocks` (`partition_major(..., "bfloat16")`): the lists laid out
      in blocks of `BLOCK_ROWS` bfloat16 residuals to the centroids. A query
      gathers whole blocks (one index per `BLOCK_ROWS` entries, half the
      bytes of float32 keys), ranks them by `||k||^2 - 2 q.k` with
      `q.k = q.c + q.(k - c)` (the centroid's part in float32), and the best
      `k + SHORTLIST_EXTRA` are scored again exactly against the keys.

    Args:
        keys: the memory keys `(n, d)`.
        centroids, offsets, ids: the index (see `train_ivf`), variables or tensors.
        num_probes: the number of partitions probed (a scalar variable or int).
        chunk_size: chunk size of the exact fallback.
        max_candidates: the budget of gathered key values per query block.
        blocks: None, or the `partition_major` arrays of bfloat16 scoring,
            by name (variables or tensors).
    """

    name = "ivf"

    def __init__(
        self,
        keys,
        centroids,
        offsets,
        ids,
        num_probes,
        chunk_size=65536,
        max_candidates=2**24,
        blocks=None,
    ):
        self.keys = keys
        self.centroids = centroids
        self.offsets = offsets
        self.ids = ids
        self.num_probes = num_probes
        self.blocks = blocks
        self.exact = ExactSearch(keys, chunk_size)
        self.max_candidates = int(max_candidates)

    def _search(self, queries, k):
        keys = tf.convert_to_tensor(self.keys)
        centroids = tf.convert_to_tensor(self.centroids)
        offsets = tf.convert_to_tensor(self.offsets)
        ids = tf.convert_to_tensor(self.ids)
        blocks = None
        if self.blocks is not None:
            blocks = {name: tf.convert_to_tensor(v) for name, v in self.blocks.items()}
        k = tf.cast(k, tf.int32)
        # Sizes are read at run time: the memory grows and shrinks under a
        # compiled graph, and the partitions may be trained again.
        n = tf.cast(tf.shape(keys)[0], tf.float32)
        dim = int(keys.shape[1])
        num_partitions = tf.shape(centroids)[0]
        probes = tf.minimum(tf.cast(self.num_probes, tf.int32), num_partitions)
        c_sq = tf.reduce_sum(tf.square(centroids), axis=-1)
        # Queries per block: about `max_candidates` gathered key values each.
        per_query = tf.cast(probes, tf.float32) * (n / tf.cast(num_partitions, tf.float32) + 8)
        block = tf.maximum(1, tf.cast(self.max_candidates / (per_query * dim), tf.int32))

        def block_list(first_blocks, num_blocks):
            """`(blocks, probe, valid)` `(m, T)`: each query's blocks, padded.

            Query i's blocks are `first_blocks[i, j] + [0, num_blocks[i, j])`
            for each probe j in turn; `probe` is the probe of each, `valid`
            false for padding (whose block is 0).
            """
            cum = tf.cumsum(num_blocks, axis=1)
            total = cum[:, -1]
            width = tf.maximum(tf.reduce_max(total), 0)
            t = tf.range(width)[None, :] + tf.zeros_like(total)[:, None]
            probe = tf.minimum(tf.searchsorted(cum, t, side="right"), probes - 1)
            valid = t < total[:, None]
            first = tf.gather(first_blocks - (cum - num_blocks), probe, batch_dims=1)
            return tf.where(valid, first + t, 0), probe, valid

        def at_least(width, *tensors_and_fills):
            """Pads each `(m, C)` tensor with its fill to at least `width` columns."""
            pad = [[0, 0], [0, tf.maximum(width - tf.shape(tensors_and_fills[0][0])[1], 0)]]
            return [tf.pad(t, pad, constant_values=fill) for t, fill in tensors_and_fills]

        def from_key_table(q, m, starts, ends, row_lengths):
            with tf.name_scope("ivf_candidates"):
                flat_starts = tf.reshape(starts, [-1])
                positions = tf.ragged.range(
                    flat_starts, flat_starts + tf.reshape(ends - starts, [-1])
                ).flat_values
                candidates = tf.gather(ids, positions)
                owner = tf.repeat(tf.range(m), row_lengths)
            with tf.name_scope("ivf_scoring"):
                diff = tf.gather(keys, candidates) - tf.gather(q, owner)
                dist = tf.reduce_sum(tf.square(diff), axis=-1)
                dist = tf.RaggedTensor.from_row_lengths(dist, row_lengths).to_tensor(np.inf)
                cand = tf.RaggedTensor.from_row_lengths(candidates, row_lengths).to_tensor(0)
                dist, cand = at_least(k, (dist, np.inf), (cand, 0))
            with tf.name_scope("ivf_top_k"):
                _, top = tf.math.top_k(-dist, k=k)
                return tf.gather(cand, top, batch_dims=1)

        def from_blocks(q, m, probed, q_dot_c):
            with tf.name_scope("ivf_candidates"):
                block_offsets = blocks["block_offsets"]
                first = tf.gather(block_offsets, probed)
                chosen, probe, valid = block_list(
                    first, tf.gather(block_offsets, probed + 1) - first
                )
            with tf.name_scope("ivf_scoring"):
                residuals = tf.gather(blocks["block_keys"], chosen)  # (m, T, rows, d)
                dots = tf.einsum("mtrd,md->mtr", residuals, tf.cast(q, residuals.dtype))
                # q.k = q.c + q.(k - c): the centroid's part in float32.
                q_dot_probed = tf.gather(q_dot_c, probed, batch_dims=1)
                dots = tf.cast(dots, tf.float32)
                dots += tf.gather(q_dot_probed, probe, batch_dims=1)[:, :, None]
                scores = tf.gather(blocks["block_norms"], chosen) - 2.0 * dots
                scores = tf.reshape(tf.where(valid[:, :, None], scores, np.inf), [m, -1])
                positions = tf.reshape(tf.gather(blocks["block_ids"], chosen), [m, -1])
                size = k + SHORTLIST_EXTRA
                scores, positions = at_least(size, (scores, np.inf), (positions, 0))
            with tf.name_scope("ivf_top_k"):
                # A shortlist, scored again against the float32 keys.
                # Unsorted: the shortlist's order does not matter, and
                # sorting it costs a sixth of the top-k.
                best, columns = tf.math.top_k(-scores, k=size, sorted=False)
            with tf.name_scope("ivf_rescoring"):
                # Padding (a query with fewer than `size` candidates) stays last.
                short = tf.gather(positions, columns, batch_dims=1)
                return rescore(keys, q, short, k, valid=tf.math.is_finite(best), sorted=False)

        def search_block(q):
            m = tf.shape(q)[0]
            with tf.name_scope("ivf_probe"):
                q_dot_c = tf.matmul(q, centroids, transpose_b=True)
                # bfloat16 scoring needs no order of the probes (float32 keeps
                # the order it always had).
                _, probed = tf.math.top_k(
                    2.0 * q_dot_c - c_sq[None, :], k=probes, sorted=blocks is None
                )
                starts = tf.gather(offsets, probed)
                ends = tf.gather(offsets, probed + 1)
                row_lengths = tf.reduce_sum(ends - starts, axis=1)
            if blocks is None:
                found = from_key_table(q, m, starts, ends, row_lengths)
            else:
                found = from_blocks(q, m, probed, q_dot_c)
            # A query whose probed partitions hold fewer than k entries: exact
            # search for that row alone, never for its whole batch.
            short = row_lengths < k

            def patch():
                with tf.name_scope("ivf_exact_rows"):
                    rows = tf.where(short)
                    exact = self.exact._search(tf.gather_nd(q, rows), k)
                    return tf.tensor_scatter_nd_update(found, rows, exact)

            return tf.cond(tf.reduce_any(short), patch, lambda: found)

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

        def search_one_block():
            return tf.reshape(search_block(queries), [m, k])

        return tf.cond(
            m > block,
            search_all,
            lambda: tf.cond(m > 0, search_one_block, lambda: tf.zeros([0, k], tf.int32)),
        )


# When `IVF.entries_added` trains the partitions again, rather than assigning
# new entries to the existing ones: growth past this factor of the entries
# the partitions were trained on, or imbalance past this factor of its value
# after training.
RETRAIN_GROWTH = 2.0
RETRAIN_IMBALANCE = 1.5


def _imbalance(offsets):
    """`P * sum(size^2) / n^2` of partitions given by `offsets`: 1 when all are equal."""
    sizes = np.diff(np.asarray(offsets, np.int64)).astype(np.float64)
    n = sizes.sum()
    return float(len(sizes) * np.square(sizes).sum() / (n * n)) if n else 1.0


class _BlockState(tf.Module):
    """The arrays of IVF's bfloat16 scoring (`partition_major`), as variables.

    Derived from the keys and the lists, so not the layer's weights: a
    `.keras` file does not hold them (they are computed again at load), a
    SavedModel does (`IVF.for_export`). Their first dimension can change,
    like the memory's.
    """

    def __init__(self, key_dim):
        super().__init__(name="ivf_blocks")
        rows = BLOCK_ROWS
        shapes = {
            "block_offsets": ([None], tf.int32),
            "block_keys": ([None, rows, key_dim], tf.bfloat16),
            "block_norms": ([None, rows], tf.float32),
            "block_ids": ([None, rows], tf.int32),
        }
        self.arrays = {
            name: tf.Variable(
                tf.zeros([0, *shape[1:]], dtype),
                shape=tf.TensorShape(shape),
                trainable=False,
                name=name,
            )
            for name, (shape, dtype) in shapes.items()
        }

    def assign(self, arrays):
        for name, variable in self.arrays.items():
            variable.assign(arrays[name])


_IVF_OPTIONS = ("num_partitions", "num_probes", "training_sample_size", "iterations", "seed")


@keras_resmem_export("keras_resmem.search.IVF")
class IVF(SearchBackend):
    """Approximate search with an inverted-file index, in stock TensorFlow ops.

    k-means splits the memory into `num_partitions` partitions; a query
    opens the `num_probes` partitions with the nearest centroids and scores
    their entries exactly. Fast on large memories, and exported models run on
    stock TensorFlow Serving. `num_probes` can be changed at any time
    (`memory.num_probes`), also in a compiled model. Options left `None`
    take the defaults of `keras_resmem.search.default_ivf_options`, which
    depend on the memory's size.

    Args:
        num_partitions: the number of k-means partitions (inverted lists).
        num_probes: the partitions searched per query.
        training_sample_size: the k-means training sample.
        iterations: k-means iterations.
        seed: the k-means seed.
        chunk_size: the chunk size of the exact fallback (see `Exact`).
        scoring: how candidates are scored. `"exact"` (the default): against
            the float32 key table, in place. `"bfloat16"`: against each
            entry's residual to its centroid in bfloat16, laid out partition
            by partition in blocks of 16 (gathered whole), then the best
            `k + 16` again exactly against the keys. Faster where the CPU has
            bfloat16 arithmetic (AVX512-BF16, AMX; see docs/BENCHMARKS.md),
            for about half the key table's bytes more RAM. The copy is
            derived: not saved in a `.keras` file, made again at load.

    Example:

    >>> import numpy as np
    >>> import keras_resmem
    >>> search = keras_resmem.search.IVF(num_partitions=4, num_probes=2)
    >>> memory = keras_resmem.ResidualMemory(k=2, search=search)
    >>> x = np.random.default_rng(0).normal(size=(100, 8))
    >>> memory.memorize(x, np.zeros((100, 3)), np.arange(100) % 3)
    >>> memory.num_probes
    2
    """

    name = "ivf"
    knobs = ("num_probes",)

    def __init__(
        self,
        num_partitions=None,
        num_probes=None,
        training_sample_size=None,
        iterations=None,
        seed=None,
        chunk_size=65536,
        scoring="exact",
    ):
        if scoring not in IVF_SCORING:
            raise ValueError(f"IVF `scoring` must be one of {IVF_SCORING}. Received: {scoring!r}")
        self.scoring = scoring
        self.options = {
            name: positive_int_option("IVF", name, value)
            for name, value in (
                ("num_partitions", num_partitions),
                ("num_probes", num_probes),
                ("training_sample_size", training_sample_size),
                ("iterations", iterations),
            )
        }
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"IVF option `seed` must be an integer. Received: seed={seed!r}")
        self.options["seed"] = None if seed is None else int(seed)
        self.chunk_size = positive_int_option("IVF", "chunk_size", chunk_size)
        self._resolved = None
        self._probes = None
        self._trained = None
        # How many times `entries_added` trained the partitions again.
        self.retrainings = 0

    def get_config(self):
        config = dict(self.options)
        if self._probes is not None:  # changed since it was built
            config["num_probes"] = int(self._probes.numpy())
        return {**config, "chunk_size": self.chunk_size, "scoring": self.scoring}

    def resolve(self, memory_size, key_dim):
        self._resolved = resolve_ivf_options(memory_size, self.options)
        return self

    def build(self, keys, add_weight, initializer):
        super().build(keys, add_weight, initializer)
        p, n, d = self._resolved["num_partitions"], *keys.shape
        # Growable: entries are added and removed in place, and the
        # partitions may be trained again, to another count.
        self.centroids = add_weight(
            name="ivf_centroids", shape=(p, d), initializer="zeros", growable=True
        )
        self.offsets = add_weight(
            name="ivf_offsets", shape=(p + 1,), dtype="int32", initializer="zeros", growable=True
        )
        self.ids = add_weight(
            name="ivf_ids", shape=(n,), dtype="int32", initializer=initializer, growable=True
        )
        self._probes = add_weight(
            name="num_probes", shape=(), dtype="int32", initializer="zeros", trainable=False
        )
        self._probes.assign(self._resolved["num_probes"])
        self._blocks = _BlockState(d) if self.scoring == "bfloat16" else None
        self._kernel = IVFSearch(
            keys,
            self.centroids,
            self.offsets,
            self.ids,
            self._probes,
            chunk_size=self.chunk_size,
            blocks=None if self._blocks is None else self._blocks.arrays,
        )

    def fit(self, verbose=0):
        # A read-only view of the key variable: `.numpy()` would copy it.
        keys = np.asarray(tf.convert_to_tensor(self.keys))
        centroids, offsets, ids = train_ivf(keys, self._resolved, verbose=verbose)
        self._install(centroids, offsets, ids)
        self._trained = (len(keys), _imbalance(offsets))

    def adopt_index(self, centroids, offsets, ids):
        """Takes partitions trained elsewhere: a sharded memory's shared centroids and lists."""
        arrays = {
            "keys": np.asarray(tf.convert_to_tensor(self.keys)),
            "ivf_centroids": np.asarray(centroids, np.float32),
            "ivf_offsets": np.asarray(offsets, np.int32),
            "ivf_ids": np.asarray(ids, np.int32),
        }

        def fail(part, problem):
            raise ValueError(f"The IVF index given is invalid: {part} {problem}.")

        self.check_loaded(arrays, fail)
        self._install(arrays["ivf_centroids"], arrays["ivf_offsets"], arrays["ivf_ids"])
        self._trained = None

    def _install(self, centroids, offsets, ids):
        self.centroids.assign(centroids)
        self.offsets.assign(offsets)
        self.ids.assign(ids)
        self._lay_out_blocks()

    def _lay_out_blocks(self):
        """bfloat16 scoring: lays the blocks out again (`partition_major`)."""
        if self._blocks is None:
            return
        keys = np.asarray(tf.convert_to_tensor(self.keys))
        ids = np.asarray(tf.convert_to_tensor(self.ids))
        self._blocks.assign(
            partition_major(keys, ids, self.centroids.numpy(), self.offsets.numpy())
        )

    def _baseline(self):
        """`(entries, imbalance)` when the partitions were trained (or loaded)."""
        if self._trained is None:
            self._trained = (int(self.keys.shape[0]), _imbalance(self.offsets.numpy()))
        return self._trained

    def entries_added(self, start, verbose=0):
        """Assigns the new entries to the existing partitions; trains again past a threshold.

        The partitions are trained again (k-means on the whole memory) when
        the memory has grown to more than `RETRAIN_GROWTH` (2) times the
        entries they were trained on, or when the partitions' imbalance
        (`P * sum(size^2) / n^2`, 1 when every partition is the same size:
        the expected search cost relative to balanced partitions) has grown
        past `RETRAIN_IMBALANCE` (1.5) times its value after training.
        """
        trained_size, trained_imbalance = self._baseline()
        keys = np.asarray(tf.convert_to_tensor(self.keys))
        n = len(keys)
        centroids = self.centroids.numpy()
        offsets = self.offsets.numpy()
        assign = nearest_centroids(keys[start:], centroids)
        sizes = np.diff(offsets) + np.bincount(assign, minlength=len(centroids))
        new_offsets = np.zeros_like(offsets)
        np.cumsum(sizes, out=new_offsets[1:])
        if n > RETRAIN_GROWTH * trained_size or (
            _imbalance(new_offsets) > RETRAIN_IMBALANCE * trained_imbalance
        ):
            self.retrainings += 1
            self.resolve(n, keys.shape[1])
            self.fit(verbose=verbose)
            return
        old_owner = np.repeat(np.arange(len(centroids), dtype=np.int32), np.diff(offsets))
        owner = np.concatenate([old_owner, assign])
        members = np.concatenate([self.ids.numpy(), np.arange(start, n, dtype=np.int32)])
        order = np.argsort(owner, kind="stable")
        self._install(centroids, new_offsets, members[order])

    def entries_removed(self, kept, verbose=0):
        """Drops the removed entries from their partitions, and renumbers the rest.

        The centroid of every partition that held a removed entry is
        recomputed as the mean of the entries it keeps (the mean of all the
        entries left, for a partition left empty), so that no centroid is
        computed from a removed entry.
        """
        self._baseline()
        keys = np.asarray(tf.convert_to_tensor(self.keys))
        offsets = self.offsets.numpy()
        ids = self.ids.numpy()
        num_partitions = len(offsets) - 1
        owner = np.repeat(np.arange(num_partitions, dtype=np.int32), np.diff(offsets))
        new_position = np.full(int(ids.max(initial=-1)) + 1, -1, np.int64)
        new_position[kept] = np.arange(len(kept))
        remapped = new_position[ids]
        alive = remapped >= 0
        touched = np.unique(owner[~alive])
        owner, members = owner[alive], remapped[alive].astype(np.int32)
        sizes = np.bincount(owner, minlength=num_partitions)
        new_offsets = np.zeros_like(offsets)
        np.cumsum(sizes, out=new_offsets[1:])
        centroids = self.centroids.numpy()
        if len(touched):
            sums = tf.math.unsorted_segment_sum(
                tf.gather(keys, members), owner, num_partitions
            ).numpy()
            fallback = keys.mean(axis=0) if len(keys) else np.zeros(keys.shape[1], np.float32)
            counts = np.maximum(sizes, 1)[:, None]
            recomputed = np.where(sizes[:, None] > 0, sums / counts, fallback[None, :])
            centroids[touched] = recomputed[touched].astype(np.float32)
        self._install(centroids, new_offsets, members)

    def search(self, queries, k):
        return self._kernel.search(queries, k)

    def keys_changed(self):
        # Loaded weights: what they hold is the new baseline for retraining.
        self._trained = None
        self._lay_out_blocks()

    def for_export(self):
        # bfloat16 scoring's blocks are variables of their own, not the layer's.
        return self, [] if self._blocks is None else [self._blocks]

    def check_loaded(self, arrays, fail):
        n, d = arrays["keys"].shape
        centroids, offsets, ids = (arrays[f"ivf_{x}"] for x in ("centroids", "offsets", "ids"))
        if centroids.ndim != 2 or centroids.shape[1] != d or len(centroids) < 1:
            fail("`ivf_centroids`", f"has shape {centroids.shape}, not (partitions, {d})")
        if not np.isfinite(centroids).all():
            fail("`ivf_centroids`", "holds NaN or infinite values")
        if offsets.shape != (len(centroids) + 1,):
            fail("`ivf_offsets`", f"has shape {offsets.shape}, not ({len(centroids) + 1},)")
        if offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
            fail("`ivf_offsets`", f"must rise from 0 to the {n} entries")
        if ids.shape != (n,) or not np.array_equal(np.sort(ids), np.arange(n)):
            fail("`ivf_ids`", f"must list every entry 0..{n - 1} once")
        if "num_probes" in arrays and int(arrays["num_probes"]) < 1:
            fail("`num_probes`", f"is {int(arrays['num_probes'])}, not positive")

    def legacy_variable_names(self):
        return ["ivf_centroids", "ivf_offsets", "ivf_ids", "num_probes"]

    def storage_bytes(self):
        return sum(
            math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
            for v in (self.centroids, self.offsets, self.ids)
        )

    def get_knob(self, name):
        if name != "num_probes":
            return super().get_knob(name)
        if self._probes is None:
            return self._resolved["num_probes"] if self._resolved else self.options["num_probes"]
        if tf.executing_eagerly():
            return int(self._probes.numpy())
        return tf.convert_to_tensor(self._probes)

    def set_knob(self, name, value):
        if name != "num_probes":
            return super().set_knob(name, value)
        value = positive_int_option("IVF", "num_probes", value)
        if value is None:
            raise ValueError("IVF option `num_probes` must be a positive integer. Received: None")
        self.options["num_probes"] = value
        if self._resolved is not None:
            self._resolved["num_probes"] = value
        if self._probes is not None:
            self._probes.assign(value)
