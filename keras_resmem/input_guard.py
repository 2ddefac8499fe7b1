"""`NonFiniteInputGuard`: NaN outputs for examples whose inputs are not finite."""

import keras
import tensorflow as tf

from keras_resmem.api_export import keras_resmem_export


@keras_resmem_export("keras_resmem.NonFiniteInputGuard")
class NonFiniteInputGuard(keras.layers.Layer):
    """Sets an example's outputs to NaN when any of its float inputs holds NaN or infinity.

    A network can map such an input to finite values (`tanh` of infinity is
    1): its output would then look like a confident answer. `attach_memory`
    puts this layer between the network's output and the memory, so that
    such an example gets NaN scores, and `class_ids = -1` from an exported
    SavedModel, while the other examples of its batch are untouched.

    Call arguments:
        inputs: a list `[*model_inputs, output]`; inputs that are not
            floating point are not checked. `output` has the inputs' batch
            dimension first, and may have more leading dimensions (time).
    """

    def call(self, inputs):
        *model_inputs, output = inputs
        valid = None
        for x in model_inputs:
            if not x.dtype.is_floating:
                continue
            finite = tf.reduce_all(tf.reshape(tf.math.is_finite(x), [tf.shape(x)[0], -1]), axis=1)
            valid = finite if valid is None else tf.logical_and(valid, finite)
        if valid is None:
            return output
        valid = tf.reshape(valid, tf.concat([[-1], tf.ones([output.shape.rank - 1], tf.int32)], 0))
        return tf.where(valid, output, tf.constant(float("nan"), output.dtype))

    def compute_output_spec(self, inputs):
        output = inputs[-1]
        return keras.KerasTensor(output.shape, dtype=output.dtype)
