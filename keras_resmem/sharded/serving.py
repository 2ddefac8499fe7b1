"""Serving a sharded memory across processes: shard SavedModels, a front SavedModel, a client.

A sharded memory (`keras_resmem.sharded.format`) can be served by `S + 1`
model servers, each a stock `tensorflow_model_server` (or `tf_server.py`, a
small stand-in in this directory) holding one SavedModel of stock
TensorFlow ops:

- one **shard server** per shard (`export_shard_saved_model`): given query
  keys, its shard's nearest entries by exact L2 search, with their global
  ids, distances and the stored rows a prediction combines;
- one **front server** (`export_front_saved_model`), the network and the
  combine step, with two signatures: `features` (the model's inputs to the
  query keys and the network's scores) and `merge` (the shards' answers to
  the ResMem prediction: the `k` nearest over all shards, weighted).

`ShardedClient` runs one prediction: `features` on the front, the keys to
every shard at once (a thread pool), then `merge` on the front. It speaks
TensorFlow Serving's REST API (`POST /v1/models/<name>:predict`, columnar
`"inputs"`), so the same client drives a real `tensorflow_model_server
--rest_api_port=...` serving the same SavedModels. By default its tensors
between the servers are packed: `tf.io.serialize_tensor` strings in
outputs named `*_bytes`, which the REST API carries as `{"b64": ...}`
(signatures `features_packed`, `packed`/`search_packed`, `merge_packed`);
the client forwards them without decoding, and `merge_packed` decodes and
checks them in its graph. `transport="json"` sends every tensor as JSON
numbers instead (`features`, `serving_default`/`search`, `merge`): the same
answers, bit for bit, at several times the cost for large batches.

The answers are those of one process's memory over all the shards, with
exact search: each shard finds its `k` nearest (by the same search and the
same distance arithmetic as `ResidualMemory`), the `k` nearest of the union
of those answers by exact distance are combined with
`keras_resmem.residuals.combine`, as the layer combines them, and floats
travel as their bytes (packed), or as JSON numbers of 9 significant digits
(`json_text`), which give back every float32 exactly: the same neighbour
ids, and the same weights and prediction bit for bit. One exception: at a near-tie for the `k`-th
neighbour, where exact search's float32 ranking scores (`|k|^2 - 2 q.k`)
and the exact distances disagree, the shards may return the nearer entry
(they re-rank `S * k` candidates by exact distance): 3 of 1,024 queries on
the Fashion-MNIST benchmark, each time the sharded answer nearer. The
one-process loader of the same shards (`attach_memory(shards=...)`) merges
the same way, and gives the served answers bit for bit.

Every shard's answer names its shard and the memory it belongs to (a digest
of the manifest); the client refuses answers from a wrong shard, a missing
one, or a shard of another memory, rather than predicting from them.

Running the servers (the script imports only NumPy and TensorFlow, so run
it by its path, not with `python -m`, which would import this package):

    python keras_resmem/sharded/tf_server.py --model_dir front/1 --model_name front --port 8500
    python keras_resmem/sharded/tf_server.py --model_dir shard_0/1 --model_name shard_0 --port 8501
    ...

or, with TensorFlow Serving, one server per machine, each given its models
(`--rest_api_port=8501 --model_config_file=models.config`, or
`--model_name=shard_0 --model_base_path=/models/shard_0` for one model), and
`ShardedClient("http://front:8501/v1/models/front", ["http://s0:8501/v1/models/shard_0",
...])`.
"""

import base64
import concurrent.futures
import hashlib
import http.client
import json
import math
import os
import queue
import socket
import threading
import time
import urllib.parse

import numpy as np
import tensorflow as tf

import keras_resmem.sharded.format as format_lib
from keras_resmem import _io, _validation
from keras_resmem import residuals as residuals_lib
from keras_resmem.search.exact import ExactSearch

# The stand-in server's own: it imports nothing of this package, so the client imports it.
from keras_resmem.sharded.tf_server import json_text

# The shard answer's outputs that the front's `merge` takes, beside `scores`.
_ANSWER_ROWS = ("neighbor_ids", "distances", "targets")
# The shard answer's outputs that say which shard answered (not merged).
_IDENTITY = ("shard_index", "num_shards", "memory_digest")
_ROW_DTYPES = {
    "neighbor_ids": np.int64,
    "distances": np.float32,
    "neighbor_scores": np.float32,
    "residual_ids": np.int32,
    "residual_values": np.float32,
}
_OUTPUT_DTYPES = {
    "resmem_scores": np.float32,
    "class_ids": np.int64,
    "neighbor_ids": np.int64,
    "neighbor_weights": np.float32,
    "neighbor_distances": np.float32,
}
# The chunk of keys ExactSearch scores at once: the `Exact` backend's default,
# so that a shard ranks its keys as a one-process memory does.
_CHUNK_SIZE = 65536
_DEFAULTS = {"k": 50, "sigma": 1.0, "method": "resmem", "knn_weight": 0.5}
TRANSPORTS = ("packed", "json")


# The packed transport: tensors as `tf.io.serialize_tensor` strings (a
# `TensorProto`, stock `SerializeTensor`/`ParseTensor` ops on both ends) in
# outputs named `*_bytes`. TensorFlow Serving's REST API writes a DT_STRING
# output whose name ends in `_bytes` as `{"b64": "<base64>"}` and reads
# `{"b64": ...}` for any DT_STRING input: its documentation
# (tensorflow_serving/g3doc/api_rest.md, "Output of binary values": "Named
# tensors that have `_bytes` as a suffix in their name are considered to have
# binary values", encoded as in "Encoding binary values": `{ "b64": <base64
# encoded string> }`, "The same format is used to encode output response as
# well"), and its code (tensorflow_serving/util/json_tensor.cc:
# `kBytesTensorNameSuffix[] = "_bytes"`, `IsNamedTensorBytes`, which
# `MakeColumnarFormatJsonFromTensors` passes as `string_as_bytes`, and
# `JsonDecodeBase64Object` for inputs). So a shard's answer crosses the
# network as base64 text of its float32/int64 bytes (4/3 of the bytes), not
# as decimal numbers, and the client forwards it to the front without
# decoding it.


def pack_tensor(value):
    """A tensor (or array) as the bytes of `tf.io.serialize_tensor`: what `*_bytes` inputs take."""
    return tf.io.serialize_tensor(tf.convert_to_tensor(value)).numpy()


def unpack_tensor(data):
    """The array of `tf.io.serialize_tensor`'s bytes, or of their `{"b64": ...}` JSON object."""
    from tensorflow.core.framework import tensor_pb2

    if isinstance(data, dict):
        data = base64.b64decode(data["b64"])
    return tf.make_ndarray(tensor_pb2.TensorProto.FromString(data))


def _shape_check(tensor, shape):
    """`(ok, actual)`: whether `tensor`'s shape is `shape` (None: any size), and its shape."""
    shape = tf.TensorShape(shape)
    actual = tf.shape(tensor, out_type=tf.int64)
    ok = tf.equal(tf.size(actual), shape.rank)
    fixed = [(i, d) for i, d in enumerate(shape.as_list()) if d is not None]
    if fixed:
        # Padded to the expected rank first: no index out of range at another rank.
        padded = tf.concat([actual, tf.zeros([shape.rank], tf.int64)], 0)[: shape.rank]
        dims = tf.gather(padded, [i for i, _ in fixed])
        ok = tf.logical_and(ok, tf.reduce_all(tf.equal(dims, [d for _, d in fixed])))
    return ok, actual


