"""ScaNN search, through ScaNN's TensorFlow ops (a custom op library of `scann[tf]`)."""

import math
import os
import threading
import uuid
import warnings
import weakref

import numpy as np
import tensorflow as tf

from keras_resmem.api_export import keras_resmem_export
from keras_resmem.search.base import (
    SearchBackend,
    _Searcher,
    known_options,
    nearest_centroids,
    rescore,
)

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
        warnings.warn(
            "This TensorFlow has no `auto_control_deps_utils`: ScaNN's query shards will run "
            "one after another, not in parallel (the answers are the same).",
            RuntimeWarning,
            stacklevel=2,
        )
    else:
        for op_type in _SCANN_READ_ONLY_OPS:
            auto_control_deps_utils.register_read_only_resource_op(op_type)
    _scann_ops_module = scann_ops
    return scann_ops


SCANN_SCORING = ("exact", "int8", "ah")
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
    """ScaNN settings: ~sqrt(n) leaves, a 128th of them (at least 16) searched.

    `brute_force`: score every entry (no tree); the default below 20,000 entries.
    `num_leaves`: the k-means leaves of the tree. `num_leaves_to_search`: the
    leaves searched per query, nearest centroids first. `training_sample_size`:
    the k-means training sample. `min_partition_size`: k-means re-seeds a
    leaf given fewer training keys than this. `scoring`: how the entries of the searched
    leaves are scored: `"exact"` (the default: float32 distances in ScaNN),
    `"int8"` (ScaNN's 8-bit scalar quantization, then the best
    `max(reorder, 2 * k)` candidates re-scored exactly against the memory's
    own keys; `reorder` defaults to 100) or `"ah"` (ScaNN's asymmetric
    hashing, `dimensions_per_block` dims per 4-bit code, then the best
    `reorder` candidates re-scored exactly by ScaNN).

    With `"int8"` ScaNN keeps no float copy of the keys: the memory's key
    table is the only one, and the build peaks at about one copy of the keys
    less than with `"exact"`, whose float input ScaNN copies twice while it
    loads it. At 5M entries it found 99.79% of the 50 nearest, `"exact"`
    99.81%, at about 0.85x its queries per second at batch 256
    (`benchmarks/scann_scoring.py`, docs/BENCHMARKS.md).

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
    options = known_options("ScaNN", options, SCANN_OPTIONS, "scann_options")
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
    if opts["scoring"] == "int8":
        # Candidates re-scored exactly (at least 2k): at 5M entries, in a
        # development check over 1,000 queries, 100 candidates for k=50
        # found 99.8% of the 50 nearest, 50 (no re-scoring) 91%.
        opts.setdefault("reorder", 100)
    for name in (
        "num_leaves",
        "num_leaves_to_search",
        "training_sample_size",
        "min_partition_size",
    ) + {"ah": _SCANN_AH_OPTIONS, "int8": ("reorder",)}.get(opts["scoring"], ()):
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


def check_index_files(dir_path, memory_size, key_dim):
    """Checks a saved ScaNN index in Python before ScaNN's native code reads it.

    ScaNN's loader trusts its input: an out-of-range token, an empty or
    truncated partitioner crash the process (SIGSEGV, SIGABRT), whatever
    Keras's `safe_mode`. Here the protos are parsed with Python's protobuf
    and the arrays read with NumPy, and everything the loader indexes with
    is checked against the memory: the key width, the number of entries,
    token ids within the leaf count, hash codes within the codebook.

    Raises:
        ValueError: naming the file and the problem.
    """
    from google.protobuf.message import DecodeError
    from scann.partitioning import partitioner_pb2
    from scann.proto import centers_pb2, scann_pb2

    def fail(name, problem):
        raise ValueError(
            f"The saved ScaNN index is invalid: {name} {problem} (memory: {memory_size} "
            f"entries of {key_dim}-d keys). The file is corrupt or was modified; it was not "
            "loaded."
        )

    def proto(name, message):
        path = os.path.join(dir_path, f"{name}.bin")
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            data = f.read()
        try:
            message.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as e:
            fail(f"{name}.bin", f"does not parse ({e})")
        if not data:
            fail(f"{name}.bin", "is empty")
        return message

    def array(name, dtype):
        path = os.path.join(dir_path, f"{name}.npy")
        if not os.path.exists(path):
            fail(f"{name}.npy", "is missing")
        try:
            value = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            fail(f"{name}.npy", f"cannot be read ({e})")
        if value.dtype != np.dtype(dtype):
            fail(f"{name}.npy", f"has dtype {value.dtype}, not {np.dtype(dtype)}")
        return value if value.ndim else None  # a scalar: the index does not use it

    config = proto("scann_config", scann_pb2.ScannConfig())
    if config is None:
        fail("scann_config.bin", "is missing")
    if config.distance_measure.distance_measure != "SquaredL2Distance":
        fail("scann_config.bin", f"names distance {config.distance_measure.distance_measure!r}")
    tokens = array("datapoint_to_token", np.int32)
    partitioner = proto("serialized_partitioner", partitioner_pb2.SerializedPartitioner())
    if config.HasField("partitioning"):
        if partitioner is None:
            fail("serialized_partitioner.bin", "is missing, but the config has a tree")
        if partitioner.HasField("linear_projection") or partitioner.uses_projection:
            fail("serialized_partitioner.bin", "is not a k-means tree")
        root = partitioner.kmeans.kmeans_tree.root
        leaves = int(partitioner.n_tokens)
        if leaves < 1 or len(root.centers) != leaves or len(root.children) != leaves:
            fail(
                "serialized_partitioner.bin",
                f"has {leaves} tokens, {len(root.centers)} centers and {len(root.children)} "
                "leaves; they must be equal and positive",
            )
        if config.partitioning.num_children != leaves:
            fail("scann_config.bin", f"has {config.partitioning.num_children} leaves, not {leaves}")
        for i, center in enumerate(root.centers):
            width = len(center.dimension) or len(center.float_dimension)
            if width != key_dim:
                fail("serialized_partitioner.bin", f"has a {width}-d center (leaf {i})")
        leaf_ids = sorted(child.leaf_id for child in root.children)
        if leaf_ids != list(range(leaves)) or any(len(c.children) for c in root.children):
            fail("serialized_partitioner.bin", "is not a one-level tree with leaves 0..n-1")
        if tokens is None or tokens.shape != (memory_size,):
            fail("datapoint_to_token.npy", f"must hold one token per entry ({memory_size})")
        if tokens.min() < 0 or tokens.max() >= leaves:
            fail(
                "datapoint_to_token.npy",
                f"holds tokens from {tokens.min()} to {tokens.max()}, outside [0, {leaves})",
            )
    elif partitioner is not None or tokens is not None and tokens.size:
        fail("serialized_partitioner.bin", "is present, but the config has no tree")
    hashed = array("hashed_dataset", np.uint8)
    codebook = proto("ah_codebook", centers_pb2.CentersForAllSubspaces())
    if config.HasField("hash"):
        blocks = config.hash.asymmetric_hash.projection.num_blocks
        per_block = config.hash.asymmetric_hash.num_clusters_per_block
        if hashed is None or hashed.shape != (memory_size, blocks):
            fail("hashed_dataset.npy", f"must have shape ({memory_size}, {blocks})")
        if hashed.size and int(hashed.max()) >= per_block:
            fail("hashed_dataset.npy", f"holds codes up to {hashed.max()}, not below {per_block}")
        if codebook is not None and (
            len(codebook.subspace_centers) != blocks
            or any(len(sub.center) != per_block for sub in codebook.subspace_centers)
        ):
            fail("ah_codebook.bin", f"does not have {blocks} blocks of {per_block} centers")
    elif hashed is not None and hashed.size:
        fail("hashed_dataset.npy", "is present, but the config has no hashing")
    int8 = array("int8_dataset", np.int8)
    if int8 is not None and int8.size and int8.shape != (memory_size, key_dim):
        fail("int8_dataset.npy", f"must have shape ({memory_size}, {key_dim})")
    if config.brute_force.fixed_point.enabled and config.HasField("partitioning"):
        # Int8-scored leaves: ScaNN is given no float keys, only these codes.
        if int8 is None or int8.shape != (memory_size, key_dim):
            fail("int8_dataset.npy", f"must have shape ({memory_size}, {key_dim})")
        scales = array("int8_multipliers", np.float32)
        if scales is None or scales.shape != (key_dim,):
            fail("int8_multipliers.npy", f"must have shape ({key_dim},)")
    for name, shape in (("int8_multipliers", (key_dim,)), ("dp_norms", (memory_size,))):
        value = array(name, np.float32)
        if value is not None and value.size:
            if value.shape != shape:
                fail(f"{name}.npy", f"must have shape {shape}")
            if not np.isfinite(value).all():
                fail(f"{name}.npy", "holds NaN or infinite values")


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
    and `ScannSearch.load(dir, keys)`. The float dataset of float-scored
    leaves is the memory's own key table, so it is not stored twice on disk;
    int8-scored leaves give ScaNN no float dataset at all, and
    their candidates are re-scored against the memory's keys.

    Args:
        handle: the searcher (a ScaNN resource handle).
        options: the resolved options it was built with.
        leaves_to_search: `None` (the leaves searched are the index's own
            `num_leaves_to_search`), or an int or int32 scalar variable that
            overrides it at search time, as `IVFSearch`'s `num_probes` does.
        keys: the memory's keys (`scoring="int8"`: ScaNN holds no float copy,
            and its candidates are re-scored against these).
    """

    name = "scann"

    def __init__(self, handle, options, leaves_to_search=None, keys=None):
        self.handle = handle
        self.options = dict(options)
        self.leaves_to_search = leaves_to_search
        # The float keys that `scoring="int8"` re-scores its candidates with.
        self._keys = keys

    @property
    def leaves_to_search(self):
        return self._leaves_to_search

    @leaves_to_search.setter
    def leaves_to_search(self, value):
        self._leaves_to_search = value
        self._compiled = None  # traced with the old value

    def _handle(self):
        return self.handle

    # Queries per shard at least: a shard is one ScaNN batch, and ScaNN
    # amortises its per-batch work over the queries of a batch.
    min_shard_size = 64

    @classmethod
    def build(cls, keys, options=None, shared_name=None):
        """Builds the index of `keys` `(n, d)` (see `resolve_scann_options`).

        `keys` may be an array, a tensor or a variable; a variable's values
        are handed to ScaNN in place, not copied first. With `shared_name`
        the index is created under that name and the caller owns it (see
        `ScaNN`); without, the searcher owns it and frees it when collected.
        """
        scann_ops = _scann_ops()
        source = keys
        keys = tf.convert_to_tensor(keys, tf.float32)
        n, d = keys.shape
        opts = resolve_scann_options(n, d, options)
        if _int8_leaves(opts):
            tensors = _int8_index_tensors(keys, opts)
            handle = scann_ops.tensors_to_scann(
                tf.zeros([0, d], tf.float32),
                **tensors,
                shared_name=shared_name or f"keras_resmem_scann_{uuid.uuid4().hex}",
            )
            del tensors
            # The variable itself, when given one: a compiled search reads
            # the memory's current keys, not those of this build.
            keys = keys if isinstance(source, np.ndarray) else source
            if shared_name is not None:
                return cls(handle, opts, keys=keys)
            return cls._owning(handle, opts, keys=keys)
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
        if shared_name is not None:
            return cls(builder.build(shared_name=shared_name).searcher_handle, opts)
        return cls._owning(builder.build().searcher_handle, opts)

    @classmethod
    def _owning(cls, handle, options, keys=None):
        """A searcher that frees ScaNN's index once it is garbage-collected.

        ScaNN's index lives in TensorFlow's resource manager, outside Python's
        reach: without `DestroyResourceOp` every index built in a process
        stays in RAM until the process ends.
        """
        searcher = cls(handle, options, keys=keys)
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
        handle = self._handle()  # one TensorsToScann op for SavedScannSearch
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
            self.handle, queries, self._candidates(k), *self._search_depth(k), False
        )
        if not ids.shape[0]:  # ScaNN's op gives (0, 1) for no queries
            return tf.zeros([0, int(k)], tf.int32)
        if ids.shape[1] < int(k):
            raise tf.errors.InvalidArgumentError(
                None, None, f"{_SCANN_SHORT_RESULT} k={int(k)}, ids found: {ids.shape[1]}"
            )
        if not _int8_leaves(self.options):
            return ids
        # Eagerly, in NumPy after one gather: each eager TensorFlow op costs
        # about as much as ScaNN's whole search of a single query.
        rows = tf.gather(tf.convert_to_tensor(self._keys), ids).numpy()
        ids, queries = ids.numpy(), queries.numpy()
        squared = np.square(rows - queries[:, None, :]).sum(axis=-1)
        best = np.argsort(squared, axis=-1, kind="stable")[:, : int(k)]
        return tf.constant(np.take_along_axis(ids, best, axis=-1))

    def _candidates(self, k):
        """How many ids to ask ScaNN for: k, or with `scoring="int8"` `max(reorder, 2k)`."""
        if not _int8_leaves(self.options):
            return k
        if tf.executing_eagerly() and not isinstance(k, tf.Tensor):
            return max(int(self.options["reorder"]), 2 * int(k))
        return tf.maximum(int(self.options["reorder"]), 2 * k)

    def _search_depth(self, k):
        """ScaNN's `pre_reorder_nn` and `leaves_to_search` inputs for a search of `k`.

        Unless overridden, the leaves searched and the candidates re-ranked
        come from the index's own config (-1): a memory saved by an older
        version, with other defaults, searches as it was built. `reorder`
        (asymmetric hashing only) is passed so that it is never below k.
        Eagerly they are Python ints: an eager op apiece would cost more than
        a small search.
        """
        reorder = self.options.get("reorder") if self.options.get("scoring") == "ah" else None
        leaves = self.leaves_to_search
        if tf.executing_eagerly():
            pre = max(int(k), int(reorder)) if reorder else -1
            return pre, -1 if leaves is None else int(np.asarray(leaves))
        pre = tf.maximum(k, int(reorder)) if reorder else tf.constant(-1)
        return pre, tf.constant(-1) if leaves is None else tf.cast(leaves, tf.int32)

    def _search_shard(self, handle, queries, k):
        ids, _ = _scann_ops().scann_search_batched(
            handle, queries, self._candidates(k), *self._search_depth(k), False
        )
        complete = tf.logical_or(tf.shape(ids)[0] == 0, tf.shape(ids)[1] >= k)
        check = tf.debugging.Assert(
            complete, [_SCANN_SHORT_RESULT + " k and ids found:", k, tf.shape(ids)[1]]
        )
        with tf.control_dependencies([check]):
            if _int8_leaves(self.options):
                # No queries: ScaNN's (0, 1) ids; reshaped, top-k has its k.
                ids = tf.reshape(ids, [tf.shape(ids)[0], -1])
                ids = tf.cond(
                    tf.shape(ids)[0] > 0,
                    lambda: rescore(tf.convert_to_tensor(self._keys), queries, ids, k),
                    lambda: tf.zeros([0, k], tf.int32),
                )
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
    def load(cls, dir_path, keys, options, shared_name=None):
        """Reads what `save` wrote; `shared_name` as for `build`."""
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
                del arr
        options = dict(options, scoring=_saved_scoring(tensors["scann_config"], options))
        int8 = _int8_leaves(options)
        if int8:
            options.setdefault("reorder", 100)
        handle = _scann_ops().tensors_to_scann(
            _float_dataset(keys, int8),
            **tensors,
            # A unique name per index, unless the caller owns the name: the
            # op's kernel keeps the searcher it made while it exists, and an
            # eager call with the same attributes reuses that kernel.
            shared_name=shared_name or f"keras_resmem_scann_{uuid.uuid4().hex}",
        )
        keys = keys if int8 else None
        if shared_name is not None:
            return cls(handle, options, keys=keys)
        return cls._owning(handle, options, keys=keys)


