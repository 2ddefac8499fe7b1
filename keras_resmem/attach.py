"""`attach_memory`: turn a trained Keras model into its ResMem model."""

import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_resmem import _validation
from keras_resmem.api_export import keras_resmem_export
from keras_resmem.input_guard import NonFiniteInputGuard
from keras_resmem.residual_memory import ResidualMemory


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a Keras model (functional or Sequential). "
            f"Received: model of type {type(model).__name__}"
        )
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise TypeError(
            "`attach_memory` needs a functional or Sequential Keras model, whose layer "
            "graph it can read; a subclassed model has none. Rebuild it with "
            "`keras.Model(inputs, outputs)`, or build the Sequential model with an "
            f"`keras.Input`. Received: model {model.name!r} of type {type(model).__name__}"
        )
    if len(outputs) != 1:
        raise ValueError(
            "`model` must have exactly one output (the class scores). "
            f"Received: a model with {len(outputs)} outputs"
        )


def _graph(model):
    """The functional graph of a model (a Sequential model keeps one inside)."""
    return getattr(model, "_functional", None) or model


def _layer_paths(model, prefix=""):
    """`{path: layer}` for every layer of `model`, nested models' layers as `outer/inner`."""
    paths = {}
    for layer in model.layers:
        paths[prefix + layer.name] = layer
        if isinstance(layer, keras.Model) and hasattr(_graph(layer), "_nodes_by_depth"):
            paths.update(_layer_paths(layer, f"{prefix}{layer.name}/"))
    return paths


def _resolve_layer_path(model, layer_name):
    """The path of `layer_name`: itself, or the one nested layer of that name."""
    paths = _layer_paths(model)
    if isinstance(layer_name, str) and layer_name in paths:
        return layer_name
    matches = [
        p for p in paths if isinstance(layer_name, str) and p.rsplit("/", 1)[-1] == layer_name
    ]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ValueError(
            f"`layer_name`={layer_name!r} names several nested layers: {matches}. "
            "Give its path, `outer/inner`."
        )
    raise ValueError(
        f"`layer_name` must name a layer of model {model.name!r}, or a layer inside one of "
        f"its nested models (as `outer/inner`). Received: layer_name={layer_name!r}. "
        f"Valid names: {list(paths)}"
    )


def _calls_in(model, layer):
    """The nodes where `model`'s graph calls `layer`."""
    own = {id(n) for nodes in _graph(model)._nodes_by_depth.values() for n in nodes}
    return [n for n in layer._inbound_nodes if id(n) in own]


def _node_outputs(model, layer, layer_name):
    """The output of `layer`'s one call inside `model`'s graph."""
    nodes = _calls_in(model, layer)
    if len(nodes) != 1:
        raise ValueError(
            f"Layer {layer_name!r} has no single output to use as the embedding: it is "
            f"called {len(nodes)} times in model {model.name!r} (a shared layer)."
        )
    outputs = nodes[0].output_tensors
    if len(outputs) != 1:
        raise ValueError(
            f"Layer {layer_name!r} has several outputs; choose a layer with one output "
            "as the embedding."
        )
    return outputs[0]


def _key_and_output(model, layer_name):
    """The key layer's output and the model's output, as tensors of one graph on `model.inputs`.

    A layer of `model`, or a nested model (a transfer-learning backbone), is
    read where `model` calls it. For a layer inside a nested model the graph
    is run again with that nested model inlined (its layers called directly,
    sharing their weights), so that the layer's output is in the graph and
    every layer appears once, which a `.keras` file needs.
    """
    path = _resolve_layer_path(model, layer_name).split("/")
    if len(path) == 1:
        return _node_outputs(model, model.get_layer(path[0]), layer_name), model.outputs[0]
    parent = model
    for depth, name in enumerate(path[:-1]):
        child = parent.get_layer(name)
        if len(_calls_in(parent, child)) != 1:
            raise ValueError(
                f"The nested model {'/'.join(path[: depth + 1])!r} is called more than once; "
                "a key layer inside it needs it called once."
            )
        parent = child
    outputs, key = _inline(model, list(model.inputs), path)
    return key, outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def _inline(functional, inputs, path):
    """Runs `functional` on `inputs` layer by layer, the nested models on `path` inlined.

    Returns:
        `(outputs, key)`: the outputs, and the output of the layer at `path`.
    """
    found = []
    head, rest = path[0], path[1:]

    def operation_fn(operation):
        if operation.name != head:
            return operation
        if not rest:

            def record(*args, **kwargs):
                found.append(operation(*args, **kwargs))
                return found[-1]

            return record

        def inline(*args, **kwargs):
            outputs, key = _inline(operation, list(args), rest)
            found.append(key)
            return outputs

        return inline

    outputs = _graph(functional)._run_through_graph(inputs, operation_fn=operation_fn)
    return outputs, found[0]


