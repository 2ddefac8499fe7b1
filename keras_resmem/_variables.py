"""Per-entry variables whose number of rows can change: a memory grows and shrinks in place."""

import keras
import tensorflow as tf


class GrowableVariable(keras.Variable):
    """A Keras variable whose first dimension (the memory's entries) can change.

    The TensorFlow variable underneath has shape `(None, ...)`, so a graph
    that reads it (a compiled `predict`, an exported SavedModel) reads
    whatever it holds now: adding or forgetting entries reaches compiled
    models with no retracing. `assign` takes a value with any number of rows
    and the same trailing shape; the Keras `shape` follows the value.
    """

    def _initialize(self, value):
        self._value = tf.Variable(
            value,
            dtype=self._dtype,
            trainable=False,
            name=self.name,
            shape=tf.TensorShape([None, *self._shape[1:]]),
        )

    def assign(self, value):
        value = self._convert_to_tensor(value, dtype=self._dtype)
        if tuple(value.shape[1:]) != tuple(self._shape[1:]):
            raise ValueError(
                f"Variable {self.path!r} holds rows of shape {tuple(self._shape[1:])}. "
                f"Received: value.shape={tuple(value.shape)}"
            )
        self._direct_assign(value)
        self._shape = tuple(int(d) for d in value.shape)
        return value


def add_weight(layer, name, shape, dtype="float32", initializer="zeros", growable=False):
    """`layer.add_weight` for a non-trainable variable, growable in its first dimension if asked.

    Works after the layer is built too (a memory attached empty creates its
    index's variables when it is first filled).
    """
    locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        if not growable:
            return layer.add_weight(
                name=name, shape=shape, dtype=dtype, initializer=initializer, trainable=False
            )
        with keras.name_scope(layer.name, caller=layer):
            variable = GrowableVariable(
                initializer=keras.initializers.get(initializer),
                shape=shape,
                dtype=dtype,
                trainable=False,
                name=name,
            )
        layer._track_variable(variable)
        return variable
    finally:
        if locked:
            layer._tracker.lock()
