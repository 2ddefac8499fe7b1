"""A ResMem model's memory over its life: fill it, add examples, forget them by id."""

import weakref

import keras
import numpy as np

from keras_resmem import _validation
from keras_resmem.api_export import keras_resmem_export
from keras_resmem.attach import _fill_memory, _predict_function
from keras_resmem.residual_memory import ResidualMemory


def find_memory(model):
    """The one `ResidualMemory` layer of `model`; a clear error otherwise."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a Keras model holding a ResidualMemory layer (e.g. from "
            f"`keras_resmem.attach_memory`). Received: model of type {type(model).__name__}"
        )
    memories = [layer for layer in model.layers if isinstance(layer, ResidualMemory)]
    if len(memories) != 1:
        raise ValueError(
            "`model` must hold exactly one ResidualMemory layer (as `attach_memory` "
            f"builds it). Received: model {model.name!r} with {len(memories)}"
        )
    return memories[0]


# The compiled key-and-output function of each ResMem model, traced once.
_PREDICT = weakref.WeakKeyDictionary()


def _features(model, memory):
    """`(predict, output)`: the compiled function from `model`'s inputs to the memory's
    inputs (the key layer's output and the network's), and the network's output tensor."""
    embedding, output = memory.input
    if model not in _PREDICT:
        _PREDICT[model] = _predict_function(model, embedding, output)
    return _PREDICT[model], output


def _write(model, data, ids, batch_size, verbose, append):
    memory = find_memory(model)
    batch_size = _validation.positive_int("batch_size", batch_size)
    predict, output = _features(model, memory)
    _fill_memory(
        memory,
        predict,
        data,
        model,
        output,
        batch_size=batch_size,
        verbose=verbose,
        ids=ids,
        append=append,
    )


@keras_resmem_export("keras_resmem.memorize")
def memorize(model, data, ids=None, *, batch_size=256, verbose=1):
    """Fills the memory of a ResMem model from `data`, replacing what it held.

    Runs the network once over `data` (see `keras_resmem.attach_memory` for
    its forms) and stores one entry per example. Compiled models see the new
    memory at once.

    Args:
        model: a model from `keras_resmem.attach_memory` (or loaded from one
            saved), with or without a memory.
        data: the training data, as `attach_memory` takes it.
        ids: for array `data`: the examples' int64 ids, unique. Default:
            positions `0 .. n-1`. A dataset or dict carries them under `"ids"`.
        batch_size: the batch size for arrays and unbatched datasets.
        verbose: 1 shows a progress bar.

    Example:

    >>> import keras, numpy as np
    >>> import keras_resmem
    >>> inputs = keras.Input((4,))
    >>> h = keras.layers.Dense(8, activation="relu", name="pre_logits")(inputs)
    >>> base = keras.Model(inputs, keras.layers.Dense(3)(h))
    >>> model = keras_resmem.attach_memory(base, "pre_logits", k=1, sigma=0.01)  # empty
    >>> x = np.random.default_rng(0).normal(size=(100, 4)).astype("float32")
    >>> y = np.arange(100) % 3
    >>> keras_resmem.memorize(model, (x, y), ids=np.arange(1000, 1100), verbose=0)
    >>> keras_resmem.add_examples(model, (x[:5] + 10, y[:5]), verbose=0)  # ids 1100..1104
    >>> keras_resmem.forget(model, [1000, 1001])
    >>> model.get_layer("residual_memory").memory_size
    103
    """
    _write(model, data, ids, batch_size, verbose, append=False)


@keras_resmem_export("keras_resmem.add_examples")
def add_examples(model, data, ids=None, *, batch_size=256, verbose=1):
    """Adds examples to the memory of a ResMem model; its other entries are untouched.

    The network runs over the new examples only. The search index is
    updated in place where its backend can: exact search appends; IVF
    assigns the new entries to its partitions, and trains them again only
    when they grow unbalanced (see `keras_resmem.search.IVF`); ScaNN builds
    its index again from the stored keys. Compiled models see the new
    entries at once.

    Args:
        model: a model from `keras_resmem.attach_memory`, whose memory holds entries.
        data: the new examples, as `attach_memory` takes them.
        ids: for array `data`: their int64 ids, unique and new to the
            memory. Default: counting up from one past the largest id held.
        batch_size: the batch size for arrays and unbatched datasets.
        verbose: 1 shows a progress bar.

    Raises:
        ValueError: an empty memory (use `memorize`), an id the memory
            already holds or one given twice, or data that does not fit.
    """
    memory = find_memory(model)
    memory._check_ready()
    _write(model, data, ids, batch_size, verbose, append=True)


@keras_resmem_export("keras_resmem.forget")
def forget(model, ids, *, verbose=0):
    """Removes the entries with these ids from the memory of a ResMem model.

    Nothing of the forgotten examples stays in the memory's variables or its
    index (an IVF partition that held one has its centroid recomputed from
    the entries it keeps; a ScaNN index is built again), so nothing of them
    is in a `.keras` file or SavedModel written afterwards. Files written
    before are not changed.

    Args:
        model: a model from `keras_resmem.attach_memory`.
        ids: the ids of the entries to forget (unique, each held by the memory).
        verbose: 1 shows a progress bar if the index is built again.

    Raises:
        ValueError: an id the memory does not hold, an id given twice, or
            fewer than `k` entries left.
    """
    find_memory(model).forget(np.asarray(ids), verbose=verbose)