def _int8_leaves(options):
    """Whether an index's options score a tree's leaves on int8 codes (no float dataset)."""
    return options.get("scoring") == "int8" and not options.get("brute_force")


def _float_dataset(keys, int8):
    """ScaNN's float dataset: the keys, or none (`(0, d)`) for int8-scored leaves."""
    if int8:
        return tf.zeros([0, keys.shape[-1]], tf.float32)
    return tf.convert_to_tensor(keys)


def _saved_scoring(config, options):
    """The `scoring` of a saved index, read from its config (not from today's defaults)."""
    from scann.proto import scann_pb2

    parsed = scann_pb2.ScannConfig.FromString(config.numpy()[0])
    if not parsed.HasField("partitioning"):
        return options.get("scoring")
    if parsed.HasField("hash"):
        return "ah"
    return "int8" if parsed.brute_force.fixed_point.enabled else "exact"


def _int8_index_tensors(keys, options, chunk_rows=32_768):
    """ScaNN's index tensors for a tree with int8-scored leaves, built in chunks.

    ScaNN's builder copies its whole float input twice before it quantizes
    it. Here the tree is trained on a sample only (by ScaNN's builder), and
    each key's leaf (its nearest center), its int8 codes and their scale are
    computed a chunk at a time: apart from the keys, nothing bigger than the
    int8 codes (a quarter of the keys) is ever held. Rows are read in
    slices, never gathered from a variable (see `search.base.rescore`).

    Returns:
        `{name: tensor}`, the arguments of `tensors_to_scann` after the dataset.
    """
    from scann.partitioning import partitioner_pb2

    n, d = keys.shape
    size = options["training_sample_size"]
    picked = np.sort(np.random.default_rng(0).choice(n, size, replace=False))
    sample, max_abs = [], np.zeros(d, np.float32)
    for start in range(0, n, chunk_rows):
        rows = keys[start : start + chunk_rows].numpy()
        max_abs = np.maximum(max_abs, np.abs(rows).max(axis=0))
        lo, hi = np.searchsorted(picked, [start, start + len(rows)])
        sample.append(rows[picked[lo:hi] - start])
    sample = np.concatenate(sample)
    tree = (
        _scann_ops()
        .builder(sample, 10, "squared_l2")
        .tree(
            num_leaves=options["num_leaves"],
            num_leaves_to_search=options["num_leaves_to_search"],
            training_sample_size=len(sample),
            min_partition_size=options["min_partition_size"],
        )
        .score_brute_force(quantize=True)
        .build()
    )
    config, serialized_partitioner, *_ = _scann_ops().scann_to_tensors(tree.searcher_handle)
    _destroy_resource(tree.searcher_handle)
    del tree, sample
    partitioner = partitioner_pb2.SerializedPartitioner.FromString(
        serialized_partitioner.numpy()[0]
    )
    root = partitioner.kmeans.kmeans_tree.root
    centers = np.array(
        [list(c.float_dimension) or list(c.dimension) for c in root.centers], np.float32
    )
    leaf_ids = np.array([child.leaf_id for child in root.children], np.int32)
    # ScaNN's scalar quantization: per dimension, the largest |value| maps to 127.
    multipliers = (127.0 / np.where(max_abs > 0, max_abs, 1.0)).astype(np.float32)
    tokens = np.empty(n, np.int32)
    codes = np.empty((n, d), np.int8)
    for start in range(0, n, chunk_rows):
        rows = keys[start : start + chunk_rows].numpy()
        tokens[start : start + len(rows)] = leaf_ids[nearest_centroids(rows, centers)]
        codes[start : start + len(rows)] = np.clip(np.round(rows * multipliers), -127, 127)
    return {
        "scann_config": config,
        "serialized_partitioner": serialized_partitioner,
        "datapoint_to_token": tokens,
        "ah_codebook": tf.constant(""),
        "hashed_dataset": tf.zeros([], tf.uint8),
        "int8_dataset": codes,
        "int8_multipliers": multipliers,
        # Empty: ScaNN computes the codes' norms itself.
        "dp_norms": tf.zeros([0], tf.float32),
    }


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
        tensors = searcher.index_tensors()
        self.index = {
            name: tf.Variable(value, trainable=False, validate_shape=False, name=name)
            for name, value in tensors.items()
        }
        # What the index was at export, checked in the graph before ScaNN's
        # loader reads it (see `_checked_index`).
        self._fingerprints = {name: _fingerprint(v).numpy() for name, v in tensors.items()}
        self._key_shape = tuple(int(s) for s in keys.shape)
        self._checked = tf.Variable(False, trainable=False, name="index_checked")
        self.shared_name = f"keras_resmem_scann_{uuid.uuid4().hex}"

    def _checked_index(self):
        """The index tensors, once they are known to be those exported.

        ScaNN's `TensorsToScann` trusts its input: a `datapoint_to_token`
        edited out of range aborts the serving process, a shuffled one gives
        wrong answers. So the first request compares each index tensor's
        fingerprint (farmhash64 of its bytes) and the key table's shape with
        the values recorded at export, and fails with `InvalidArgumentError`
        (the request fails; the server lives) if they differ. Later requests
        skip the check (a flag variable): ScaNN builds its searcher once, on
        the first request that passes. This guards against corruption, not
        against an attacker, who can edit the graph as well as its variables.
        """
        index = {name: tf.convert_to_tensor(v) for name, v in self.index.items()}
        keys = tf.convert_to_tensor(self._keys)

        def check():
            same = [tf.reduce_all(tf.equal(tf.shape(keys), self._key_shape))]
            for name, tensor in index.items():
                same.append(tf.reduce_all(tf.equal(_fingerprint(tensor), self._fingerprints[name])))
            ok = tf.reduce_all(tf.stack(same))
            assertion = tf.debugging.Assert(ok, [_TAMPERED_INDEX])
            with tf.control_dependencies([assertion]):
                return self._checked.assign(True, read_value=True)

        done = tf.cond(self._checked, lambda: tf.constant(True), check)
        with tf.control_dependencies([done]):
            return keys, {name: tf.identity(t) for name, t in index.items()}

    # A method, not a property: `tf.Module` reads every attribute when it
    # looks for variables, and would run the ops eagerly (at export).
    def _handle(self):
        keys, index = self._checked_index()
        int8 = _int8_leaves(self.options)
        return _scann_ops().tensors_to_scann(
            _float_dataset(keys, int8), **index, shared_name=self.shared_name
        )

    # Always in a graph (an export): the graph path, without the eager one.
    min_shard_size = ScannSearch.min_shard_size
    leaves_to_search = None
    search = ScannSearch._search
    _search_shard = ScannSearch._search_shard
    _candidates = ScannSearch._candidates
    _search_depth = ScannSearch._search_depth


