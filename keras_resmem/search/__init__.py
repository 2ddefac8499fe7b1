"""Nearest-neighbour search backends behind one interface (`SearchBackend`).

A backend answers one question, inside the TensorFlow graph: the ids of the
`k` memory keys nearest to each query under L2 distance. Each is its own
config object, passed to `ResidualMemory(search=...)` or `attach_memory`:

- `Exact()`: every key scored, in stock TensorFlow ops;
- `IVF(num_probes=...)`: an inverted-file index in stock TensorFlow ops
  (approximate; exported models run on stock TensorFlow Serving);
- `ScaNN(...)`: ScaNN's TensorFlow ops (approximate; exported models need a
  ScaNN-enabled server);
- `Auto()`: exact search, or IVF where a measured cost model over the
  memory's entries and key width says it searches at least twice as fast.

The strings `"exact"`, `"ivf"`, `"scann"` and `"auto"` name them with their
default options.
"""

import math

from keras_resmem.api_export import keras_resmem_export
from keras_resmem.search.base import (
    SearchBackend,
    known_options,
    l2_ranking_scores,
    smallest_k,
)
from keras_resmem.search.exact import Exact, ExactSearch
from keras_resmem.search.ivf import (
    IVF,
    IVFSearch,
    default_ivf_options,
    resolve_ivf_options,
    train_ivf,
)
from keras_resmem.search.scann import (
    SavedScannSearch,
    ScaNN,
    ScannSearch,
    _scann_ops,
    default_scann_options,
    resolve_scann_options,
    search_threads,
)
from keras_resmem.search.sharded import Sharded, ShardedSearch

# Version 0.1's rule, still used for layers saved by it with search="auto":
# exact below this many entries, IVF from there.
AUTO_APPROXIMATE_THRESHOLD = 200_000

# The cost model of `Auto`: IVF's search speed-up over exact search, for a
# batch of 256 queries and k=50, as `exp(c) * n**a * d**b` for `n` entries of
# `d`-dimensional keys. Fitted by least squares to the 17 timings of
# `python benchmarks/auto_crossover.py` (d = 16, 64, 256; n = 25k to 800k;
# docs/BENCHMARKS.md): speed-ups from 0.55 to 5.24, each within 0.91x-1.15x
# of the fit. Exact search's cost grows with `n * d`; IVF's gathers grow with
# `d` too, so the speed-up depends on both, roughly on `n / d`. IVF had
# higher recall than ScaNN's defaults at a similar speed on 1M real
# embeddings (benchmarks/ivf_search.py), and its SavedModels run on stock
# TensorFlow Serving.
AUTO_SPEEDUP_MODEL = {"a": 0.3435, "b": -0.3758, "c": -1.9598}
# `Auto` picks IVF where the model predicts at least this speed-up.
AUTO_MIN_SPEEDUP = 2.0


def predicted_ivf_speedup(memory_size, key_dim):
    """IVF's search speed-up over exact search predicted by `AUTO_SPEEDUP_MODEL`."""
    m = AUTO_SPEEDUP_MODEL
    return math.exp(m["c"] + m["a"] * math.log(memory_size) + m["b"] * math.log(key_dim))


@keras_resmem_export("keras_resmem.search.Auto")
class Auto(SearchBackend):
    """Exact search, or IVF where it is predicted to search `min_speedup` times faster.

    The prediction is a cost model measured on this library's backends
    (`AUTO_SPEEDUP_MODEL`, `benchmarks/auto_crossover.py`): IVF's speed-up
    grows with the number of entries and shrinks with the key width. With
    the default `min_speedup=2`, IVF is used from about 47,000 entries of
    16-d keys, 214,000 of 64-d keys, 974,000 of 256-d keys and 7 million of
    1568-d keys; below, exact search (perfect recall) is kept. The backend is
    chosen when the memory is first filled; `add_examples` does not change it.

    Args:
        threshold: if set, version 0.1's rule instead: IVF from this many
            entries, whatever the key width.
        exact: the `Exact` backend to use (default options if `None`).
        ivf: the `IVF` backend to use (default options if `None`).
        min_speedup: the predicted IVF speed-up from which IVF is used.

    Example:

    >>> import keras_resmem
    >>> auto = keras_resmem.search.Auto()
    >>> auto.resolve(100_000, 16).name, auto.resolve(100_000, 256).name
    ('ivf', 'exact')
    """

    name = "auto"

    def __init__(self, threshold=None, exact=None, ivf=None, min_speedup=AUTO_MIN_SPEEDUP):
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1
        ):
            raise ValueError(
                f"`threshold` must be a positive integer or None. Received: threshold={threshold!r}"
            )
        if isinstance(min_speedup, bool) or not (
            isinstance(min_speedup, int | float) and min_speedup > 0
        ):
            raise ValueError(
                f"`min_speedup` must be a positive number. Received: min_speedup={min_speedup!r}"
            )
        self.threshold = threshold
        self.min_speedup = float(min_speedup)
        self.exact = _deserialize(exact) or Exact()
        self.ivf = _deserialize(ivf) or IVF()

    def get_config(self):
        import keras

        return {
            "threshold": self.threshold,
            "min_speedup": self.min_speedup,
            "exact": keras.saving.serialize_keras_object(self.exact),
            "ivf": keras.saving.serialize_keras_object(self.ivf),
        }

    def resolve(self, memory_size, key_dim):
        if self.threshold is not None:
            use_ivf = memory_size >= self.threshold
        else:
            use_ivf = predicted_ivf_speedup(memory_size, key_dim) >= self.min_speedup
        backend = self.ivf if use_ivf else self.exact
        return backend.clone().resolve(memory_size, key_dim)

    def search(self, queries, k):
        raise RuntimeError("`Auto` resolves to a concrete backend before it searches.")