def _checked(ok, tensors, shapes, message):
    """`tensors`, given the static `shapes`, passed on only if `ok`: else the request fails.

    It fails with `message` (a list of strings and tensors, as
    `tf.debugging.Assert` takes). The tensors flow through a `tf.cond` whose
    other branch fails, so nothing that uses them runs on a bad one. Not
    `tf.ensure_shape`: Grappler's shape inference takes its expected shape
    for the tensor's, folds a check of the shape made before it to true,
    and the request fails in `EnsureShape` instead, with a vaguer message.
    """

    def passed():
        return [tf.identity(t) for t in tensors]

    def failed():
        with tf.control_dependencies([tf.debugging.Assert(False, message, summarize=8)]):
            return [tf.identity(t) for t in tensors]

    out = tf.cond(ok, passed, failed)
    for tensor, shape in zip(out, shapes, strict=True):
        tensor.set_shape(shape)
    return out


def _decode(serialized, dtype, shape, what):
    """`serialized` parsed (`tf.io.parse_tensor`) as `dtype`, checked to have `shape` (None: any).

    A string that is no serialized tensor, or one of another dtype, fails in
    `ParseTensor` (TensorFlow's message names the dtypes); one of another
    rank or size fails the request with a message naming `what` and giving
    the shape received. Nothing crashes.
    """
    tensor = tf.io.parse_tensor(serialized, dtype)
    ok, actual = _shape_check(tensor, shape)
    message = [
        f"{what} must be a serialized {dtype.name} tensor of shape {tf.TensorShape(shape)}; "
        "received shape",
        actual,
    ]
    return _checked(ok, [tensor], [shape], message)[0]


def _shape_text(shape):
    """`(batch, k, 4)`: a row's shape as the messages name it."""
    names = ["batch", "k"] + [str(d) for d in tf.TensorShape(shape).as_list()[2:]]
    return "(" + ", ".join(names) + ")"


def _packed_parts(manifest):
    """The tensors of a shard's packed answer, in order: names, dtypes and shapes (`merge`'s)."""
    return _merge_specs(manifest)[1:]


def _manifest(manifest_or_path):
    if isinstance(manifest_or_path, format_lib.Manifest):
        return manifest_or_path
    if isinstance(manifest_or_path, (str, os.PathLike)):
        return format_lib.read_manifest(manifest_or_path)
    raise ValueError(
        "`manifest_or_path` must be a sharded memory's manifest.json (or its directory), or "
        "the `Manifest` that `keras_resmem.sharded.format.read_manifest` returns. Received: "
        f"manifest_or_path of type {type(manifest_or_path).__name__}"
    )


