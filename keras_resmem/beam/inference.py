"""`KeyAndOutputModelHandler`: Beam's `RunInference` over a saved Keras model's key and output.

The handler loads the base model from its `.keras` file once per worker and
compiles the same two-output function `attach_memory` builds (the key
layer's output and the model's output, in inference mode), so that a
sharded memory holds the entries `attach_memory` would compute.

Examples come in two forms, and a `PCollection` may mix them:

- one example: a tuple `(id, x, y)`: an int id, the model's input for one
  example (`x.shape == model.inputs[0].shape[1:]`), and its label (a class
  id or a one-hot row; regression: the target row);
- a batch of examples, as `attach_memory`'s dict data: `{"ids": (b,),
  "x": (b, ...), "y": (b,) or (b, c)}`. Batches cost Beam one element
  each instead of `b`: the fast way in (`ReadExamples` yields them).
"""

import dataclasses
import math

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from keras_resmem import _validation

BATCH_KEYS = ("ids", "x", "y")


def example_count(element):
    """The number of examples in an element: 1 for a tuple, `len(ids)` for a batch dict."""
    if isinstance(element, dict):
        return max(1, len(element.get("ids", ())))
    return 1


def _element_parts(element, position):
    """`(ids, x, y)` of one element, each with a leading batch axis."""
    if isinstance(element, dict):
        if set(element) != set(BATCH_KEYS):
            raise ValueError(
                f"A batch of examples must be a dict with keys {list(BATCH_KEYS)} (as "
                f"`attach_memory`'s dict data). Received: a dict with keys {sorted(element)} "
                f"(element {position} of a batch)"
            )
        ids, x, y = (np.asarray(element[key]) for key in BATCH_KEYS)
        if ids.ndim != 1 or len(x) != len(ids) or len(y) != len(ids):
            raise ValueError(
                "A batch of examples must hold one id, one input and one label per example: "
                f"`ids` of shape (b,), `x` (b, ...), `y` (b, ...). Received: ids {ids.shape}, "
                f"x {x.shape}, y {y.shape}"
            )
        return ids, x, y
    if isinstance(element, (tuple, list)) and len(element) == 3:
        example_id, x, y = element
        return np.asarray([example_id]), np.asarray(x)[None], np.asarray(y)[None]
    raise ValueError(
        "Examples must be tuples `(id, x, y)`, or batches: dicts "
        f"{{'ids': (b,), 'x': (b, ...), 'y': (b, ...)}}. Received: {type(element).__name__} "
        f"{str(element)[:80]}"
    )


