"""`export_saved_model`: a ResMem model as a SavedModel for TensorFlow Serving."""

import os
import re

import keras
import tensorflow as tf

from keras_resmem import _io
from keras_resmem.api_export import keras_resmem_export
from keras_resmem.lifecycle import find_memory

MODES = ("portable", "scann")


def _check_mode(mode, memory):
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
    backend = memory.search
    if mode == "portable" and not backend.portable:
        raise ValueError(
            f"mode='portable' exports only stock TensorFlow ops, but this memory searches "
            f"with {backend.name!r}, whose custom ops stock TensorFlow Serving cannot load. "
            "Rebuild the memory with search='ivf' (approximate, stock ops) or "
            "search='exact', or export with mode='scann' for a ScaNN-enabled server."
        )
    if mode == "scann" and "Scann" not in backend.custom_op_namespaces:
        raise ValueError(
            f"mode='scann' exports a ScaNN searcher, but this memory searches with "
            f"{backend.name!r}. Use mode='portable', or rebuild the memory with search='scann'."
        )


def _input_names(model):
    """The signature's input names: each `keras.Input(name=...)`, `inputs` if unnamed.

    Read from the input layers, whose names survive a `.keras` round trip
    (the input tensors' do not), so two exports of one model agree.
    """
    names = [t._keras_history.operation.name for t in model.inputs]
    unnamed = [re.fullmatch(r"input_layer(_\d+)?", name) is not None for name in names]
    if len(names) == 1:
        return ["inputs" if unnamed[0] else names[0]]
    return [f"inputs_{i}" if u else n for i, (n, u) in enumerate(zip(names, unnamed, strict=True))]


@keras_resmem_export("keras_resmem.export_saved_model")
def export_saved_model(
    model, path, *, mode="portable", include_neighbors=True, overwrite=False, verbose=False
):
    """Exports a ResMem model as a SavedModel for TensorFlow Serving.

    The SavedModel has one signature, `serving_default`. Its inputs are the
    model's inputs, named as their `keras.Input(name=...)` (`inputs` for an
    unnamed single input), with any batch size. Its outputs:

    - `resmem_scores`: the ResMem prediction, `(batch, num_outputs)`;
    - `deepnet_scores`: the network's own output, unchanged (logits or
      probabilities, whichever the network returns);
    - `class_ids`: classification only: `argmax(resmem_scores)`, int64; -1
      for a row whose input is not finite (its scores are NaN);
    - `neighbor_ids`, `neighbor_weights`: if `include_neighbors`: the int64
      entry ids of the `k` nearest neighbours (see `keras_resmem.memorize`;
      by default the training examples' positions) and their weights,
      nearest first.

    Modes:

    - `"portable"`: only stock TensorFlow ops, so a stock `tensorflow_model_server`
      (and any TensorFlow runtime) loads it. The memory must use the `"exact"`
      or the `"ivf"` search backend.
    - `"scann"`: the memory's ScaNN index, saved with the `Scann` op namespace
      allowed. It needs a TensorFlow Serving build with ScaNN's ops linked in
      (stock servers fail with "Op type not registered 'Scann>...'"); in Python,
      `import scann` before loading it. The index is built once, on the first
      request.

    The directory is written atomically: it appears at `path` complete, or not
    at all. For TensorFlow Serving, export to `<model_base_path>/<version>`.

    Args:
        model: a Keras model holding one `ResidualMemory` layer, such as the
            result of `keras_resmem.attach_memory` (or that model reloaded).
        path: the SavedModel directory to write.
        mode: `"portable"` or `"scann"`, as above.
        include_neighbors: whether to output `neighbor_ids` and `neighbor_weights`.
        overwrite: whether to replace an existing `path`.
        verbose: whether to print the exported signature.

    Returns:
        The absolute path of the SavedModel.

    Raises:
        ValueError: the model holds no memory, or its search backend does not
            fit `mode` (the message says which backend to use).
        FileExistsError: `path` exists and `overwrite` is false.

    Example:

    >>> import keras, numpy as np, tempfile, tensorflow as tf
    >>> import keras_resmem
    >>> inputs = keras.Input((4,), name="features")
    >>> h = keras.layers.Dense(8, activation="relu", name="pre_logits")(inputs)
    >>> base = keras.Model(inputs, keras.layers.Dense(3)(h))
    >>> x = np.random.default_rng(0).normal(size=(100, 4)).astype("float32")
    >>> model = keras_resmem.attach_memory(base, "pre_logits", (x, np.arange(100) % 3),
    ...                                    k=5, search="exact", verbose=0)
    >>> path = keras_resmem.export_saved_model(model, tempfile.mkdtemp() + "/resmem/1")
    >>> serve = tf.saved_model.load(path).signatures["serving_default"]
    >>> sorted(serve(features=tf.constant(x[:2])))
    ['class_ids', 'deepnet_scores', 'neighbor_ids', 'neighbor_weights', 'resmem_scores']
    """
    memory = find_memory(model)
    memory._check_ready()
    _check_mode(mode, memory)
    path = os.path.abspath(os.fspath(path))
    _io.refuse_existing(path, overwrite)  # before tracing, not after
    # The network part up to the memory: its inputs to the memory's two inputs.
    features = keras.Model(model.inputs, list(memory.input), name=f"{model.name}_features")
    specs = [
        tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=name)
        for t, name in zip(model.inputs, _input_names(model), strict=True)
    ]
    classification = memory.task == "classification"

    # The memory's own searcher, or one a SavedModel can hold (ScaNN's index
    # as variables); the model itself is not changed, and can keep serving.
    searcher, trackables = memory.search.for_export()

    def serve(*inputs):
        embedding, scores = features(inputs[0] if len(inputs) == 1 else list(inputs))
        prediction, ids, weights = memory._predict(
            [embedding, scores], searcher, return_neighbors=True
        )
        out = {"resmem_scores": prediction, "deepnet_scores": tf.identity(scores)}
        if classification:
            # -1 for a row with non-finite scores (a non-finite input): never
            # a confident class out of NaN.
            valid = tf.reduce_all(tf.math.is_finite(prediction), axis=-1)
            out["class_ids"] = tf.where(valid, tf.argmax(prediction, axis=-1), -1)
        if include_neighbors:
            out.update(neighbor_ids=ids, neighbor_weights=weights)
        return out

    archive = keras.export.ExportArchive()
    archive.track(features)
    archive.track(memory)
    for trackable in trackables:
        archive.track(trackable)
    namespaces = list(memory.search.custom_op_namespaces) if mode != "portable" else None
    options = tf.saved_model.SaveOptions(namespace_whitelist=namespaces)
    archive.add_endpoint("serving_default", serve, input_signature=specs)
    with _io.atomic_directory(path, overwrite=overwrite) as tmp:
        archive.write_out(tmp, options=options, verbose=verbose)
    return path