def memory_digest(manifest):
    """A SHA-256 digest naming a sharded memory's contents: its shape and its shards' digests.

    Every shard SavedModel and front SavedModel of one memory holds it, so a
    client can tell that all its servers serve the same memory. It does not
    depend on the memory's directory or its default settings.
    """
    manifest = _manifest(manifest)
    content = {
        "task": manifest.task,
        "from_logits": manifest.from_logits,
        "sparse_residuals": manifest.sparse_residuals,
        "temperature": manifest.temperature,
        "key_dim": manifest.key_dim,
        "num_outputs": manifest.num_outputs,
        "shards": [[s["name"], s["size"], s["digest"]] for s in manifest.shards],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _shard_index(shard_index, num_shards):
    if (
        isinstance(shard_index, (bool, np.bool_))
        or not isinstance(shard_index, (int, np.integer))
        or not 0 <= shard_index < num_shards
    ):
        raise ValueError(
            f"`shard_index` must be an integer in [0, {num_shards}) (the memory has "
            f"{num_shards} shards). Received: shard_index={shard_index!r}"
        )
    return int(shard_index)


class _ShardModule(tf.Module):
    """One shard's entries as variables, and its search (see `export_shard_saved_model`)."""

    def __init__(self, manifest, index, arrays, k):
        super().__init__(name=f"resmem_shard_{index}")
        self.size = len(arrays["memory_ids"])
        self.key_dim = manifest.key_dim
        self.sparse = manifest.sparse_residuals is not None
        self.default_k = min(k, self.size)

        def variable(name, value, dtype=None):
            return tf.Variable(np.asarray(value, dtype), trainable=False, name=name)

        self.keys = variable("keys", arrays["keys"])
        self.memory_ids = variable("memory_ids", arrays["memory_ids"])
        self.memory_targets = variable("memory_targets", arrays["memory_targets"])
        if self.sparse:
            self.residual_ids = variable("residual_ids", arrays["residual_ids"])
            # float16 on disk; float32 here is exact, and what the combine
            # casts them to: every JSON parser reads it.
            self.residual_values = variable(
                "residual_values", arrays["residual_values"], np.float32
            )
        else:
            self.memory_scores = variable("memory_scores", arrays["memory_scores"])
        self.identity = {
            "shard_index": tf.constant(index, tf.int32),
            "num_shards": tf.constant(manifest.num_shards, tf.int32),
            "memory_digest": tf.constant(memory_digest(manifest)),
        }
        self._searcher = ExactSearch(self.keys, _CHUNK_SIZE)
        self.parts = [spec.name for spec in _packed_parts(manifest)]

    def rows(self, positions):
        """The stored rows of the entries at `positions`, named as the shard's outputs."""
        out = {
            "neighbor_ids": tf.gather(self.memory_ids, positions),
            "targets": tf.gather(self.memory_targets, positions),
        }
        if self.sparse:
            out["residual_ids"] = tf.gather(self.residual_ids, positions)
            out["residual_values"] = tf.gather(self.residual_values, positions)
        else:
            out["neighbor_scores"] = tf.gather(self.memory_scores, positions)
        return out

    def answer(self, keys, k):
        """The `k` nearest entries of each query, nearest first (as `ResidualMemory` finds them)."""
        queries = tf.cast(keys, tf.float32)
        # A non-finite query is searched as zeros (it never fails, nor changes
        # the other rows), and its distances are NaN: the merge gives it NaN.
        finite = tf.reduce_all(tf.math.is_finite(queries), axis=-1)
        queries = tf.where(finite[:, None], queries, 0.0)
        if self.size == 0:
            positions = tf.zeros([tf.shape(queries)[0], 0], tf.int32)
            distances = tf.zeros([tf.shape(queries)[0], 0], tf.float32)
        else:
            positions = self._searcher.search(queries, k)
            # `ResidualMemory._search_neighbors`, op for op: the same distances.
            neighbor_keys = tf.gather(self.keys, positions)
            squared = tf.reduce_sum(tf.square(queries[:, None, :] - neighbor_keys), axis=-1)
            distances = tf.sqrt(tf.maximum(squared, 0.0))
            order = tf.argsort(distances, axis=-1, stable=True)
            positions = tf.gather(positions, order, batch_dims=1)
            distances = tf.gather(distances, order, batch_dims=1)
        distances = tf.where(finite[:, None], distances, np.nan)
        return {**self.rows(positions), "distances": distances, **self.identity}

    def answer_k(self, keys, k):
        """`answer` with a per-request `k`, at most the shard's size."""
        k = tf.convert_to_tensor(k, tf.int32)
        check = tf.debugging.assert_positive(k, message="`k` must be a positive integer")
        with tf.control_dependencies([check]):
            k = tf.minimum(k, self.size)
        return self.answer(keys, k)

    def answer_packed(self, keys_bytes, k=None):
        """`answer` (`answer_k` with a `k`) of packed keys, its rows packed into `answer_bytes`.

        `answer_bytes` is `tf.io.serialize_tensor` of a 1-d string tensor:
        each of the rows `merge` takes (`neighbor_ids`, `distances`,
        `targets`, and `neighbor_scores` or `residual_ids` and
        `residual_values`), serialized, in that order.
        """
        keys = _decode(keys_bytes, tf.float32, (None, self.key_dim), "`keys_bytes`")
        out = self.answer(keys, self.default_k) if k is None else self.answer_k(keys, k)
        parts = tf.stack([tf.io.serialize_tensor(out[name]) for name in self.parts])
        return {"answer_bytes": tf.io.serialize_tensor(parts), **self.identity}


def export_shard_saved_model(manifest_or_path, shard_index, path, *, k, overwrite=False):
    """Exports one shard of a sharded memory as a SavedModel that answers nearest-neighbour queries.

    The SavedModel holds only stock TensorFlow ops (it loads in any
    TensorFlow runtime, a stock `tensorflow_model_server` included, without
    this library) and the shard's entries as variables. Its signatures:

    - `serving_default`: input `keys`, float32 `(batch, key_dim)`: query keys
      (the front's `features` output). Answers the shard's `min(k, shard
      size)` nearest entries of each query, `k` as exported.
    - `search`: inputs `keys` and `k`, an int32 scalar: the same, with `k`
      per request (at most the shard's size; `k < 1` fails the request).
    - `packed` and `search_packed` (the packed transport, `ShardedClient`'s
      default): the same two, with the keys as `keys_bytes`, a string scalar
      (`tf.io.serialize_tensor` of the float32 keys: the front's
      `features_packed` output of that name, or `pack_tensor(keys)`), and the
      rows below as one output, `answer_bytes`: a string scalar,
      `tf.io.serialize_tensor` of a 1-d string tensor holding each of
      `neighbor_ids`, `distances`, `targets`, and `neighbor_scores` or
      `residual_ids` and `residual_values`, serialized, in this order (the
      front's `merge_packed` takes it as it is). TensorFlow Serving's REST API
      writes an output named `*_bytes` as `{"b64": ...}`, base64 of its
      bytes, and reads `{"b64": ...}` for a string input. Beside it, the
      three identity outputs below.

    Outputs, each `(batch, k_shard, ...)`, nearest first:

    - `neighbor_ids`: int64, the entries' global ids;
    - `distances`: float32 L2 distances `sqrt(sum((q - key)^2))`, computed
      as `ResidualMemory` computes them (the same float32 values); NaN for
      a query that is not finite (it is searched as zeros);
    - `targets`: int32 class ids `(batch, k_shard)`, or float32 regression
      targets `(batch, k_shard, num_outputs)`;
    - `neighbor_scores`: float32 `(batch, k_shard, num_outputs)`, the
      network's stored outputs (a dense memory); or, for a memory with
      `sparse_residuals=m`, `residual_ids` int32 and `residual_values`
      float32 `(batch, k_shard, m)`;
    - `shard_index`, `num_shards` (int32 scalars) and `memory_digest` (a
      string scalar, `memory_digest(manifest)`): which shard of which memory
      answered. Scalars: request the columnar `"inputs"` REST format.

    The search is exact (every key of the shard is scored, as the `"exact"`
    backend does). A shard of an `"ivf"` memory is searched exactly too: its
    inverted lists are not used (yet).

    The directory is written atomically: it appears at `path` complete, or
    not at all. For TensorFlow Serving, export to `<model_base_path>/<version>`.

    Args:
        manifest_or_path: the sharded memory: its `manifest.json`, its
            directory, or a `Manifest` from `format.read_manifest`.
        shard_index: which shard, in `[0, num_shards)`.
        path: the SavedModel directory to write.
        k: the neighbours each query gets from this shard (by default; see
            the `search` signature), at most the memory's size. Export every
            shard with at least the `k` of the front (`export_front_saved_model`).
        overwrite: whether to replace an existing `path`.

    Returns:
        The absolute path of the SavedModel.

    Raises:
        ValueError: `shard_index` out of range, or `k` not an integer in
            `[1, memory size]`.
        keras_resmem.sharded.format.ShardedMemoryError: the shard's files
            fail their checks.
        FileExistsError: `path` exists and `overwrite` is false.

    Example:

    ```python
    from keras_resmem.sharded import serving

    for i in range(4):
        serving.export_shard_saved_model("memory/manifest.json", i, f"shard_{i}/1", k=50)
    ```
    """
    manifest = _manifest(manifest_or_path)
    index = _shard_index(shard_index, manifest.num_shards)
    k = _validation.k_within(k, manifest.memory_size)
    path = os.path.abspath(os.fspath(path))
    _io.refuse_existing(path, overwrite)
    module = _ShardModule(manifest, index, format_lib.read_shard(manifest, index), k)
    keys_spec = tf.TensorSpec((None, manifest.key_dim), tf.float32, name="keys")
    module.serve = tf.function(
        lambda keys: module.answer(keys, module.default_k),
        input_signature=[keys_spec],
        autograph=False,
    )
    module.search = tf.function(
        module.answer_k,
        input_signature=[keys_spec, tf.TensorSpec((), tf.int32, name="k")],
        autograph=False,
    )
    keys_bytes_spec = tf.TensorSpec((), tf.string, name="keys_bytes")
    module.serve_packed = tf.function(
        module.answer_packed, input_signature=[keys_bytes_spec], autograph=False
    )
    module.search_packed = tf.function(
        module.answer_packed,
        input_signature=[keys_bytes_spec, tf.TensorSpec((), tf.int32, name="k")],
        autograph=False,
    )
    signatures = {
        "serving_default": module.serve.get_concrete_function(),
        "search": module.search.get_concrete_function(),
        "packed": module.serve_packed.get_concrete_function(),
        "search_packed": module.search_packed.get_concrete_function(),
    }
    with _io.atomic_directory(path, overwrite=overwrite) as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
    return path


def _settings(manifest, k, sigma, temperature, method, knn_weight):
    """The front's settings: the arguments, else the manifest's, else the layer's defaults."""
    stored = manifest.settings

    def pick(name, value):
        if value is not None:
            return value
        if stored.get(name) is not None:
            return stored[name]
        return manifest.temperature if name == "temperature" else _DEFAULTS[name]

    k = _validation.k_within(pick("k", k), manifest.memory_size)
    sigma = _validation.positive_float("sigma", pick("sigma", sigma))
    temperature = _validation.positive_float("temperature", pick("temperature", temperature))
    method = _validation.one_of("method", pick("method", method), residuals_lib.METHODS)
    knn_weight = _validation.unit_float("knn_weight", pick("knn_weight", knn_weight))
    if manifest.sparse_residuals is not None and temperature != manifest.temperature:
        raise ValueError(
            "The residuals of a sparse memory are computed with the temperature it was built "
            f"with (temperature={manifest.temperature}); build it again to use another. "
            f"Received: temperature={temperature}"
        )
    return k, sigma, temperature, method, knn_weight


def _merge_specs(manifest):
    """The `merge` signature's inputs, in order: `scores`, then the shards' answers."""
    c = manifest.num_outputs
    specs = [
        tf.TensorSpec((None, c), tf.float32, name="scores"),
        tf.TensorSpec((None, None), tf.int64, name="neighbor_ids"),
        tf.TensorSpec((None, None), tf.float32, name="distances"),
    ]
    if manifest.task == "classification":
        specs.append(tf.TensorSpec((None, None), tf.int32, name="targets"))
    else:
        specs.append(tf.TensorSpec((None, None, c), tf.float32, name="targets"))
    if manifest.sparse_residuals is None:
        specs.append(tf.TensorSpec((None, None, c), tf.float32, name="neighbor_scores"))
    else:
        m = manifest.sparse_residuals
        specs.append(tf.TensorSpec((None, None, m), tf.int32, name="residual_ids"))
        specs.append(tf.TensorSpec((None, None, m), tf.float32, name="residual_values"))
    return specs


class _Settings(tf.Module):
    """The front's float settings as float64 variables, read as the layer reads its own.

    Not constants: TensorFlow's graph optimizer rewrites a division by a
    constant, which would round otherwise than `ResidualMemory` does.
    """

    def __init__(self, **settings):
        super().__init__(name="resmem_settings")
        for name, value in settings.items():
            setattr(self, name, tf.Variable(value, dtype=tf.float64, trainable=False, name=name))

    def read(self, name):
        return tf.cast(tf.convert_to_tensor(getattr(self, name)), tf.float32)


def _merge_function(manifest, k, settings, method):
    """The front's `merge`: the `k` nearest of the shards' answers, combined."""
    sparse = manifest.sparse_residuals is not None
    classification = manifest.task == "classification"

    def merge(scores, neighbor_ids, distances, targets, *residual_rows):
        width = tf.shape(distances)[1]
        check = tf.debugging.assert_greater_equal(
            width,
            k,
            message=(
                f"`merge` combines the k={k} nearest entries of the shards' answers, but "
                "they hold fewer: export every shard with at least this k"
            ),
        )
        with tf.control_dependencies([check]):
            distances = tf.identity(distances)
        # The layer's rule: a row whose key or network scores are not finite
        # gets NaN (the shards send NaN distances for a non-finite key).
        finite = tf.logical_and(
            tf.reduce_all(tf.math.is_finite(scores), axis=-1),
            tf.reduce_all(tf.math.is_finite(distances), axis=-1),
        )
        # The k smallest over all shards; equal distances keep the shards' order.
        # Ranked by the distances themselves (a NaN one last), also in a row whose
        # scores are not finite: its neighbours are the key's nearest, as the
        # layer's, and as those the client keeps of all rows on the JSON transport.
        ranked = tf.where(tf.math.is_finite(distances), distances, np.inf)
        _, top = tf.math.top_k(-ranked, k=k, sorted=True)
        distances = tf.where(finite[:, None], distances, 0.0)

        def pick(values):
            return tf.gather(values, top, batch_dims=1)

        rows = {"targets": pick(targets)}
        if sparse:
            rows["residual_ids"], rows["residual_values"] = map(pick, residual_rows)
        else:
            (rows["scores"],) = map(pick, residual_rows)
        nearest = pick(distances)
        prediction, weights = residuals_lib.combine(
            method,
            scores,
            rows,
            nearest,
            sigma=settings.read("sigma"),
            temperature=settings.read("temperature"),
            knn_weight=settings.read("knn_weight"),
            task=manifest.task,
            from_logits=manifest.from_logits,
            sparse=sparse,
        )
        prediction = tf.where(finite[:, None], prediction, np.nan)
        out = {
            "resmem_scores": prediction,
            "neighbor_ids": pick(neighbor_ids),
            "neighbor_weights": tf.where(finite[:, None], weights, np.nan),
            "neighbor_distances": tf.where(finite[:, None], nearest, np.nan),
        }
        if classification:
            valid = tf.reduce_all(tf.math.is_finite(prediction), axis=-1)
            out["class_ids"] = tf.where(valid, tf.argmax(prediction, axis=-1), -1)
        return out

    return merge


def _merge_packed_function(manifest, merge):
    """The front's `merge_packed`: every shard's packed answer decoded, checked, and `merge`d.

    The shards' rows are concatenated along the neighbour axis in shard order
    (the order of `answers_bytes`), as `merge` takes them; `merge` keeps each
    query's `k` nearest of them (the rows `ShardedClient` sends `merge` on the
    JSON transport), so the outputs are `merge`'s, bit for bit.
    """
    num_shards = manifest.num_shards
    parts = _packed_parts(manifest)
    names = [spec.name for spec in parts]

    def merge_packed(scores_bytes, answers_bytes):
        scores = _decode(scores_bytes, tf.float32, (None, manifest.num_outputs), "`scores_bytes`")
        batch = tf.shape(scores, out_type=tf.int64)[0]
        ok, count = _shape_check(answers_bytes, [num_shards])
        message = [
            f"`answers_bytes` must hold one `answer_bytes` per shard ({num_shards}), in "
            "shard order; received shape",
            count,
        ]
        (answers,) = _checked(ok, [answers_bytes], [[num_shards]], message)
        columns = {name: [] for name in names}
        for i in range(num_shards):
            # Not `tf.unstack`: its shape function would tell Grappler the count,
            # which would fold the check above to true.
            what = f"the answer of shard {i} (`answers_bytes[{i}]`)"
            packed = _decode(answers[i], tf.string, [len(parts)], what)
            # A wrong dtype fails in ParseTensor; the shapes are checked together.
            rows = [tf.io.parse_tensor(packed[j], spec.dtype) for j, spec in enumerate(parts)]
            checks = [_shape_check(row, spec.shape) for row, spec in zip(rows, parts, strict=True)]
            ok = tf.reduce_all([row_ok for row_ok, _ in checks])
            # Every row (batch, k_shard, ...), batch = the scores' batch. (Padded:
            # any rank can be sliced.)
            leading = [tf.concat([actual, [-1, -1]], 0)[:2] for _, actual in checks]
            want = tf.stack([batch, leading[0][1]])
            for dims in leading:
                ok = tf.logical_and(ok, tf.reduce_all(tf.equal(dims, want)))
            expected = ", ".join(
                f"`{spec.name}` {spec.dtype.name} {_shape_text(spec.shape)}" for spec in parts
            )
            message = [
                f"{what} must hold {expected}, batch being that of `scores_bytes`; received shapes",
                *[actual for _, actual in checks],
                "and the batch of the scores",
                batch,
            ]
            rows = _checked(ok, rows, [spec.shape for spec in parts], message)
            for name, row in zip(names, rows, strict=True):
                columns[name].append(row)
        rows = [tf.concat(columns[name], axis=1) for name in names]
        return merge(scores, *rows)

    return merge_packed


def export_front_saved_model(
    model,
    layer_name,
    manifest_or_path,
    path,
    *,
    k=None,
    sigma=None,
    temperature=None,
    method=None,
    knn_weight=None,
    overwrite=False,
):
    """Exports the front of a sharded memory's serving: the network, and the merge of the shards.

    The SavedModel holds only stock TensorFlow ops, so a stock TensorFlow
    Serving runs it as any model. Its signatures:

    - `features`: the model's inputs (named as in
      `keras_resmem.export_saved_model`: each `keras.Input(name=...)`,
      `inputs` for an unnamed single input) to `keys`, float32
      `(batch, key_dim)`, the key layer's output flattened (what the shards
      take), `scores`, float32 `(batch, num_outputs)`, the network's output
      (NaN for an example whose float inputs are not finite, as in
      `attach_memory`'s model), and two scalars: `memory_digest` (a string,
      `memory_digest(manifest)`) and `k` (int32, the neighbours combined).
    - `merge`: `scores` and the shards' answers (the outputs of
      `export_shard_saved_model`'s SavedModels, concatenated over shards
      along the neighbour axis): `neighbor_ids`, `distances`, `targets`, and
      `neighbor_scores` (dense) or `residual_ids` and `residual_values`
      (sparse). It keeps each query's `k` nearest entries over all shards
      (equal distances in the order given) and combines them as
      `ResidualMemory` does. Outputs: `resmem_scores` `(batch, num_outputs)`;
      `class_ids` (classification: int64 argmax, -1 for a row that is not
      finite); `neighbor_ids`, `neighbor_weights`, `neighbor_distances`,
      each `(batch, k)`, nearest first.

    And two for the packed transport (`ShardedClient`'s default; see
    `export_shard_saved_model`), the same computations with the tensors
    between the servers as `tf.io.serialize_tensor` strings, which
    TensorFlow Serving's REST API carries as `{"b64": ...}`:

    - `features_packed`: `features`, with `keys` and `scores` as
      `keys_bytes` and `scores_bytes` (string scalars, serialized float32).
    - `merge_packed`: inputs `scores_bytes` (as `features_packed` gives it)
      and `answers_bytes`, a 1-d string tensor of the shards' `answer_bytes`
      (their `packed` or `search_packed` output), one per shard, in shard
      order. It decodes them (`tf.io.parse_tensor`), checks them (each
      shard's rows share their `(batch, k)`, `batch` that of the scores; a
      string that is no serialized tensor, a wrong dtype, rank or size fails
      the request with TensorFlow's message), concatenates them along the
      neighbour axis and runs `merge`: the same outputs, bit for bit.
    - `merge_packed_bytes`: `merge_packed`, each output packed too, named
      `<output>_bytes` (`resmem_scores_bytes`, ...): what `ShardedClient`
      asks for, and decodes (`unpack_tensor`).

    (`serving_default` is `features` again: Keras's `ExportArchive` names its
    first endpoint so.) `ShardedClient` calls them. The settings default to
    those stored in the manifest (`settings`), then to `ResidualMemory`'s
    defaults.

    Args:
        model: the trained Keras model (functional or Sequential) whose
            embeddings the memory holds, with one output `(batch, num_outputs)`.
        layer_name: the key layer, as for `keras_resmem.attach_memory`.
        manifest_or_path: the sharded memory: its `manifest.json`, its
            directory, or a `Manifest`.
        path: the SavedModel directory to write.
        k: the number of neighbours combined, at most the memory's size.
        sigma: the distance scale of the neighbour weights.
        temperature: the softmax temperature (a sparse memory's must be the
            one it was built with).
        method: `"resmem"`, `"knn"` or `"interpolation"`.
        knn_weight: `"interpolation"` only: the weight of the kNN on labels.
        overwrite: whether to replace an existing `path`.

    Returns:
        The absolute path of the SavedModel.

    Raises:
        ValueError: a setting out of range (the message names it), a key
            layer or output whose shape differs from the memory's, or a
            sequence output (`(batch, time, ...)`: not supported here).
        FileExistsError: `path` exists and `overwrite` is false.

    Example:

    ```python
    from keras_resmem.sharded import serving

    serving.export_front_saved_model(
        base, "pre_logits", "memory/manifest.json", "front/1", k=50, sigma=0.4
    )
    ```
    """
    import keras

    from keras_resmem import attach as attach_lib
    from keras_resmem import export as export_lib

    manifest = _manifest(manifest_or_path)
    k, sigma, temperature, method, knn_weight = _settings(
        manifest, k, sigma, temperature, method, knn_weight
    )
    attach_lib._check_model(model)
    embedding, output = attach_lib._key_and_output(model, layer_name)
    if len(output.shape) != 2:
        raise ValueError(
            "A sharded memory's front serves models with outputs (batch, num_outputs); "
            f"sequence outputs are not supported. Received: output shape {output.shape}"
        )
    key_dim = math.prod(embedding.shape[1:]) if None not in embedding.shape[1:] else None
    if key_dim != manifest.key_dim or output.shape[-1] != manifest.num_outputs:
        raise ValueError(
            f"The memory's entries have keys of {manifest.key_dim} features and "
            f"{manifest.num_outputs} outputs, but layer {layer_name!r} gives "
            f"{embedding.shape[1:]} and the model {output.shape[-1]} outputs. Received: "
            f"layer_name={layer_name!r}"
        )
    path = os.path.abspath(os.fspath(path))
    _io.refuse_existing(path, overwrite)
    network = keras.Model(model.inputs, [embedding, output], name=f"{model.name}_features")
    specs = [
        tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=name)
        for t, name in zip(model.inputs, export_lib._input_names(model), strict=True)
    ]
    digest = memory_digest(manifest)

    def features(*inputs):
        x = inputs[0] if len(inputs) == 1 else list(inputs)
        embeddings, scores = network(x, training=False)
        keys = tf.reshape(tf.cast(embeddings, tf.float32), [-1, manifest.key_dim])
        scores = tf.cast(scores, tf.float32)
        # `NonFiniteInputGuard`: NaN scores for an example with a non-finite input.
        valid = tf.ones(tf.shape(scores)[:1], tf.bool)
        for x in inputs:
            if x.dtype.is_floating:
                rows = tf.reshape(tf.math.is_finite(x), [tf.shape(x)[0], -1])
                valid = tf.logical_and(valid, tf.reduce_all(rows, axis=1))
        scores = tf.where(valid[:, None], scores, np.nan)
        return {
            "keys": keys,
            "scores": scores,
            "memory_digest": tf.constant(digest),
            "k": tf.constant(k, tf.int32),
        }

    def features_packed(*inputs):
        out = features(*inputs)
        return {
            "keys_bytes": tf.io.serialize_tensor(out["keys"]),
            "scores_bytes": tf.io.serialize_tensor(out["scores"]),
            "memory_digest": out["memory_digest"],
            "k": out["k"],
        }

    settings = _Settings(sigma=sigma, temperature=temperature, knn_weight=knn_weight)
    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.track(settings)
    archive.add_endpoint("features", features, input_signature=specs)
    merge = _merge_function(manifest, k, settings, method)
    archive.add_endpoint("merge", merge, input_signature=_merge_specs(manifest))
    archive.add_endpoint("features_packed", features_packed, input_signature=specs)
    packed_specs = [
        tf.TensorSpec((), tf.string, name="scores_bytes"),
        tf.TensorSpec((None,), tf.string, name="answers_bytes"),
    ]
    merge_packed = _merge_packed_function(manifest, merge)
    archive.add_endpoint("merge_packed", merge_packed, input_signature=packed_specs)

    def merge_packed_bytes(scores_bytes, answers_bytes):
        out = merge_packed(scores_bytes, answers_bytes)
        return {f"{name}_bytes": tf.io.serialize_tensor(value) for name, value in out.items()}

    archive.add_endpoint("merge_packed_bytes", merge_packed_bytes, input_signature=packed_specs)
    with _io.atomic_directory(path, overwrite=overwrite) as tmp:
        archive.write_out(tmp, verbose=False)
    return path