# Layers that pass their input through unchanged at inference.
_PASS_THROUGH = (
    keras.layers.Identity,
    keras.layers.Dropout,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization,
)


def _is_softmax(operation):
    # A `Softmax` layer, or Keras's `ops.softmax` (which `activations.softmax` calls).
    if isinstance(operation, keras.layers.Softmax) or type(operation).__name__ == "Softmax":
        return True
    activation = getattr(operation, "activation", None)
    return activation is keras.activations.softmax or (
        getattr(activation, "__name__", None) == "softmax"
    )


def _passes_through(operation):
    if isinstance(operation, (*_PASS_THROUGH, NonFiniteInputGuard)):
        return True
    activation = getattr(operation, "activation", None)
    return isinstance(operation, keras.layers.Activation) and (
        getattr(activation, "__name__", None) == "linear"
    )


def _outputs_are_probabilities(output_tensor):
    """Whether the model's output ends in a softmax, through any pass-through layers."""
    tensor = output_tensor
    for _ in range(64):
        operation, node_index, _ = tensor._keras_history
        if _is_softmax(operation):
            return True
        if not _passes_through(operation):
            return False
        inputs = operation._inbound_nodes[node_index].input_tensors
        if isinstance(operation, NonFiniteInputGuard):
            inputs = inputs[-1:]  # the guarded output
        if len(inputs) != 1:
            return False
        tensor = inputs[0]
    return False


def _look_like_probabilities(scores):
    """Whether every row of `scores` is non-negative and sums to 1: a softmax's output."""
    scores = scores.reshape(-1, scores.shape[-1]).astype(np.float64)
    return bool(
        len(scores) and (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4)
    )


# The keys of a dict element of `data` (the form that can carry ids).
DATA_KEYS = ("x", "y", "sample_weight", "ids")


def _check_data_dict(keys, where):
    unknown = sorted(set(keys) - set(DATA_KEYS))
    if unknown or not {"x", "y"} <= set(keys):
        raise ValueError(
            f"A dict in `data` must have keys 'x' and 'y', and may have 'sample_weight' and "
            f"'ids'. Received {where} with keys {sorted(keys)}"
        )


def _as_dataset(data, batch_size, input_rank, allow_ids=False):
    """`data` as a batched dataset of `(x, y)`, `(x, y, sample_weight)`, or (with `allow_ids`)
    dicts with keys `DATA_KEYS`."""
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if allow_ids and isinstance(spec, dict):
            _check_data_dict(spec, "a dataset")
            x_spec = tf.nest.flatten(spec["x"])[0]
        elif not (isinstance(spec, tuple) and len(spec) in (2, 3)):
            forms = "`(x, y)`, `(x, y, sample_weight)`" + (
                " or dicts with keys 'x', 'y', 'sample_weight', 'ids'" if allow_ids else ""
            )
            raise ValueError(
                f"`data` must be a `tf.data.Dataset` of {forms}. "
                f"Received: a dataset with element_spec={spec}"
            )
        else:
            x_spec = tf.nest.flatten(spec[0])[0]
        if x_spec.shape.rank is not None and x_spec.shape.rank == input_rank - 1:
            data = data.batch(batch_size)
        return data
    if allow_ids and isinstance(data, dict):
        _check_data_dict(data, "a dict")
        n = len(tf.nest.flatten(data["x"])[0])
        for name in DATA_KEYS[1:]:
            if name in data and len(data[name]) != n:
                raise ValueError(
                    f"`data[{name!r}]` must have one row per example ({n}). "
                    f"Received: {len(data[name])} rows"
                )
        return tf.data.Dataset.from_tensor_slices(dict(data)).batch(batch_size)
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        n = len(tf.nest.flatten(data[0])[0])
        for name, part in zip(("labels", "sample weights"), data[1:], strict=False):
            if len(part) != n:
                raise ValueError(
                    f"`data` must be `(x, y)` or `(x, y, sample_weight)` with one row of "
                    f"{name} per example. Received: {n} examples and {len(part)} rows of {name}"
                )
        return tf.data.Dataset.from_tensor_slices(tuple(data)).batch(batch_size)
    raise ValueError(
        "`data` must be a `tf.data.Dataset` of `(x, y)` or `(x, y, sample_weight)`, or a "
        f"tuple of arrays. Received: {type(data).__name__}"
    )


