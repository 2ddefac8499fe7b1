"""`ResidualMemoryCallback`: watch ResMem's validation accuracy while the network trains."""

import keras
import numpy as np

from keras_resmem import _validation
from keras_resmem.api_export import keras_resmem_export
from keras_resmem.attach import (
    _as_dataset,
    _class_ids,
    _fill_memory,
    _key_and_output,
    _new_memory,
    _predict_function,
)
from keras_resmem.diagnostics import compare


@keras_resmem_export("keras_resmem.callbacks.ResidualMemoryCallback")
class ResidualMemoryCallback(keras.callbacks.Callback):
    """Rebuilds a memory of the training residuals at the end of epochs, and scores it.

    Every `every` epochs of `model.fit`, the memory is built from
    `train_data` with the weights of that epoch (as `keras_resmem.attach_memory`
    would build it), and the network and ResMem are scored on
    `validation_data`. Classification adds to the epoch's logs (and so to
    the `History`, and to a `keras.callbacks.TensorBoard` listed after this
    callback): `val_resmem_accuracy`, `val_resmem_gain`, `val_resmem_tpr`,
    `val_resmem_fpr` (see `keras_resmem.compare`). Regression adds
    `val_resmem_mse` and `val_resmem_mae`.

    Args:
        layer_name: the key layer, as for `attach_memory`.
        train_data: the data the memory is built from, in any form
            `attach_memory` takes.
        validation_data: `(x, y)` arrays or a `tf.data.Dataset` of `(x, y)`,
            held out of `train_data`.
        every: build and score the memory every this many epochs.
        batch_size: for arrays and unbatched datasets.
        **settings: the memory's settings, as `attach_memory` takes them
            (`k`, `sigma`, `temperature`, `method`, `task`, `search`, ...).

    Example:

    >>> import keras, numpy as np
    >>> import keras_resmem
    >>> inputs = keras.Input((4,))
    >>> h = keras.layers.Dense(8, activation="relu", name="pre_logits")(inputs)
    >>> base = keras.Model(inputs, keras.layers.Dense(3)(h))
    >>> base.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(300, 4)).astype("float32"), rng.integers(0, 3, 300)
    >>> watch = keras_resmem.callbacks.ResidualMemoryCallback(
    ...     "pre_logits", (x[:200], y[:200]), (x[200:], y[200:]), k=10)
    >>> history = base.fit(x[:200], y[:200], epochs=2, callbacks=[watch], verbose=0)
    >>> len(history.history["val_resmem_accuracy"])
    2
    """

    def __init__(
        self, layer_name, train_data, validation_data, *, every=1, batch_size=256, **settings
    ):
        super().__init__()
        self.layer_name = layer_name
        self.train_data = train_data
        self.validation_set = validation_data
        self.every = _validation.positive_int("every", every)
        self.batch_size = _validation.positive_int("batch_size", batch_size)
        self.settings = {"task": "classification", "from_logits": None, **settings}
        # Bad settings fail now, not at the end of the first epoch.
        _validation.one_of("task", self.settings["task"], ("classification", "regression"))
        self._predict = None

    def on_train_begin(self, logs=None):
        # The graph does not change while the network trains, its weights do.
        self._embedding, self._output = _key_and_output(self.model, self.layer_name)
        self._predict = _predict_function(self.model, self._embedding, self._output)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        memory = _new_memory(self._output, **self.settings)
        _fill_memory(
            memory,
            self._predict,
            self.train_data,
            self.model,
            self._output,
            batch_size=self.batch_size,
            verbose=0,
        )
        y, deepnet, resmem = self._score(memory)
        if logs is None:
            return
        if memory.task == "regression":
            logs["val_resmem_mse"] = float(np.mean((resmem - y) ** 2))
            logs["val_resmem_mae"] = float(np.mean(np.abs(resmem - y)))
            return
        c = compare(y, deepnet, resmem)
        logs.update(
            val_resmem_accuracy=c.resmem_accuracy,
            val_resmem_gain=c.gain,
            val_resmem_tpr=c.tpr,
            val_resmem_fpr=c.fpr,
        )

    def _score(self, memory):
        """Labels, DeepNet's and ResMem's outputs on the validation data, flattened."""
        data = _as_dataset(self.validation_set, self.batch_size, len(self.model.inputs[0].shape))
        ys, deepnets, resmems = [], [], []
        for batch in data:
            emb, out = self._predict(batch[0])
            ys.append(np.asarray(batch[1]))
            deepnets.append(out.numpy())
            resmems.append(memory([emb, out]).numpy())
        c = memory.num_outputs
        deepnet = np.concatenate(deepnets).reshape(-1, c)
        resmem = np.concatenate(resmems).reshape(-1, c)
        y = np.concatenate(ys)
        if memory.task == "regression":
            return y.reshape(-1, c), deepnet, resmem
        return _class_ids(y.reshape(len(deepnet), -1), c, 0).reshape(-1), deepnet, resmem