_BY_NAME = {"auto": Auto, "exact": Exact, "ivf": IVF, "scann": ScaNN}
BACKENDS = tuple(_BY_NAME)
# The built-in backends whose graph holds only stock TensorFlow ops.
PORTABLE_BACKENDS = tuple(name for name, cls in _BY_NAME.items() if cls.portable and name != "auto")


def get(search, *, scann_options=None, ivf_options=None, chunk_size=None):
    """A new, unbuilt backend from `search`: a name, a `SearchBackend`, or its serialized config.

    `scann_options`, `ivf_options` and `chunk_size` are the options of
    version 0.1, given beside a name; they are still accepted.

    Raises:
        ValueError: an unknown name, or options that do not fit it.
    """
    import keras

    legacy = {"scann": scann_options, "ivf": ivf_options}
    for name, options in legacy.items():
        if options is not None and not isinstance(options, dict):
            raise ValueError(
                f"`{name}_options` must be a dict. Received: {name}_options={options!r}"
            )
    if isinstance(search, dict):
        search = keras.saving.deserialize_keras_object(search)
    if isinstance(search, SearchBackend):
        if any(legacy.values()):
            raise ValueError(
                "`scann_options` and `ivf_options` go with a backend name; give the options to "
                f"the backend instead. Received: search={search!r}"
            )
        return search.clone()
    if not isinstance(search, str) or search not in _BY_NAME:
        raise ValueError(
            f"`search` must be one of {BACKENDS} or a `keras_resmem.search.SearchBackend` "
            f"such as `keras_resmem.search.IVF(num_probes=8)`. Received: search={search!r}"
        )
    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}
    if search == "scann":
        return ScaNN(**_known_options("ScaNN", ScaNN, scann_options, "scann_options"))
    ivf = IVF(**_known_options("IVF", IVF, ivf_options, "ivf_options"), **chunk)
    if search == "ivf":
        return ivf
    if search == "exact":
        return Exact(**chunk)
    return Auto(exact=Exact(**chunk), ivf=ivf)


def _known_options(label, cls, options, argument):
    import inspect

    valid = set(inspect.signature(cls).parameters) - {"chunk_size", "leaves_to_search"}
    return known_options(label, options, valid, argument)


def _deserialize(backend):
    import keras

    if isinstance(backend, dict):
        backend = keras.saving.deserialize_keras_object(backend)
    if backend is not None and not isinstance(backend, SearchBackend):
        raise ValueError(f"Expected a `SearchBackend`. Received: {backend!r}")
    return backend


def resolve_backend(search, memory_size, key_dim):
    """The name of the backend `search` uses for a memory of this shape."""
    return get(search).resolve(memory_size, key_dim).name


__all__ = [
    "AUTO_APPROXIMATE_THRESHOLD",
    "AUTO_MIN_SPEEDUP",
    "AUTO_SPEEDUP_MODEL",
    "Auto",
    "BACKENDS",
    "Exact",
    "ExactSearch",
    "IVF",
    "IVFSearch",
    "PORTABLE_BACKENDS",
    "SavedScannSearch",
    "ScaNN",
    "ScannSearch",
    "SearchBackend",
    "Sharded",
    "ShardedSearch",
    "_scann_ops",
    "default_ivf_options",
    "default_scann_options",
    "get",
    "l2_ranking_scores",
    "predicted_ivf_speedup",
    "resolve_backend",
    "resolve_ivf_options",
    "resolve_scann_options",
    "search_threads",
    "smallest_k",
    "train_ivf",
]
