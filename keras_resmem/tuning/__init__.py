"""Cheap hyperparameter sweeps: neighbours searched once, reused for every setting.

`NeighborCache` does the caching and picks each method's best setting on
validation; `ResMemTuner` (which needs Keras Tuner, imported on first use)
runs Keras Tuner searches over it.
"""

from keras_resmem.tuning.neighbor_cache import Choice, NeighborCache
from keras_resmem.tuning.objectives import OBJECTIVES, constrained_tpr, trial_metrics


def __getattr__(name):
    # Keras Tuner is an optional dependency: imported on first use of the tuner.
    if name == "ResMemTuner":
        try:
            from keras_resmem.tuning.tuner import ResMemTuner
        except ImportError as e:
            if "keras_tuner" not in str(e):
                raise
            raise ImportError(
                "keras_resmem.tuning.ResMemTuner needs Keras Tuner: `pip install keras-tuner` "
                "(or `pip install 'keras-resmem[tuning]'`)."
            ) from e
        return ResMemTuner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "OBJECTIVES",
    "Choice",
    "NeighborCache",
    "ResMemTuner",
    "constrained_tpr",
    "trial_metrics",
]