def _num_entries(data, positions):
    """The number of memory entries in array `data`, or None if it cannot be known."""
    if isinstance(data, tf.data.Dataset) or positions is None:
        return None
    if isinstance(data, dict):
        data = (
            data["x"],
            data["y"],
            *(() if "sample_weight" not in data else (data["sample_weight"],)),
        )
    if len(data) == 3:
        return int(np.count_nonzero(np.asarray(data[2])))
    return len(tf.nest.flatten(data[0])[0]) * positions


def _class_ids(y, num_classes, start):
    """Integer class ids from int labels or one-hot rows (the writer checks their range)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        if y.shape[1] != num_classes:
            raise ValueError(
                f"The labels are {y.shape[1]} wide but the model has {num_classes} outputs. "
                "Give integer class ids or one-hot rows of the output's width."
            )
        if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            raise ValueError(
                "2-D labels must be one-hot rows (soft labels are not supported); "
                f"examples {start}..{start + len(y) - 1} are not."
            )
        return y.argmax(axis=1).astype(np.int32)
    if y.ndim != 1:
        raise ValueError(
            f"Labels must be class ids (n,) or one-hot (n, c). Received shape {y.shape}"
        )
    if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    return y


def _batch_entries(step, emb, out, y, sample_weight, task, ids=None):
    """One batch's memory entries: `(keys, outputs, targets, ids, count)`, one row each.

    Every position of a sequence output `(batch, time, c)` is an entry; entries
    whose sample weight is 0 are left out. `ids` (or None) has one id per entry.
    """
    lead = out.shape[:-1]
    n = math.prod(lead)
    if emb.shape[: len(lead)] != lead:
        raise ValueError(
            f"The embedding layer's output {emb.shape} must start with the model output's "
            f"leading dimensions {lead} (batch, or batch and time), so that every output "
            f"position has its own key. Received in batch {step}."
        )
    keys = emb.reshape(n, -1)
    out = out.reshape(n, -1)
    c = out.shape[1]
    if task == "classification" and y.size == n:
        y = y.reshape(n)
    elif y.size == n * c:
        y = y.reshape(n, c)
    else:
        raise ValueError(
            f"Batch {step} of `data` has outputs of shape {lead + (c,)} but labels of shape "
            f"{y.shape}. Labels must be class ids of shape {lead} or one-hot rows of shape "
            f"{lead + (c,)} (regression: targets of shape {lead + (c,)})."
        )
    if ids is not None:
        ids = np.asarray(ids)
        if ids.size != n:
            raise ValueError(
                f"Batch {step} of `data` has ids of shape {ids.shape}; they must have the "
                f"outputs' leading shape {lead} (one id per memory entry)."
            )
        ids = ids.reshape(n)
    if not sample_weight:
        return keys, out, y, ids, n
    weight = np.asarray(sample_weight[0])
    if weight.size != n:
        raise ValueError(
            f"Batch {step} of `data` has sample weights of shape {weight.shape}; they must "
            f"have the outputs' leading shape {lead} (one weight per entry)."
        )
    bad = ~np.isfinite(weight.reshape(n)) | (weight.reshape(n) < 0)
    if bad.any():
        raise ValueError(
            f"Sample weights must be finite and not negative (0 leaves an entry out). "
            f"Received: {weight.reshape(n)[bad][0]} in batch {step}, at entry "
            f"{int(np.argmax(bad))} of the batch."
        )
    kept = weight.reshape(n) != 0
    return keys[kept], out[kept], y[kept], None if ids is None else ids[kept], int(kept.sum())


def _new_memory(output, *, task, from_logits, **settings):
    """An empty `ResidualMemory` for a model with `output`; `from_logits=None` detects it."""
    num_outputs = output.shape[-1]
    if task == "classification":
        if from_logits is None:
            from_logits = not _outputs_are_probabilities(output)
        if num_outputs is None or num_outputs < 2:
            raise ValueError(
                "Classification needs one output per class (at least 2); the model's output "
                f"has shape {output.shape}. For a single score use task='regression'."
            )
    return ResidualMemory(
        task=task,
        from_logits=True if from_logits is None else from_logits,
        name="residual_memory",
        **settings,
    )


def _predict_function(model, embedding, output):
    """A compiled function from `model`'s inputs to `(embedding, output)`, in inference mode."""
    features = keras.Model(model.inputs, [embedding, output])
    predict = tf.function(
        lambda x: features(x, training=False), reduce_retracing=True, autograph=False
    )
    # One function per memory, each traced once: that is not the retracing
    # TensorFlow warns about, so do not let it warn.
    predict._omit_frequent_tracing_warning = True
    return predict


