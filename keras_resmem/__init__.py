"""keras_resmem: ResMem ("Learn what you can and memorize the rest") for Keras 3.

A trained network plus a nearest-neighbour memory of its training residuals.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras_resmem import datasets, tuning  # noqa: E402
from keras_resmem.attach import attach_memory  # noqa: E402
from keras_resmem.diagnostics import Comparison, compare  # noqa: E402
from keras_resmem.residual_memory import ResidualMemory  # noqa: E402
from keras_resmem.version import __version__  # noqa: E402

__all__ = [
    "Comparison",
    "ResidualMemory",
    "__version__",
    "attach_memory",
    "compare",
    "datasets",
    "tuning",
]