@keras_resmem_export("keras_resmem.search.ScaNN")
class ScaNN(SearchBackend):
    """Approximate search with ScaNN, through ScaNN's TensorFlow ops.

    For memories too large for exact search. An exported model holds
    ScaNN's custom ops, so it needs a ScaNN-enabled TensorFlow Serving build
    (`export_saved_model(..., mode="scann")`); for stock serving use `IVF`.
    Options left `None` take the defaults of
    `keras_resmem.search.default_scann_options`, which depend on the
    memory's size. `leaves_to_search` can be changed at any time
    (`memory.set_search_knob("leaves_to_search", 32)`), also in a compiled
    model.

    The index lives in TensorFlow's resource manager under a name of its
    own, which the compiled graphs look it up by: when the memory is filled
    again or its weights are loaded, the index is rebuilt under that name,
    and every compiled `predict` searches the new one.

    Args:
        brute_force: score every entry (no tree); the default below 20,000 entries.
        num_leaves: the k-means leaves of the tree.
        num_leaves_to_search: the leaves searched per query, as built into the index.
        training_sample_size: the k-means training sample.
        min_partition_size: k-means re-seeds a leaf given fewer training keys.
        scoring: `"exact"` (the default: float32 distances in ScaNN, which
            keeps its own copy of the keys), `"int8"` (ScaNN scores 8-bit
            codes, then the best `max(reorder, 2k)` are re-scored exactly
            against the memory's keys, so ScaNN holds no float copy of them:
            a build's peak RAM is about one copy of the keys lower, for
            somewhat fewer queries per second) or `"ah"` (asymmetric hashing).
        reorder: `"int8"` and `"ah"`; given without `scoring`, it selects `"ah"`.
        dimensions_per_block: `"ah"` only.
        leaves_to_search: `None` (the index's own `num_leaves_to_search`), or
            the leaves searched per query at search time.

    Example:

    >>> import numpy as np
    >>> import keras_resmem
    >>> search = keras_resmem.search.ScaNN(brute_force=True)
    >>> memory = keras_resmem.ResidualMemory(k=2, search=search)
    >>> x = np.random.default_rng(0).normal(size=(100, 8))
    >>> memory.memorize(x, np.zeros((100, 3)), np.arange(100) % 3)
    >>> memory.search_backend
    'scann'
    """

    name = "scann"
    portable = False
    custom_op_namespaces = ("Scann",)
    knobs = ("leaves_to_search",)

    def __init__(
        self,
        brute_force=None,
        num_leaves=None,
        num_leaves_to_search=None,
        training_sample_size=None,
        min_partition_size=None,
        scoring=None,
        dimensions_per_block=None,
        reorder=None,
        leaves_to_search=None,
    ):
        self.options = {
            "brute_force": brute_force,
            "num_leaves": num_leaves,
            "num_leaves_to_search": num_leaves_to_search,
            "training_sample_size": training_sample_size,
            "min_partition_size": min_partition_size,
            "scoring": scoring,
            "dimensions_per_block": dimensions_per_block,
            "reorder": reorder,
        }
        # Unknown names and bad values fail now, not after a pass over the data.
        resolve_scann_options(1_000_000, 2, self.options)
        self._leaves_value = self._check_leaves(leaves_to_search)
        self._resolved = None
        self._leaves = None
        self._kernel = None
        self._lock = threading.RLock()
        # One name for this memory's index, for its whole life (see the docstring).
        self._shared_name = f"keras_resmem_scann_{uuid.uuid4().hex}"
        self._handle = None

    @staticmethod
    def _check_leaves(value):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(
                "ScaNN option `leaves_to_search` must be a positive integer or None. "
                f"Received: leaves_to_search={value!r}"
            )
        return int(value)

    def get_config(self):
        leaves = self._leaves_value
        if self._leaves is not None:
            leaves = int(self._leaves.numpy())
            leaves = None if leaves < 0 else leaves
        return {**self.options, "leaves_to_search": leaves}

    def resolve(self, memory_size, key_dim):
        self._resolved = resolve_scann_options(memory_size, key_dim, self.options)
        return self

    def build(self, keys, add_weight, initializer):
        super().build(keys, add_weight, initializer)
        # -1: the leaves the index was built to search.
        self._leaves = add_weight(
            name="leaves_to_search", shape=(), dtype="int32", initializer="zeros", trainable=False
        )
        self._leaves.assign(-1 if self._leaves_value is None else self._leaves_value)

    def _install(self, make_kernel):
        """Replaces the index under this backend's name (the old one is freed first)."""
        with self._lock:
            with tf.init_scope():
                if self._handle is not None:
                    _destroy_resource(self._handle)
                    self._kernel = None
                kernel = make_kernel()
                kernel.leaves_to_search = self._leaves
                if self._handle is None:
                    # Frees the index when the backend is collected; by name,
                    # so whichever index then holds the name.
                    weakref.finalize(self, _destroy_resource, kernel.handle).atexit = False
                self._handle, self._kernel = kernel.handle, kernel

    def fit(self, verbose=0):
        self._install(
            lambda: ScannSearch.build(self.keys, self._resolved, shared_name=self._shared_name)
        )

    def _ensure_kernel(self):
        if self._kernel is None:
            # Loaded without its index (e.g. from a weights file): rebuild the
            # index from the keys, eagerly, once; one thread builds it while
            # the others wait for it.
            with self._lock:
                if self._kernel is None:
                    self.fit()
        return self._kernel

    def search(self, queries, k):
        return self._ensure_kernel().search(queries, k)

    def keys_changed(self):
        if self._kernel is not None:
            # A live memory's weights were loaded: compiled graphs search
            # this name, so the new index must be under it now.
            self.fit()

    def save_assets(self, dir_path):
        self._ensure_kernel().save(dir_path)

    def check_loaded(self, arrays, fail):
        leaves = int(arrays["leaves_to_search"]) if "leaves_to_search" in arrays else -1
        if leaves == 0 or leaves < -1:
            fail("`leaves_to_search`", f"is {leaves}, neither -1 (the index's own) nor positive")

    def load_assets(self, dir_path):
        check_index_files(dir_path, *self.keys.shape)
        self._install(
            lambda: ScannSearch.load(
                dir_path, self.keys, self._resolved, shared_name=self._shared_name
            )
        )

    def storage_bytes(self):
        return sum(_tensor_bytes(t) for t in self._ensure_kernel().index_tensors().values())

    def get_knob(self, name):
        if name != "leaves_to_search":
            return super().get_knob(name)
        if self._leaves is None:
            return self._leaves_value
        if not tf.executing_eagerly():
            return tf.convert_to_tensor(self._leaves)
        value = int(self._leaves.numpy())
        return None if value < 0 else value

    def set_knob(self, name, value):
        if name != "leaves_to_search":
            return super().set_knob(name, value)
        self._leaves_value = self._check_leaves(value)
        if self._leaves is not None:
            self._leaves.assign(-1 if value is None else self._leaves_value)

    def for_export(self):
        saved = SavedScannSearch(self._ensure_kernel(), self.keys)
        saved.leaves_to_search = self._leaves  # the memory's variable: a knob when served
        return saved, [saved]


_TAMPERED_INDEX = (
    "The SavedModel's ScaNN index is not the one it was exported with (a variable was changed "
    "or corrupted): it was not loaded. Export the model again from a checked .keras file."
)


def _fingerprint(tensor):
    """farmhash64 of a tensor's bytes, uint8 `(8,)`; a string tensor's strings in order."""
    flat = tf.reshape(tensor, [1, -1])
    if tensor.dtype == tf.string:
        flat = tf.reshape(tf.fingerprint(tf.reshape(tensor, [-1])), [1, -1])
    return tf.reshape(tf.fingerprint(flat), [-1])


def _tensor_bytes(tensor):
    array = np.asarray(tensor)
    if array.dtype == object:  # tf.string: serialized protos
        return sum(len(b) for b in array.reshape(-1))
    return int(array.nbytes)