def _check_head(memory, scores, detect):
    """Catches a probability output taken for logits (see `_fill_memory`)."""
    if memory.task != "classification" or not memory.from_logits:
        return
    if not _look_like_probabilities(scores):
        return
    if detect:
        memory.from_logits = False
        return
    warnings.warn(
        "The model's outputs look like probabilities (every row of the first batch is "
        "non-negative and sums to 1), but the memory treats them as logits "
        "(from_logits=True). If the model ends in a softmax, pass from_logits=False.",
        stacklevel=4,
    )


def _check_finite_inputs(x, step, first_example):
    """Raises on an example whose float inputs hold NaN or infinity, naming it.

    The network may map such an input to finite values (a ReLU maps NaN to
    0), which would then be memorized without a trace of the problem.
    """
    for part in tf.nest.flatten(x):
        if not part.dtype.is_floating:
            continue
        rows = tf.reshape(tf.math.is_finite(part), [tf.shape(part)[0], -1])
        bad = ~tf.reduce_all(rows, axis=1).numpy()
        if bad.any():
            raise ValueError(
                f"The inputs of {int(bad.sum())} example(s) in batch {step} of `data` hold NaN "
                f"or infinite values (the first: example {first_example + int(np.argmax(bad))} "
                "of the data). A memory is not built from them."
            )


def _with_ids(data, ids):
    """Array `data` with `ids` (one per example) as a dict; `data` itself if `ids` is None."""
    if ids is None:
        return data
    if isinstance(data, tf.data.Dataset) or isinstance(data, dict):
        raise ValueError(
            "`ids` can be given beside arrays only. A `tf.data.Dataset` or a dict carries "
            "its ids in its elements, under the key 'ids' (so that they follow any "
            "shuffling). Received: ids with data of type " + type(data).__name__
        )
    if not (isinstance(data, (tuple, list)) and len(data) in (2, 3)):
        return data  # `_as_dataset` names the problem
    n = len(tf.nest.flatten(data[0])[0])
    ids = np.asarray(ids)
    if ids.ndim == 0 or len(ids) != n:
        raise ValueError(
            f"`ids` must hold one id per memory entry: one per example ({n} here), or one "
            f"per position for sequence outputs. Received: ids of shape {ids.shape}"
        )
    named = {"x": data[0], "y": data[1], "ids": ids}
    if len(data) == 3:
        named["sample_weight"] = data[2]
    return named