def stack_examples(elements, input_shape, input_dtype):
    """`(ids, x, y)`: the examples of `elements` stacked, checked against the model's input.

    Raises:
        ValueError: an element of another form, an id that is not an integer,
            an input of another shape than the model's, or an input that
            holds NaN or infinity (named by its id).
    """
    parts = [_element_parts(element, i) for i, element in enumerate(elements)]
    ids = np.concatenate([p[0] for p in parts])
    ids = _validation.entry_ids(ids, len(ids))
    expected = tuple(input_shape)
    for p in parts:
        shape = p[1].shape[1:]
        if not len(p[0]):
            continue
        if len(shape) != len(expected) or any(
            e is not None and e != s for e, s in zip(expected, shape, strict=False)
        ):
            raise ValueError(
                f"Every example's `x` must have the model's input shape {expected}. "
                f"Received: an example of shape {shape} (id {int(p[0][0])})"
            )
    x = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    y = np.concatenate([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]
    x = np.asarray(x, dtype=input_dtype)
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise ValueError(
                f"The inputs of {int(bad.sum())} example(s) hold NaN or infinite values (the "
                f"first: id {int(ids[np.argmax(bad)])}). A memory is not built from them."
            )
    return ids, x, y


@dataclasses.dataclass
class LoadedKeyModel:
    """What `KeyAndOutputModelHandler.load_model` returns: the model and its compiled function.

    Attributes:
        model: the base `keras.Model`.
        predict: `x -> (key layer output, model output)`, as `attach_memory` compiles it.
        input_shape: the model's input shape without the batch axis (None where free).
        input_dtype: the model's input dtype.
    """

    model: object
    predict: object
    input_shape: tuple
    input_dtype: str


def load_key_model(model_path, layer_name, compile_function=True):
    """Loads a `.keras` model and compiles `attach_memory`'s key-and-output function.

    Returns:
        `(model, key_tensor, output_tensor, predict)`; `predict` is None
        without `compile_function`.

    Raises:
        ValueError: a layer name the model does not have (the message lists
            the valid names), or a model with several inputs or outputs.
    """
    import keras

    from keras_resmem import attach

    model = keras.saving.load_model(model_path, compile=False)
    attach._check_model(model)
    if len(model.inputs) != 1:
        raise ValueError(
            "`keras_resmem.beam` needs a model with one input (each example's `x` is one "
            f"array). Received: model {model.name!r} with {len(model.inputs)} inputs"
        )
    key, output = attach._key_and_output(model, layer_name)
    predict = attach._predict_function(model, key, output) if compile_function else None
    return model, key, output, predict


class KeyAndOutputModelHandler(ModelHandler):
    """A `RunInference` handler: each batch's keys (layer `layer_name`) and model outputs.

    Loads the model from `model_path` with `keras.saving.load_model` once per
    worker (`RunInference` keeps it across bundles) and runs the function
    `attach_memory` runs. `RunInference` batches the elements with
    `beam.BatchElements`, `batch_size` examples a batch (a batch dict counts
    as its number of examples); the handler stacks them and predicts
    `batch_size` rows at a time.

    `run_inference` returns one `PredictionResult` per batch rather than per
    example, so that what follows is one Beam element per batch:
    `example={"ids": (b,), "y": (b, ...)}` and `inference={"keys": (b, d),
    "outputs": (b, c), "probabilities": bool}` (whether every output row is
    a softmax's, for `from_logits=None`), one row per example.

    Args:
        model_path: the base model's `.keras` file.
        layer_name: the key layer (as `attach_memory`'s `layer_name`).
        batch_size: examples per model call.

    Example:

    ```python
    from apache_beam.ml.inference.base import RunInference

    handler = KeyAndOutputModelHandler("base.keras", "pre_logits", batch_size=256)
    results = examples | RunInference(handler)  # examples: (id, x, y) tuples or batch dicts
    ```
    """

    def __init__(self, model_path, layer_name, *, batch_size=256):
        self._batch_size = _validation.positive_int("batch_size", batch_size)
        super().__init__(
            min_batch_size=self._batch_size,
            max_batch_size=self._batch_size,
            element_size_fn=example_count,
        )
        self._model_path = str(model_path)
        self._layer_name = layer_name

    def load_model(self):
        model, _, _, predict = load_key_model(self._model_path, self._layer_name)
        inputs = model.inputs[0]
        return LoadedKeyModel(
            model, predict, tuple(inputs.shape[1:]), np.dtype(str(inputs.dtype)).name
        )

    def run_inference(self, batch, model, inference_args=None):
        from keras_resmem import attach

        ids, x, y = stack_examples(batch, model.input_shape, model.input_dtype)
        if not len(ids):
            return []
        keys, outputs = [], []
        for start in range(0, len(x), self._batch_size):
            key, output = model.predict(x[start : start + self._batch_size])
            keys.append(key.numpy())
            outputs.append(output.numpy())
        keys = np.concatenate(keys) if len(keys) > 1 else keys[0]
        outputs = np.concatenate(outputs) if len(outputs) > 1 else outputs[0]
        if outputs.ndim != 2:
            raise ValueError(
                "`keras_resmem.beam` builds memories of models whose output is (batch, "
                f"num_outputs), one entry per example. Received outputs of shape {outputs.shape}"
            )
        keys = keys.reshape(len(keys), math.prod(keys.shape[1:]))
        inference = {
            "keys": keys,
            "outputs": outputs,
            "probabilities": attach._look_like_probabilities(outputs),
        }
        return [PredictionResult({"ids": ids, "y": y}, inference)]

    def get_num_bytes(self, batch):
        return sum(
            sum(np.asarray(part).nbytes for part in _element_parts(element, i))
            for i, element in enumerate(batch)
        )

    def get_metrics_namespace(self):
        return "keras_resmem"
