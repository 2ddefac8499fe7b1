"""`save_model`: `model.save`, written so that no crash loses the file it replaces."""

import os

from keras_resmem import _io
from keras_resmem.api_export import keras_resmem_export


@keras_resmem_export("keras_resmem.save_model")
def save_model(model, path, overwrite=True):
    """Saves `model` to a `.keras` file atomically.

    Keras's `model.save(path)` truncates `path` first, so a process killed
    while it writes destroys the old file. This writes to a temporary file
    beside `path`, flushes it to disk, and renames it onto `path`: at every
    moment `path` holds the old file or the new one, whole. A temporary file
    left by a killed process is removed by the next save to the same path.

    Args:
        model: any Keras model (a ResMem model saves its memory with it).
        path: the `.keras` file to write.
        overwrite: whether to replace an existing file.

    Raises:
        ValueError: `path` does not end in `.keras`.
        FileExistsError: `path` exists and `overwrite` is false.

    Example:

    >>> import keras, tempfile
    >>> import keras_resmem
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> path = tempfile.mkdtemp() + "/model.keras"
    >>> keras_resmem.save_model(model, path)
    >>> keras.saving.load_model(path).count_params()
    3
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"`path` must end in `.keras`. Received: path={path!r}")
    _io.refuse_existing(path, overwrite)
    _io.save_model(model, path)
