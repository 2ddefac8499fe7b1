"""keras_resmem: ResMem ("Learn what you can and memorize the rest") for Keras 3.

A trained network plus a nearest-neighbour memory of its training residuals.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras_resmem runs on Keras's TensorFlow backend (ScaNN's search ops are TensorFlow "
        f"ops), but Keras was loaded with the {keras.backend.backend()!r} backend. Set "
        "KERAS_BACKEND=tensorflow before importing keras."
    )

from keras_resmem import (  # noqa: E402
    callbacks,
    datasets,
    diagnostics,
    projection,
    search,
    sharded,
    tuning,
)
from keras_resmem.attach import attach_memory  # noqa: E402
from keras_resmem.diagnostics import Comparison, compare  # noqa: E402
from keras_resmem.export import export_saved_model  # noqa: E402
from keras_resmem.input_guard import NonFiniteInputGuard  # noqa: E402
from keras_resmem.lifecycle import add_examples, forget, memorize  # noqa: E402
from keras_resmem.residual_memory import ResidualMemory  # noqa: E402
from keras_resmem.saving import save_model  # noqa: E402
from keras_resmem.version import __version__  # noqa: E402

__all__ = [
    "Comparison",
    "NonFiniteInputGuard",
    "ResidualMemory",
    "__version__",
    "add_examples",
    "attach_memory",
    "callbacks",
    "compare",
    "datasets",
    "diagnostics",
    "export_saved_model",
    "forget",
    "memorize",
    "projection",
    "save_model",
    "search",
    "sharded",
    "tuning",
]
