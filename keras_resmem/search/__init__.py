"""Nearest-neighbour search backends behind one interface (`SearchBackend`).

A backend answers one question, inside the TensorFlow graph: the ids of the
`k` memory keys nearest to each query under L2 distance. Each is its own
config object, passed to `ResidualMemory(search=...)` or `attach_memory`:

- `Exact()`: every key scored, in stock TensorFlow ops;
- `IVF(num_probes=...)`: an inverted-file index in stock TensorFlow ops
  (approximate; exported models run on stock TensorFlow Serving);
- `ScaNN(...)`: ScaNN's TensorFlow ops (approximate; exported models need a
  ScaNN-enabled server);
- `Auto()`: exact below `threshold` entries, IVF from there.

The strings `"exact"`, `"ivf"`, `"scann"` and `"auto"` name them with their
default options.
"""

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

# Below this many entries exact search is fast enough (a 64-d memory of this
# size is ~13 MFLOP per query) and has perfect recall. From it, "auto" picks
# IVF: on 1M real embeddings it had higher recall than ScaNN's defaults at a
# similar speed (benchmarks/ivf_search.py), and its SavedModels run on stock
# TensorFlow Serving.
AUTO_APPROXIMATE_THRESHOLD = 200_000


@keras_resmem_export("keras_resmem.search.Auto")
class Auto(SearchBackend):
    """`exact` below `threshold` memory entries, `ivf` from there.

    Args:
        threshold: the memory size from which `ivf` is used.
        exact: the `Exact` backend to use (default options if `None`).
        ivf: the `IVF` backend to use (default options if `None`).
    """

    name = "auto"

    def __init__(self, threshold=AUTO_APPROXIMATE_THRESHOLD, exact=None, ivf=None):
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError(
                f"`threshold` must be a positive integer. Received: threshold={threshold!r}"
            )
        self.threshold = threshold
        self.exact = _deserialize(exact) or Exact()
        self.ivf = _deserialize(ivf) or IVF()

    def get_config(self):
        import keras

        return {
            "threshold": self.threshold,
            "exact": keras.saving.serialize_keras_object(self.exact),
            "ivf": keras.saving.serialize_keras_object(self.ivf),
        }

    def resolve(self, memory_size, key_dim):
        backend = self.ivf if memory_size >= self.threshold else self.exact
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


def resolve_backend(search, memory_size):
    """The name of the backend `search` uses for a memory of `memory_size` entries."""
    return get(search).resolve(memory_size, 1).name


__all__ = [
    "AUTO_APPROXIMATE_THRESHOLD",
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
    "_scann_ops",
    "default_ivf_options",
    "default_scann_options",
    "get",
    "l2_ranking_scores",
    "resolve_backend",
    "resolve_ivf_options",
    "resolve_scann_options",
    "search_threads",
    "smallest_k",
    "train_ivf",
]