# The client.


class ServingError(RuntimeError):
    """A model server that failed, timed out or gave a wrong answer; the message names its URL.

    Attributes:
        url: the model's URL.
        status: the HTTP status of its answer, or None when it gave none.
    """

    def __init__(self, message, url, status=None):
        super().__init__(message)
        self.url = url
        self.status = status


def _b64(data):
    return {"b64": base64.b64encode(data).decode("ascii")}


def _bytes_as_b64(value):
    """Bytes (nested in lists) as TensorFlow Serving's `{"b64": ...}` objects."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _b64(bytes(value))
    if isinstance(value, list):
        return [_bytes_as_b64(v) for v in value]
    return value


def _b64_pieces(value):
    """`{"b64": ...}` (or a list of them) as pieces of JSON, the base64 as it is; else None.

    A base64 string needs no JSON escapes; one with a quote or a backslash
    (no base64) goes through `json.dumps` instead, so it cannot change the
    request's structure.
    """

    def safe(text):
        return text.isascii() and '"' not in text and "\\" not in text

    if _is_b64(value) and safe(value["b64"]):
        return [b'{"b64":"', value["b64"].encode("ascii"), b'"}']
    if isinstance(value, list) and value and all(_is_b64(v) and safe(v["b64"]) for v in value):
        pieces = [b"["]
        for i, v in enumerate(value):
            pieces += [b',{"b64":"' if i else b'{"b64":"', v["b64"].encode("ascii"), b'"}']
        return [*pieces, b"]"]
    return None


def _value_text(value):
    if isinstance(value, (tf.Tensor, tf.Variable)):
        value = value.numpy()
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.kind in "OS":  # strings: bytes as {"b64": ...}
            return json.dumps(_bytes_as_b64(value.tolist()), separators=(",", ":"))
        return json_text(value)
    return json.dumps(_bytes_as_b64(value), separators=(",", ":"))


def encode_request(inputs, signature_name="serving_default"):
    """A TensorFlow Serving REST `:predict` request body (columnar `"inputs"`), as bytes.

    Args:
        inputs: a dict of named inputs: NumPy arrays or tensors (float32
            written exactly with 9 digits, see `json_text`), or JSON values;
            `bytes` (alone, in lists or arrays) are written as TensorFlow
            Serving's `{"b64": ...}`, as are given `{"b64": ...}` objects.
        signature_name: the signature to run.
    """
    return b"".join(_request_pieces(inputs, signature_name))


def _request_pieces(inputs, signature_name):
    """`encode_request`'s body as a list of bytes, each base64 string a piece of its own.

    The packed transport forwards megabytes of base64: sent piece by piece,
    each copied once (`str.encode`), never escaped or joined into one
    buffer (a large fresh buffer costs more than the copy itself).
    """
    pieces = [f'{{"signature_name":{json.dumps(signature_name)},"inputs":{{'.encode()]
    for i, (name, value) in enumerate(inputs.items()):
        pieces.append(f"{',' if i else ''}{json.dumps(name)}:".encode())
        b64 = _b64_pieces(value)
        pieces += b64 if b64 is not None else [_value_text(value).encode()]
    pieces.append(b"}}")
    return pieces


def _is_b64(value):
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _to_array(value, dtype=None):
    """A JSON value as NumPy: `dtype`, else floats as float32 (the servers'), ints as int64.

    `{"b64": ...}` (an output named `*_bytes`) is given as bytes, a list of
    them as an object array of bytes.
    """
    if isinstance(value, str):
        return value
    if _is_b64(value):
        return base64.b64decode(value["b64"])
    first = value
    while isinstance(first, list) and first:
        first = first[0]
    if _is_b64(first):  # not through NumPy's bytes dtype, which drops trailing NULs
        decode = np.vectorize(lambda v: base64.b64decode(v["b64"]), otypes=[object])
        return decode(np.asarray(value, object))
    if dtype is not None:
        return np.asarray(value, dtype)
    array = np.asarray(value)
    if array.dtype == np.float64:
        return array.astype(np.float32)
    return array


class RestModel:
    """One model on a TensorFlow Serving REST API: `predict` over keep-alive connections.

    Thread-safe: each call takes an idle connection from a pool (or opens
    one) and gives it back when its answer is read, so concurrent calls each
    have their own and sequential ones reuse them.

    Args:
        url: the model's URL, `http://host:port/v1/models/<name>` (optionally
            with `/versions/<n>`), as TensorFlow Serving names it.
        timeout: seconds to wait for a connection, and for each read of an
            answer, before failing with `ServingError`.

    Example:

    ```python
    shard = RestModel("http://localhost:8501/v1/models/shard_0")
    answer = shard.predict({"keys": keys})  # {"neighbor_ids": [[...]], ...}
    ```
    """

    def __init__(self, url, *, timeout=30.0):
        if not isinstance(url, str):
            raise ValueError(f"`url` must be a string. Received: url={url!r}")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(
                "`url` must be a model's REST URL, such as "
                f"'http://localhost:8501/v1/models/resmem'. Received: url={url!r}"
            )
        self.url = url.rstrip("/")
        self.timeout = _validation.positive_float("timeout", timeout)
        self._scheme = parsed.scheme
        self._host, self._port = parsed.hostname, parsed.port
        self._predict_path = parsed.path.rstrip("/") + ":predict"
        self._idle = queue.LifoQueue()

    def _connect(self):
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        connection = cls(self._host, self._port, timeout=self.timeout)
        connection.connect()
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def _request(self, method, path, body=None):
        """`(status, body bytes)`; one retry on a kept-alive connection the server closed.

        `body`: bytes, or a list of bytes, sent one after the other.
        """
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if isinstance(body, list):
            length = sum(len(piece) for piece in body)
            if length < 1 << 16:  # small: one write
                body = b"".join(body)
            else:
                headers["Content-Length"] = str(length)
        for attempt in range(2):
            try:
                connection = self._idle.get_nowait()
                reused = True
            except queue.Empty:
                connection, reused = None, False
            try:
                if connection is None:
                    connection = self._connect()
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except TimeoutError as error:
                _close(connection)
                raise ServingError(
                    f"The model server at {self.url} did not answer within {self.timeout} s "
                    f"({error or 'timed out'}).",
                    self.url,
                ) from error
            except (ConnectionError, http.client.HTTPException, OSError) as error:
                _close(connection)
                # A kept-alive connection the server has since closed: once more, anew.
                stale = isinstance(
                    error,
                    (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError),
                )
                if reused and stale and attempt == 0:
                    continue
                raise ServingError(
                    f"The model server at {self.url} cannot be reached or failed: "
                    f"{type(error).__name__}: {error}",
                    self.url,
                ) from error
            if response.will_close:
                _close(connection)
            else:
                self._idle.put(connection)
            return response.status, data
        raise AssertionError("unreachable")

    def _json(self, status, data):
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if status != 200:
            message = answer.get("error") if isinstance(answer, dict) else None
            message = message or data[:500].decode("utf-8", "replace")
            if len(message) > 2000:  # TensorFlow's may quote a whole input, base64
                message = message[:2000] + f"... ({len(message)} characters)"
            raise ServingError(
                f"The model server at {self.url} answered HTTP {status}: {message}",
                self.url,
                status,
            )
        if not isinstance(answer, dict):
            raise ServingError(f"The model server at {self.url} answered no JSON object.", self.url)
        return answer

    def predict_json(self, inputs, signature_name="serving_default", body=None):
        """`predict`, with the outputs as JSON values (nested lists), not arrays.

        Args:
            inputs: a dict of named inputs (NumPy arrays, tensors or JSON
                values), ignored if `body` is given.
            signature_name: the signature to run.
            body: the request, already encoded (`encode_request`), to send
                one request to many models.
        """
        if body is None:
            body = _request_pieces(inputs, signature_name)
        status, data = self._request("POST", self._predict_path, body)
        answer = self._json(status, data)
        if "outputs" not in answer:
            raise ServingError(
                f"The model server at {self.url} answered without `outputs`: {sorted(answer)}",
                self.url,
            )
        outputs = answer["outputs"]
        # TensorFlow Serving gives a signature's only output unnamed.
        return outputs if isinstance(outputs, dict) else {"outputs": outputs}

    def predict(self, inputs, signature_name="serving_default"):
        """Runs signature `signature_name` on `inputs`; returns its outputs as NumPy arrays.

        Args:
            inputs: a dict of named inputs: NumPy arrays, tensors or nested lists.
            signature_name: the signature to run.

        Returns:
            A dict of outputs by name: float outputs as float32, integers as
            int64, strings as `str`, and `*_bytes` outputs (`{"b64": ...}`)
            as `bytes` (an object array of them for a list).

        Raises:
            ServingError: the server cannot be reached, did not answer within
                `timeout`, or answered an error (its message is included).
        """
        outputs = self.predict_json(inputs, signature_name)
        return {name: _to_array(value) for name, value in outputs.items()}

    def metadata(self):
        """The model's signatures, from TensorFlow Serving's `GET <url>/metadata`."""
        status, data = self._request("GET", urllib.parse.urlsplit(self.url).path + "/metadata")
        return self._json(status, data)

    def close(self):
        """Closes the idle connections (a later call opens new ones)."""
        while True:
            try:
                _close(self._idle.get_nowait())
            except queue.Empty:
                return


def _close(connection):
    if connection is not None:
        connection.close()


class ShardedClient:
    """Predicts with a sharded memory served by a front server and one server per shard.

    `predict(x)` runs `features` on the front, sends the keys to every shard
    server at once (a thread pool), and runs `merge` on the front with the
    shards' answers. It speaks TensorFlow Serving's REST API, so the servers
    can be stock `tensorflow_model_server`s (`--rest_api_port`) or
    `tf_server.py`. Each answer is checked: every shard of the front's
    memory must answer, once. Thread-safe: concurrent `predict` calls share
    keep-alive connections and a pool of `4 * S` threads.

    Two transports, the same predictions bit for bit:

    - `"packed"` (the default): the signatures `features_packed`, `packed`
      (`search_packed` with `shard_k`) and `merge_packed_bytes`, whose
      tensors between the servers are `tf.io.serialize_tensor` strings,
      which the REST API carries as `{"b64": ...}` (base64 of their float32
      and int64 bytes). The client forwards the front's packed keys to the
      shards and the shards' packed answers to the front as they came,
      without decoding them; `merge_packed_bytes` decodes and checks them in
      its graph, keeps each query's `k` nearest over all shards, and packs
      its outputs, which the client decodes. Several times less work per
      number than decimal JSON.
    - `"json"`: `features`, `serving_default` (`search`) and `merge`, every
      tensor as JSON numbers. The client parses the shards' answers,
      concatenates them along the neighbour axis in shard order, and sends
      `merge` only each query's `k` nearest rows (those `merge` would keep,
      in its order; `S` times less JSON). For SavedModels exported before
      the packed signatures existed.

    Args:
        front_url: the front model's URL (`export_front_saved_model`), as
            `http://host:port/v1/models/<name>`.
        shard_urls: the shard models' URLs (`export_shard_saved_model`), one
            per shard, in any order.
        timeout: seconds each server has to accept a connection and to send
            each part of its answer; a server that is down or hung fails the
            prediction with `ServingError` naming it, never a hang.
        shard_k: `None` to ask the shards for the `k` they were exported
            with (signature `serving_default`), or an int to ask for that
            many per request (signature `search`); at least the front's `k`.
        input_name: the front's input name for a non-dict `x`; default: read
            once from the front's metadata.
        transport: `"packed"` (serialized tensors as base64) or `"json"`
            (JSON numbers): see above.

    Example:

    ```python
    client = ShardedClient(
        "http://localhost:8500/v1/models/front",
        [f"http://localhost:{8501 + i}/v1/models/shard_{i}" for i in range(4)],
    )
    out = client.predict(x_test[:8])
    out["class_ids"], out["neighbor_ids"]
    ```
    """

    def __init__(
        self,
        front_url,
        shard_urls,
        *,
        timeout=30.0,
        shard_k=None,
        input_name=None,
        transport="packed",
    ):
        self.transport = _validation.one_of("transport", transport, TRANSPORTS)
        self.front = RestModel(front_url, timeout=timeout)
        if isinstance(shard_urls, str) or not shard_urls:
            raise ValueError(
                "`shard_urls` must be a non-empty list of the shard models' URLs, one per "
                f"shard. Received: shard_urls={shard_urls!r}"
            )
        self.shards = [RestModel(url, timeout=timeout) for url in shard_urls]
        if len({shard.url for shard in self.shards}) != len(self.shards):
            raise ValueError(f"`shard_urls` must not repeat a URL. Received: {list(shard_urls)}")
        if shard_k is not None:
            shard_k = _validation.positive_int("shard_k", shard_k)
        self.shard_k = shard_k
        self.input_name = input_name
        # Threads for 4 concurrent `predict` calls' shard requests at once.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=4 * len(self.shards), thread_name_prefix="resmem-shard"
        )
        self._lock = threading.Lock()

    def _inputs(self, x):
        if isinstance(x, dict):
            return x
        if self.input_name is None:
            with self._lock:
                if self.input_name is None:
                    self.input_name = self._front_input_name()
        return {self.input_name: x}

    def _front_input_name(self):
        try:
            signature = self.front.metadata()["metadata"]["signature_def"]["signature_def"]
            names = list(signature["features"]["inputs"])
        except (KeyError, TypeError) as error:
            raise ServingError(
                f"The front server at {self.front.url} gave no `features` signature in its "
                "metadata; pass `input_name`, or `x` as a dict of named inputs.",
                self.front.url,
            ) from error
        if len(names) != 1:
            raise ValueError(
                f"The front model takes several inputs {sorted(names)}: pass `x` as a dict."
            )
        return names[0]

    @staticmethod
    def _ask_shard_packed(shard, body):
        """One shard's packed answer: `answer_bytes` as it came (`{"b64": ...}`), its identity."""
        answer = shard.predict_json(None, body=body)
        missing = [n for n in ("answer_bytes", *_IDENTITY) if n not in answer]
        if not missing and not _is_b64(answer["answer_bytes"]):
            missing = ['answer_bytes as {"b64": ...}']
        if missing:
            raise ServingError(
                f"The server at {shard.url} is not a shard of a sharded memory with packed "
                f"answers: its answer lacks {missing} "
                "(a shard SavedModel exported without the packed signatures can be asked "
                "with transport='json').",
                shard.url,
            )
        return answer

    @staticmethod
    def _ask_shard(shard, body):
        """One shard's answer: its rows as arrays (parsed in the pool's thread), its identity."""
        answer = shard.predict_json(None, body=body)
        missing = [n for n in (*_ANSWER_ROWS, *_IDENTITY) if n not in answer]
        if missing:
            raise ServingError(
                f"The server at {shard.url} is not a shard of a sharded memory: its answer "
                f"lacks {missing}.",
                shard.url,
            )
        out = {}
        for name, value in answer.items():
            if name in _IDENTITY:
                out[name] = value
            elif name == "targets":  # class ids (m, k), or regression rows (m, k, c)
                array = np.asarray(value)
                out[name] = array.astype(np.int32 if array.ndim == 2 else np.float32)
            else:
                out[name] = np.asarray(value, _ROW_DTYPES.get(name))
        return out

    def _shard_answers(self, keys):
        if self.transport == "packed":
            inputs, signature, ask = {"keys_bytes": keys}, "packed", self._ask_shard_packed
        else:
            inputs, signature = {"keys": np.asarray(keys, np.float32)}, "serving_default"
            ask = self._ask_shard
        if self.shard_k is not None:
            inputs["k"] = self.shard_k
            signature = "search_packed" if self.transport == "packed" else "search"
        body = encode_request(inputs, signature)  # once, for every shard
        futures = [self._pool.submit(ask, shard, body) for shard in self.shards]
        # Each request has its own socket timeouts: these waits end.
        return [(shard, f.result()) for shard, f in zip(self.shards, futures, strict=True)]

    @staticmethod
    def _nearest(answers, k):
        """The shards' rows concatenated along the neighbour axis, cut to each query's `k` nearest.

        The same rows, in the same order, that the front's `merge` keeps of
        the whole concatenation (`top_k` keeps the lower position of equal
        distances, as a stable sort does): `merge` then gets `S` times less.
        """
        names = [n for n in answers[0] if n not in _IDENTITY]
        rows = {n: np.concatenate([a[n] for a in answers], axis=1) for n in names}
        distances = rows["distances"]
        if k is None or distances.shape[1] <= k:
            return rows
        order = np.argsort(distances, axis=1, kind="stable")[:, :k]
        return {
            n: np.take_along_axis(r, order.reshape(order.shape + (1,) * (r.ndim - 2)), axis=1)
            for n, r in rows.items()
        }

    def _check_answers(self, answers, digest, batch=None):
        """The answers in shard order, each of a shard of memory `digest`, each shard once.

        With `batch`, each must have `batch` rows (the packed transport's
        `merge_packed` checks that itself).
        """
        num_shards = len(self.shards)
        by_index = {}
        for shard, answer in answers:
            index, total = answer["shard_index"], answer["num_shards"]
            if answer["memory_digest"] != digest or total != num_shards:
                raise ServingError(
                    f"The server at {shard.url} serves shard {index} of {total} of memory "
                    f"{str(answer['memory_digest'])[:12]}, but the front serves memory "
                    f"{str(digest)[:12]} with {num_shards} shard URLs given.",
                    shard.url,
                )
            if index in by_index:
                raise ServingError(
                    f"The servers at {by_index[index][0].url} and {shard.url} both serve shard "
                    f"{index} of {total}; each shard must be served once.",
                    shard.url,
                )
            if batch is not None and len(answer["distances"]) != batch:
                raise ServingError(
                    f"The server at {shard.url} answered {len(answer['distances'])} rows for "
                    f"{batch} queries.",
                    shard.url,
                )
            by_index[index] = (shard, answer)
        return [by_index[i][1] for i in range(num_shards)]

    def predict(self, x, timings=None):
        """The ResMem prediction for `x`, from the front and every shard.

        Args:
            x: the model's input, a NumPy array (batch first), or a dict of
                named inputs for a model with several.
            timings: optionally a dict, filled with the seconds each stage
                took: `features`, `shards` (the slowest shard, with the
                client's checks), `merge` (the front's `merge` or
                `merge_packed` request, its encoding included) and `total`.

        Returns:
            A dict of NumPy arrays: `resmem_scores`, `class_ids`
            (classification), `neighbor_ids`, `neighbor_weights`,
            `neighbor_distances` (each `(batch, k)`, nearest first) and
            `deepnet_scores` (the network's own output).

        Raises:
            ServingError: a server that is down, timed out, answered an
                error, or is not a shard of the front's memory (a missing
                or repeated shard); the message names its URL.
        """
        start = time.perf_counter()
        packed = self.transport == "packed"
        features = self.front.predict_json(
            self._inputs(x), "features_packed" if packed else "features"
        )
        after_features = time.perf_counter()
        if packed:
            if not (_is_b64(features.get("keys_bytes")) and _is_b64(features.get("scores_bytes"))):
                raise ServingError(
                    f"The front server at {self.front.url} gave no packed `keys_bytes` and "
                    "`scores_bytes` (a front exported without the packed signatures can be "
                    "asked with transport='json').",
                    self.front.url,
                )
            answers = self._check_answers(
                self._shard_answers(features["keys_bytes"]), features.get("memory_digest")
            )
            after_shards = time.perf_counter()
            # The shards' answers go to the front as they came: base64, never decoded here.
            inputs = {
                "scores_bytes": features["scores_bytes"],
                "answers_bytes": [answer["answer_bytes"] for answer in answers],
            }
            packed_out = self.front.predict_json(inputs, "merge_packed_bytes")
            end = time.perf_counter()
            if not all(n.endswith("_bytes") and _is_b64(v) for n, v in packed_out.items()):
                raise ServingError(
                    f"The front server at {self.front.url} answered `merge_packed_bytes` "
                    f"without packed outputs: {sorted(packed_out)}",
                    self.front.url,
                )
            out = {n[: -len("_bytes")]: unpack_tensor(v) for n, v in packed_out.items()}
            scores = unpack_tensor(features["scores_bytes"])
        else:
            scores = np.asarray(features["scores"], np.float32)
            answers = self._check_answers(
                self._shard_answers(features["keys"]), features.get("memory_digest"), len(scores)
            )
            rows = self._nearest(answers, features.get("k"))
            after_shards = time.perf_counter()
            out = self.front.predict_json({"scores": scores, **rows}, "merge")
            end = time.perf_counter()
        if timings is not None:
            timings.update(
                features=after_features - start,
                shards=after_shards - after_features,
                merge=end - after_shards,
                total=end - start,
            )
        result = {name: _to_array(value, _OUTPUT_DTYPES.get(name)) for name, value in out.items()}
        result["deepnet_scores"] = scores
        return result

    def close(self):
        """Closes the connections and the thread pool."""
        self._pool.shutdown(wait=False)
        self.front.close()
        for shard in self.shards:
            shard.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