def _fill_memory(
    memory,
    predict,
    data,
    model,
    output,
    *,
    batch_size,
    verbose,
    ids=None,
    append=False,
    detect_probabilities=False,
):
    """Runs the network over `data` once and fills `memory` (one streamed pass).

    With `append`, the entries are added to the memory (`add_examples`); else
    they replace it. With `detect_probabilities`, a classification memory
    set for logits switches to probabilities if the first batch's outputs
    are all softmax rows (a head no graph check recognises: a `Lambda`).
    """
    task, num_outputs = memory.task, output.shape[-1]
    data = _with_ids(data, ids)
    dataset = _as_dataset(data, batch_size, len(model.inputs[0].shape), allow_ids=True)
    positions = None if None in output.shape[1:-1] else math.prod(output.shape[1:-1])
    first_id = memory._next_id() if append else 0
    writer = None
    cardinality = int(dataset.cardinality())
    progbar = keras.utils.Progbar(
        cardinality if cardinality > 0 else None, verbose=verbose, unit_name="batch"
    )
    seen = examples = 0
    for step, batch in enumerate(dataset):
        if isinstance(batch, dict):
            x, y, batch_ids = batch["x"], batch["y"], batch.get("ids")
            rest = () if "sample_weight" not in batch else (batch["sample_weight"],)
        else:
            x, y, batch_ids, rest = batch[0], batch[1], None, batch[2:]
        _check_finite_inputs(x, step, examples)
        examples += int(tf.shape(tf.nest.flatten(x)[0])[0])
        emb, out = (t.numpy() for t in predict(x))
        if writer is None:
            _check_head(memory, out, detect_probabilities)
            writer = memory._writer(capacity=_num_entries(data, positions), first_id=first_id)
        keys, out, y, batch_ids, kept = _batch_entries(
            step,
            emb,
            out,
            np.asarray(y),
            rest,
            task,
            None if batch_ids is None else np.asarray(batch_ids),
        )
        if task == "classification":
            y = _class_ids(y, num_outputs, seen)
        writer.write(keys, out, y, batch_ids)
        seen += kept
        progbar.update(step + 1)
    if seen == 0:
        raise ValueError(
            "`data` is empty (or every sample weight is 0): a memory needs at least one "
            "training example."
        )
    if append:
        memory._append(writer.finish(), verbose=verbose)
    else:
        memory._fill(writer.finish(), verbose=verbose)


def _sharded_settings(shards, data, ids, search, task, from_logits, sparse_residuals, temperature):
    """`attach_memory(shards=...)`: the manifest, and the settings it fixes."""
    import keras_resmem.sharded.format as format_lib
    import keras_resmem.sharded.memory as sharded_memory

    if data is not None or ids is not None:
        raise ValueError(
            "`shards` is the memory's data: give `shards` or `data` (and `ids`), not both."
        )
    manifest = format_lib.read_manifest(shards)
    given = {"task": task, "from_logits": from_logits, "sparse_residuals": sparse_residuals}
    saved = {
        "task": manifest.task,
        "from_logits": manifest.from_logits,
        "sparse_residuals": manifest.sparse_residuals,
    }
    for name, value in given.items():
        default = name == "task" and value == "classification"
        if value is not None and value != saved[name] and not default:
            raise ValueError(
                f"The sharded memory at {manifest.path} was built with {name}={saved[name]!r}. "
                f"Received: {name}={value!r}"
            )
    if manifest.sparse_residuals is not None and temperature != manifest.temperature:
        raise ValueError(
            f"The sharded memory at {manifest.path} stores residuals computed at temperature="
            f"{manifest.temperature!r}; they cannot change. Received: temperature={temperature!r}"
        )
    # The default search serves the shards' own index (IVF: their centroids and lists).
    adopt = isinstance(search, str) and search == "auto"
    if adopt:
        search = sharded_memory.default_search(manifest)
    return manifest, search, adopt, manifest.task, manifest.from_logits, manifest.sparse_residuals


@keras_resmem_export("keras_resmem.attach_memory")
def attach_memory(
    model,
    layer_name,
    data=None,
    *,
    shards=None,
    ids=None,
    k=50,
    sigma=1.0,
    temperature=1.0,
    method="resmem",
    knn_weight=0.5,
    task="classification",
    search="auto",
    sparse_residuals=None,
    key_projection=None,
    batch_size=256,
    from_logits=None,
    scann_options=None,
    ivf_options=None,
    verbose=1,
    name=None,
):
    """Builds the ResMem model of a trained Keras model.

    Runs `model` once over the training `data`, recording each example's
    embedding (the output of layer `layer_name`), the model's output and the
    label, and returns a new model with the same inputs whose output is the
    ResMem prediction (see `keras_resmem.ResidualMemory`). `model` itself is
    not modified: the new model shares its layers and weights.

    Without `data` the memory is empty: fill it later with
    `keras_resmem.memorize(resmem, data)`, grow it with
    `keras_resmem.add_examples` and remove entries with `keras_resmem.forget`.
    Predicting with an empty memory raises an error.

    Sequence models work the same way: with outputs `(batch, time, vocab)`
    and an embedding layer `(batch, time, dim)`, every position is a memory
    entry, and labels are `(batch, time)` token ids. Sample weights of 0 leave
    positions out (padding, or context that an overlapping window memorizes).

    The memory is built in one streamed pass, with a progress bar: for
    arrays, each batch goes straight into the memory's variables, so no more
    than one batch of activations is held beside the memory. A
    `tf.data.Dataset` does not say in advance how many entries it holds: its
    batches are kept as they come and moved into the variables at the end,
    each freed once copied, which also holds the memory about once.

    Args:
        model: a trained functional or Sequential Keras model with one output:
            class scores (logits, or a softmax) for classification, or
            predictions for regression.
        layer_name: the name of the layer whose output is the embedding (the
            paper uses the pre-logit layer). It may be a nested model (a
            transfer-learning backbone such as a `keras.applications`
            model), or a layer inside one, by its name or its path
            `"backbone/layer"`. For a layer inside a nested model the
            returned model calls that nested model's layers directly (inlined).
        data: the training data, or None for an empty memory: a
            `tf.data.Dataset` of `(x, y)` or `(x, y, sample_weight)`
            (batched or not), or a tuple of arrays; or, to carry each
            example's id, dicts with keys `"x"`, `"y"`, `"ids"` and
            optionally `"sample_weight"` (a dict of arrays, or a dataset of
            dicts). Labels are integer class ids or one-hot rows;
            regression targets have the output's width. Entries whose
            sample weight is 0 are not memorized.
        shards: instead of `data`: a sharded memory built elsewhere, the path
            of its `manifest.json` (or its directory), as
            `keras_resmem.beam.build_sharded_memory` writes it. Every shard
            is read and checked (digests, shapes, values) into the memory;
            with the default `search="auto"`, each query searches every
            shard exactly and their top-k are merged
            (`keras_resmem.search.Sharded`), or, for a memory built with
            shared IVF centroids, probes the same partitions of every shard
            (`keras_resmem.search.IVF`). The model is saved and exported as
            any other. `task`, `from_logits` and `sparse_residuals` come from
            the manifest (a different value given here is an error).
        ids: for array `data`: the examples' int64 ids, unique (for sequence
            outputs, one per position, `(n, time)`). Neighbours are reported
            by these ids. Default: the entries' positions `0 .. n-1`.
        k: the number of neighbours combined.
        sigma: the distance scale of the neighbour weights.
        temperature: the softmax temperature `T` (classification).
        method: `"resmem"`, or a baseline over the same neighbours: `"knn"`
            (kNN on labels) or `"interpolation"` (kNN-LM-style); see
            `ResidualMemory`. Can be changed later on the memory layer.
        knn_weight: `"interpolation"` only: the weight of the kNN on labels.
        task: `"classification"` or `"regression"`.
        search: the search backend: a `keras_resmem.search` backend such as
            `keras_resmem.search.IVF(num_probes=8)`, or `"auto"`, `"exact"`,
            `"ivf"` or `"scann"`; see `ResidualMemory`.
            For a SavedModel that stock TensorFlow Serving can load, use
            `"exact"` or `"ivf"` (see `keras_resmem.export_saved_model`).
        sparse_residuals: `None` to store the outputs whole, or `m` to store
            each residual's `m` largest-magnitude entries (for outputs as wide
            as a vocabulary); see `ResidualMemory`.
        key_projection: `None`, or a `keras_resmem.projection.PCA(dim)` (or
            just `dim`): store and search the keys' top `dim` principal
            components, fitted on the training keys; see `ResidualMemory`.
        batch_size: batch size for arrays and unbatched datasets.
        from_logits: whether the model outputs logits. `None` detects it: a
            model whose last layer applies a softmax outputs probabilities.
        scann_options, ivf_options: the options of version 0.1, beside a
            `search` name; see `ResidualMemory`.
        verbose: 1 shows a progress bar, 0 is silent.
        name: the new model's name; default `"<model name>_resmem"`.

    Returns:
        A `keras.Model` whose output is the ResMem prediction. Its memory layer
        is `model.get_layer("residual_memory")`. It is compiled for that
        output, so `evaluate` works: classification with sparse categorical
        cross-entropy on probabilities and accuracy (integer labels);
        regression with mean squared and mean absolute error.

    Raises:
        TypeError: `model` is not a functional or Sequential Keras model.
        ValueError: an unknown `layer_name` (the message lists the valid
            names), labels that do not fit the output, `k` larger than the
            data, NaN or infinite embeddings, or empty `data`.

    Example:

    >>> import keras, numpy as np
    >>> import keras_resmem
    >>> inputs = keras.Input((4,))
    >>> h = keras.layers.Dense(8, activation="relu", name="pre_logits")(inputs)
    >>> base = keras.Model(inputs, keras.layers.Dense(3)(h))
    >>> x = np.random.default_rng(0).normal(size=(100, 4)).astype("float32")
    >>> y = np.arange(100) % 3
    >>> resmem = keras_resmem.attach_memory(base, "pre_logits", (x, y), k=1, sigma=0.01, verbose=0)
    >>> # A small k and sigma memorize every training label (Remark 3.2):
    >>> float((resmem.predict(x, verbose=0).argmax(-1) == y).mean())
    1.0
    """
    _check_model(model)
    batch_size = _validation.positive_int("batch_size", batch_size)
    if from_logits is not None:
        from_logits = _validation.boolean("from_logits", from_logits)
    embedding, output = _key_and_output(model, layer_name)
    manifest, adopt = None, False
    if shards is not None:
        manifest, search, adopt, task, from_logits, sparse_residuals = _sharded_settings(
            shards, data, ids, search, task, from_logits, sparse_residuals, temperature
        )
    # Validate the hyperparameters before the (long) pass over the data.
    memory = _new_memory(
        output,
        task=task,
        from_logits=from_logits,
        k=k,
        sigma=sigma,
        temperature=temperature,
        method=method,
        knn_weight=knn_weight,
        search=search,
        sparse_residuals=sparse_residuals,
        key_projection=key_projection,
        scann_options=scann_options,
        ivf_options=ivf_options,
    )
    if data is None and ids is not None:
        raise ValueError("`ids` name the examples of `data`; received ids but no data.")
    # Called on the network's tensors first: the memory is built empty, then filled.
    # An example with a non-finite input gets NaN scores, even where the network
    # maps it to finite values.
    float_inputs = [x for x in model.inputs if "float" in str(x.dtype)]
    guarded = output
    already = isinstance(output._keras_history.operation, NonFiniteInputGuard)
    if float_inputs and not already:
        guarded = NonFiniteInputGuard(name="non_finite_input_guard")([*float_inputs, output])
    prediction = memory([embedding, guarded])
    resmem = keras.Model(model.inputs, prediction, name=name or f"{model.name}_resmem")
    if manifest is not None:
        import keras_resmem.sharded.memory as sharded_memory

        if (memory.key_dim, memory.num_outputs) != (manifest.key_dim, manifest.num_outputs):
            raise ValueError(
                f"The sharded memory at {manifest.path} holds keys of {manifest.key_dim} "
                f"features and {manifest.num_outputs} outputs, but layer {layer_name!r} of this "
                f"model gives {memory.key_dim} features and the model {memory.num_outputs} "
                "outputs: it was built from another model or layer."
            )
        entries, index = sharded_memory.load_entries(manifest, verbose=verbose)
        memory._fill(entries, verbose=verbose, index=index if adopt else None)
    if data is not None:
        predict = _predict_function(model, embedding, output)
        _fill_memory(
            memory,
            predict,
            data,
            model,
            output,
            batch_size=batch_size,
            verbose=verbose,
            ids=ids,
            detect_probabilities=from_logits is None,
        )
    # Compiled for its output, probabilities (not the base model's logits), so that
    # `evaluate` works and no loss written for logits is reused by mistake. Plain
    # SGD: it has no per-weight slots, so a saved, never-trained model reloads
    # without Keras's "Skipping variable loading for optimizer" warning.
    if task == "classification":
        resmem.compile(
            optimizer="sgd",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
    else:
        resmem.compile(optimizer="sgd", loss="mean_squared_error", metrics=["mean_absolute_error"])
    return resmem
