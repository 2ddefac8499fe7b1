"""The `ResidualMemory` layer: a kNN memory of a network's training residuals."""

import functools
import math

import keras
import numpy as np
import tensorflow as tf

from keras_resmem import _integrity, _validation, _variables
from keras_resmem import memory_writer as writer_lib
from keras_resmem import projection as projection_lib
from keras_resmem import residuals as residuals_lib
from keras_resmem import search as search_lib
from keras_resmem.api_export import keras_resmem_export

# Hyperparameters, held as scalar variables once the layer is built, so that
# a change reaches already-compiled models.
_HPARAM_DTYPES = {
    "k": "int32",
    # float64, so that get_config() gives back exactly the value set.
    "sigma": "float64",
    "temperature": "float64",
    "method": "int32",
    "knn_weight": "float64",
}
# Variables a file may lack because they were added after it was saved: they
# keep the values of the layer's config.
_ADDED_LATER = ("method", "knn_weight")
# Per-entry ids, added in 0.2; a file without them numbers its entries by position.
_IDS = "memory_ids"


@keras_resmem_export("keras_resmem.ResidualMemory")
class ResidualMemory(keras.layers.Layer):
    """Adds the residuals of a network's nearest training examples to its output.

    ResMem (Yang et al., 2023, "Learn what you can and memorize the rest"). The
    layer stores, for every training example `i`, an embedding `z_i` (an
    intermediate layer's output), the network's output on it, and its target.
    Called on `[embeddings, scores]` for a batch, it finds the `k` training
    embeddings nearest to each query under L2 distance `d_i`, weights them by
    `softmax(-d_i / sigma)` over those `k`, and returns

    - classification: `softmax(logits / T) + sum_i w_i (onehot(y_i) - softmax(logits_i / T))`;
    - regression: `f(x) + sum_i w_i (y_i - f(x_i))`.

    The same neighbours also give the two baselines ResMem should beat, so
    that one memory can answer "is it worth it on my model?" and ship
    whichever method wins on validation (`method`):

    - `"knn"`: a kNN on the labels, `sum_i w_i onehot(y_i)` (regression:
      `sum_i w_i y_i`); the network's output is not used;
    - `"interpolation"`: kNN-LM-style (Khandelwal et al., 2020),
      `(1 - knn_weight) softmax(logits / T) + knn_weight * sum_i w_i onehot(y_i)`
      (regression: `(1 - knn_weight) f(x) + knn_weight * sum_i w_i y_i`).

    Residuals are computed from the stored outputs when used, so `k`, `sigma`,
    `temperature`, `method` and `knn_weight` can be changed at any time (they
    are variables: a change reaches already-compiled models), without running
    the network again.

    Outputs as wide as a vocabulary (language models) are too big to store
    whole for millions of entries. With `sparse_residuals=m` the layer stores
    only the `m` largest-magnitude entries of each residual, in float16, and
    counts the rest as zero (the paper keeps 128 of 32,128). The residuals are
    then computed once, when the memory is built, so `temperature` is fixed
    from then on; `k` and `sigma` still change freely.

    Inputs may be sequences: embeddings `(batch, time, dim)` and scores
    `(batch, time, vocab)`. Every position is a query, searched in the same
    memory.

    The layer computes in float32 under any global dtype policy (a
    `mixed_float16` network's outputs are cast), like Keras's own
    precision-sensitive layers.

    Most users get this layer from `keras_resmem.attach_memory`, which runs the
    network over the training data and fills the memory.

    Args:
        k: the number of neighbours whose residuals are combined.
        sigma: the distance scale of the weights `exp(-d / sigma)`.
        temperature: `T`, the temperature of the network's softmax (classification).
        method: how the neighbours are combined with the network:
            `"resmem"` (the paper), or one of the baselines `"knn"` (kNN on
            labels) and `"interpolation"` (kNN-LM-style).
        knn_weight: `"interpolation"` only: `lambda` in `[0, 1]`, the weight
            of the kNN on labels.
        task: `"classification"` or `"regression"`.
        from_logits: classification only: whether `scores` are logits (`True`)
            or softmax probabilities (`False`).
        search: the neighbour search backend: a `keras_resmem.search`
            backend such as `keras_resmem.search.IVF(num_probes=8)`, or a
            name with default options: `"exact"` (stock TensorFlow ops),
            `"ivf"` (approximate, stock TensorFlow ops: runs on stock
            TensorFlow Serving), `"scann"` (approximate, ScaNN's custom ops),
            or `"auto"` (exact search, or IVF where a measured cost model
            predicts it twice as fast: `keras_resmem.search.Auto`).
        sparse_residuals: `None` (store the network's outputs, dense), or
            `m`, the number of largest-magnitude residual entries stored per
            memory entry (classification only).
        key_projection: `None` (store the keys as they are), or a
            `keras_resmem.projection.PCA` (an int `dim` is short for
            `PCA(dim)`): the keys' top principal components, fitted when the
            memory is filled; keys and queries are projected onto them, so
            the memory stores and searches `dim` features per key.
        memory_size, key_dim, num_outputs: the memory's shape. Set by
            `memorize` (and changed by `add_examples` and `forget`); given
            only when re-creating a layer from its config. `key_dim` is the
            width of the embeddings, before any `key_projection`.
        chunk_size, scann_options, ivf_options: the options of version 0.1,
            still accepted beside a `search` name: exact search's chunk
            size, and dicts of `keras_resmem.search.ScaNN` or
            `keras_resmem.search.IVF` arguments.
        **kwargs: base layer keyword arguments, such as `name`.

    Call arguments:
        inputs: a list `[embeddings, scores]`: `scores` is the network's
            output, `(batch, num_outputs)` or `(batch, time, num_outputs)`;
            `embeddings` has the same leading dimensions, and the rest are
            flattened to `key_dim`.
        return_neighbors: if `True`, also return the neighbours' int64 ids
            (see `memorize`) and their weights, each `(batch, k)` (or
            `(batch, time, k)`), nearest first.

    Returns:
        The ResMem prediction, shaped like `scores`; with `return_neighbors`,
        a tuple `(prediction, neighbor_ids, neighbor_weights)`.

    Example:

    >>> import numpy as np
    >>> import keras_resmem
    >>> memory = keras_resmem.ResidualMemory(k=1, sigma=0.1)
    >>> memory.memorize(
    ...     embeddings=np.array([[0.0, 0.0], [1.0, 1.0]]),
    ...     scores=np.array([[2.0, 0.0], [2.0, 0.0]]),  # logits: class 0 twice
    ...     targets=np.array([0, 1]),
    ... )
    >>> out = memory([np.array([[0.9, 1.1]]), np.array([[2.0, 0.0]])])
    >>> out.numpy().round(3)  # the neighbour's label, exactly
    array([[0., 1.]], dtype=float32)
    """

    def __init__(
        self,
        k=50,
        sigma=1.0,
        temperature=1.0,
        *,
        method="resmem",
        knn_weight=0.5,
        task="classification",
        from_logits=True,
        search="auto",
        sparse_residuals=None,
        key_projection=None,
        memory_size=None,
        key_dim=None,
        num_outputs=None,
        chunk_size=None,
        scann_options=None,
        ivf_options=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if self.dtype_policy.compute_dtype != "float32":
            raise ValueError(
                "ResidualMemory computes in float32 (its distances and residuals need the "
                "precision); leave its `dtype` unset. Received: "
                f"dtype={self.dtype_policy.name!r}"
            )
        self.task = _validation.one_of("task", task, residuals_lib.TASKS)
        self.from_logits = _validation.boolean("from_logits", from_logits)
        shape = {"memory_size": memory_size, "key_dim": key_dim, "num_outputs": num_outputs}
        for name, value in shape.items():
            setattr(self, name, None if value is None else _validation.positive_int(name, value))
        if sparse_residuals is not None:
            sparse_residuals = _validation.positive_int("sparse_residuals", sparse_residuals)
            if task != "classification":
                raise ValueError(
                    "`sparse_residuals` applies to classification only; regression residuals "
                    f"are stored whole. Received: sparse_residuals={sparse_residuals}, "
                    f"task={task!r}"
                )
            if num_outputs is not None and sparse_residuals > num_outputs:
                raise ValueError(
                    f"`sparse_residuals` must be at most num_outputs={num_outputs}. "
                    f"Received: sparse_residuals={sparse_residuals}"
                )
        self.sparse_residuals = sparse_residuals
        self._projection = projection_lib.get(key_projection)
        projection = self._projection
        if projection is not None and key_dim is not None and projection.dim > key_dim:
            raise ValueError(
                f"`key_projection` keeps dim={self._projection.dim} components, more than "
                f"key_dim={key_dim}. Received: key_projection={self._projection!r}"
            )
        if search == "auto" and memory_size is not None:
            # A config saved by version 0.1 (later versions save the backend
            # in use): resolve it by 0.1's rule, as it was when saved.
            search = search_lib.Auto(threshold=search_lib.AUTO_APPROXIMATE_THRESHOLD)
        # Unknown names and bad values fail now, not after a pass over the data.
        self._search = search_lib.get(
            search, scann_options=scann_options, ivf_options=ivf_options, chunk_size=chunk_size
        )
        self._backend = None
        self._hparam_vars = None
        self._entry_vars = None
        self._filling = False
        self._fill_failed = False
        self._share_state_of = None
        # The buffers the entry variables hold the first rows of, with spare
        # rows after them (see `_append`).
        self._bases = {}
        # Through the setters themselves: TensorFlow's attribute tracking skips
        # `self.x = value` when `self.x is value`, and an unset value reads as
        # None, so `sigma=None` would never be checked.
        for name, value in (
            ("k", k),
            ("sigma", sigma),
            ("temperature", temperature),
            ("method", method),
            ("knn_weight", knn_weight),
        ):
            getattr(type(self), name).fset(self, value)
        self.trainable = False

    # Hyperparameters: Python values until built, then variables. Read
    # inside a `tf.function`, a built layer's are tensors.

    def _get_hparam(self, name):
        if self._hparam_vars is None:
            # None while __init__ runs (TensorFlow's tracking reads attributes first).
            return self.__dict__.get(f"_{name}_value")
        variable = self._hparam_vars[name]
        if not tf.executing_eagerly():
            return tf.convert_to_tensor(variable)
        return variable.numpy().item()

    def _set_hparam(self, name, value):
        self.__dict__[f"_{name}_value"] = value
        if self._hparam_vars is not None:
            self._hparam_vars[name].assign(value)

    @property
    def k(self):
        """The number of neighbours combined."""
        return self._get_hparam("k")

    @k.setter
    def k(self, value):
        self._set_hparam("k", _validation.k_within(value, self.memory_size or None))

    @property
    def sigma(self):
        """The distance scale of the neighbour weights."""
        return self._get_hparam("sigma")

    @sigma.setter
    def sigma(self, value):
        self._set_hparam("sigma", _validation.positive_float("sigma", value))

    @property
    def temperature(self):
        """The softmax temperature `T`."""
        return self._get_hparam("temperature")

    @temperature.setter
    def temperature(self, value):
        value = _validation.positive_float("temperature", value)
        if self.sparse_residuals is not None and self._hparam_vars is not None:
            if value != self.temperature:
                raise ValueError(
                    "The residuals of a sparse memory are computed with the temperature when "
                    f"it is built (temperature={self.temperature}); build it again "
                    "(`memorize` or `keras_resmem.attach_memory`) to use another. "
                    f"Received: temperature={value}"
                )
            return
        self._set_hparam("temperature", value)

    @property
    def method(self):
        """How the neighbours are combined: `"resmem"`, `"knn"` or `"interpolation"`."""
        value = self._get_hparam("method")
        if value is None or isinstance(value, tf.Tensor):
            return value
        return residuals_lib.METHODS[int(value)]

    @method.setter
    def method(self, value):
        value = _validation.one_of("method", value, residuals_lib.METHODS)
        self._set_hparam("method", residuals_lib.METHODS.index(value))

    @property
    def knn_weight(self):
        """`"interpolation"` only: the weight `lambda` of the kNN on labels."""
        return self._get_hparam("knn_weight")

    @knn_weight.setter
    def knn_weight(self, value):
        self._set_hparam("knn_weight", _validation.unit_float("knn_weight", value))

    # The search backend.

    @property
    def search(self):
        """The search backend (a `keras_resmem.search.SearchBackend`)."""
        return self._backend or self._search

    @property
    def search_backend(self):
        """The name of the backend in use (`"auto"` resolved), or None before the memory."""
        if self._backend is not None:
            return self._backend.name
        if self.memory_size is None:
            return None
        return self._search.clone().resolve(self.memory_size, self.stored_key_dim or 1).name

    @property
    def search_knobs(self):
        """The backend's settings that can change at any time, by name (IVF: `num_probes`)."""
        return {name: self.search.get_knob(name) for name in self.search.knobs}

    def set_search_knob(self, name, value):
        """Changes one of `search_knobs`; it reaches compiled and exported models too."""
        self.search.set_knob(name, value)

    @property
    def num_probes(self):
        """IVF search only: the number of partitions probed per query (None otherwise).

        More probes find more of the true neighbours and cost more time. Can
        be changed at any time, like `k`.
        """
        return self.search_knobs.get("num_probes")

    @num_probes.setter
    def num_probes(self, value):
        self.set_search_knob("num_probes", value)

    @property
    def key_projection(self):
        """The key projection (a `keras_resmem.projection.PCA`), or None."""
        return self._projection

    @property
    def stored_key_dim(self):
        """The features per stored key: the projection's `dim`, else `key_dim`."""
        if self._projection is not None:
            return self._projection.dim
        return self.key_dim

    def _project(self, queries):
        """`(m, key_dim)` float32 queries as stored keys are: projected, if the memory projects."""
        if self._projection is None:
            return queries
        return self._projection.project(queries)

    # State.

    @property
    def memory_size(self):
        """The number of entries in the memory (0 while it is empty)."""
        entries = self.__dict__.get("_entry_vars")
        if entries is not None:
            return int(entries["keys"].shape[0])
        return self.__dict__.get("_memory_size")

    @memory_size.setter
    def memory_size(self, value):
        self.__dict__["_memory_size"] = value

    def build(self, input_shape=None):
        if self.memory_size is None and input_shape is not None:
            # Called on a network's tensors before any memory: an empty memory,
            # its shape taken from theirs, to be filled by `memorize`.
            self._shape_from_inputs(input_shape)
        if self.memory_size is None or self.key_dim is None or self.num_outputs is None:
            raise ValueError(
                "This ResidualMemory has no memory yet: call `memorize(...)` first, "
                "or create it with `keras_resmem.attach_memory(...)`."
            )
        if input_shape is not None:
            self._check_input_shapes(input_shape)
        if self._share_state_of is not None:
            self._build_shared(self._share_state_of)
        else:
            self._build_entries()
        self._hparam_vars = {}
        for name, dtype in _HPARAM_DTYPES.items():
            self._hparam_vars[name] = self.add_weight(
                name=name, shape=(), dtype=dtype, initializer="zeros", trainable=False
            )
            self._hparam_vars[name].assign(self.__dict__[f"_{name}_value"])
        if self._projection is not None and self._share_state_of is None:
            self._projection.build(self.key_dim, self._add_backend_weight)
        if self._share_state_of is None and self.memory_size > 0:
            self._build_backend()
        self.built = True

    def _shape_from_inputs(self, input_shape):
        self._check_input_shapes(input_shape, ready=False)
        emb_shape, score_shape = (tuple(s) for s in input_shape)
        feature_dims = emb_shape[len(score_shape) - 1 :]
        if None in feature_dims or score_shape[-1] is None:
            raise ValueError(
                "An empty ResidualMemory takes its shape from its inputs, which must have "
                f"known feature sizes. Received input shapes: {input_shape}"
            )
        self.key_dim = _validation.positive_int("key_dim", math.prod(feature_dims))
        self.num_outputs = _validation.positive_int("num_outputs", score_shape[-1])
        self.memory_size = 0

    def _build_backend(self):
        """Resolves and builds the search backend, once the memory has entries."""
        self._backend = self._search.clone().resolve(self.memory_size, self.stored_key_dim)
        self._backend.build(
            self._entry_vars["keys"], self._add_backend_weight, self._entry_initializer()
        )

    def _add_backend_weight(
        self, name, shape, dtype="float32", initializer="zeros", trainable=False, growable=False
    ):
        if trainable:
            raise ValueError("A search backend's variables are not trainable.")
        return _variables.add_weight(self, name, shape, dtype, initializer, growable=growable)

    def _build_entries(self):
        n, c = self.memory_size, self.num_outputs

        def entry(name, shape, dtype="float32"):
            # Growable: `add_examples` and `forget` change the number of
            # entries in place, and compiled models see it.
            return _variables.add_weight(
                self, name, shape, dtype, self._entry_initializer(), growable=True
            )

        self.keys = entry("keys", (n, self.stored_key_dim))
        entries = {"keys": self.keys}
        if self.sparse_residuals is None:
            self.memory_scores = entries["memory_scores"] = entry("memory_scores", (n, c))
        else:
            m = self.sparse_residuals
            self.residual_ids = entries["residual_ids"] = entry("residual_ids", (n, m), "int32")
            self.residual_values = entries["residual_values"] = entry(
                "residual_values", (n, m), "float16"
            )
        target_shape, target_dtype = (
            ((n,), "int32") if self.task == "classification" else ((n, c), "float32")
        )
        self.memory_targets = entries["memory_targets"] = entry(
            "memory_targets", target_shape, target_dtype
        )
        self.memory_ids = entries[_IDS] = entry(_IDS, (n,), "int64")
        self._entry_vars = entries

    def _build_shared(self, other):
        """Takes `other`'s entries and index (not copied): only the settings are this layer's."""
        self._entry_vars = dict(other._entry_vars)
        for name, variable in self._entry_vars.items():
            setattr(self, name, variable)
        # Tracked, so that they are saved with this layer too.
        self._shared_variables = [
            v
            for v in other.variables
            if v.name not in _HPARAM_DTYPES and v.name not in self._entry_vars
        ]
        self._backend = other._backend
        self._projection = other._projection

    def _entry_initializer(self):
        # A memory being filled gets uninitialized per-entry variables: their
        # pages take no RAM until written, so the memory never exists twice.
        return _unwritten if self._filling else "zeros"

    def _check_input_shapes(self, input_shape, ready=True):
        if not (isinstance(input_shape, (list, tuple)) and len(input_shape) == 2) or not all(
            isinstance(shape, (list, tuple)) for shape in input_shape
        ):
            raise ValueError(
                "ResidualMemory is called on a list `[embeddings, scores]`. "
                f"Received input shape: {input_shape}"
            )
        emb_shape, score_shape = (tuple(s) for s in input_shape)
        if not ready:
            return
        if score_shape[-1] is not None and score_shape[-1] != self.num_outputs:
            raise ValueError(
                f"The scores have {score_shape[-1]} outputs but the memory was built for "
                f"num_outputs={self.num_outputs}. Received scores shape: {score_shape}"
            )
        feature_dims = emb_shape[len(score_shape) - 1 :]
        if None not in feature_dims and math.prod(feature_dims) != self.key_dim:
            raise ValueError(
                f"The embeddings have {math.prod(feature_dims)} features per example but the "
                f"memory keys have key_dim={self.key_dim}. Received embeddings shape: {emb_shape}"
            )

    def _check_ready(self):
        if not self.built or not self.memory_size:
            raise ValueError(
                "This ResidualMemory holds no memory yet: fill it first "
                "(`keras_resmem.memorize(model, data)`, or the layer's `memorize`)."
            )
        if self._fill_failed:
            raise ValueError(
                "This ResidualMemory's last fill failed part way, so its memory is incomplete; "
                "fill it again (`memorize` or `keras_resmem.attach_memory`) before using or "
                "saving it."
            )

    # Filling.

    def memorize(self, embeddings, scores, targets, ids=None, verbose=0):
        """Stores the memory, one entry per training example, replacing any it held.

        Args:
            embeddings: `(n, ...)` training embeddings (flattened to `(n, d)`).
            scores: `(n, num_outputs)` the network's outputs on them (logits
                or probabilities, as `from_logits` says; predictions for regression).
            targets: classification: `(n,)` integer class ids; regression:
                `(n, num_outputs)` (or `(n,)` for one output).
            ids: `(n,)` int64 ids of the entries, unique: what
                `return_neighbors`, `neighbors` and `forget` name entries by.
                Default: their positions, `0 .. n-1`.
            verbose: 1 shows a progress bar while an IVF index is trained.

        Raises:
            ValueError: on shapes that disagree, non-finite values, class
                ids outside `[0, num_outputs)`, or repeated ids. The memory
                is left as it was.
        """
        entries = self._entries_from_arrays(embeddings, scores, targets, ids, first_id=0)
        self._fill(entries, verbose=verbose)

    def add_examples(self, embeddings, scores, targets, ids=None, verbose=0):
        """Adds entries to the memory; the entries it holds are not touched.

        Arguments as for `memorize`. `ids` must differ from every id the
        memory holds; by default they count up from one past its largest id
        (the new entries' positions, if nothing was forgotten). The search
        index is updated in place where the backend can (see
        `keras_resmem.search.SearchBackend.entries_added`); compiled and
        already-running models see the new entries at once.

        Raises:
            ValueError: as `memorize`, or an id the memory already holds.
        """
        self._check_ready()
        entries = self._entries_from_arrays(
            embeddings, scores, targets, ids, first_id=self._next_id()
        )
        self._append(entries, verbose=verbose)

    def forget(self, ids, verbose=0):
        """Removes the entries with these ids from the memory.

        Nothing of them is left in the layer's variables or its index, so
        nothing of them is in what the model saves or exports afterwards.

        Args:
            ids: the ids of the entries to remove, unique.
            verbose: 1 shows a progress bar if the index is built again.

        Raises:
            ValueError: an id the memory does not hold, an id given twice,
                or fewer than `k` entries left (lower `k` first).
        """
        self._check_ready()
        ids = np.asarray(ids)
        ids = _validation.entry_ids(ids.reshape(-1), ids.size)
        _validation.unique_ids(ids)
        held = self.entry_ids()
        unknown = ~np.isin(ids, held)
        if unknown.any():
            raise ValueError(
                f"`ids` must name entries of the memory; {int(unknown.sum())} of {len(ids)} do "
                f"not, e.g. {ids[unknown][:5].tolist()}."
            )
        left = len(held) - len(ids)
        if left < self.k:
            raise ValueError(
                f"Forgetting {len(ids)} of {len(held)} entries would leave {left}, fewer than "
                f"k={self.k}. Lower `k` first, or fill the memory again with `memorize`."
            )
        if len(ids):
            self._remove(np.flatnonzero(~np.isin(held, ids)), verbose=verbose)

    def entry_ids(self):
        """The ids of the memory's entries, int64 `(memory_size,)`, in storage order."""
        self._check_ready()
        return self._entry_vars[_IDS].numpy()

    def _next_id(self):
        held = self._entry_vars[_IDS].numpy()
        return int(held.max()) + 1 if len(held) else 0

    def _entries_from_arrays(self, embeddings, scores, targets, ids, first_id):
        embeddings = np.asarray(embeddings, dtype=np.float32)
        n = len(embeddings)
        if n == 0:
            raise ValueError("`embeddings` is empty: a memory needs at least one entry.")
        writer = self._writer(capacity=n, first_id=first_id)
        scores, targets = np.asarray(scores, dtype=np.float32), np.asarray(targets)
        if len(scores) != n or len(targets) != n:
            raise ValueError(
                f"`scores` and `targets` must have one row per embedding ({n}). "
                f"Received: {len(scores)} rows of scores and {len(targets)} of targets"
            )
        if ids is not None:
            ids = _validation.entry_ids(ids, n)
        for i in range(0, n, _WRITE_ROWS):
            rows = slice(i, i + _WRITE_ROWS)
            writer.write(
                embeddings[rows], scores[rows], targets[rows], None if ids is None else ids[rows]
            )
        return writer.finish()

    def _writer(self, capacity=None, first_id=0):
        """A `MemoryWriter` with this memory's settings."""
        return writer_lib.MemoryWriter(
            task=self.task,
            sparse_residuals=self.sparse_residuals,
            temperature=self.temperature,
            from_logits=self.from_logits,
            num_outputs=self.num_outputs,
            capacity=capacity,
            first_id=first_id,
        )

    def _check_entry_shape(self, entries):
        if self.key_dim is None:
            return
        shape = (entries.key_dim, entries.num_outputs)
        if shape != (self.key_dim, self.num_outputs):
            raise ValueError(
                f"This memory holds keys of {self.key_dim} features and {self.num_outputs} "
                f"outputs; the entries have {shape[0]} and {shape[1]}. Create a new "
                "ResidualMemory for them."
            )

    def _fill(self, entries, verbose=0, index=None):
        """Makes `entries` (a finished `MemoryEntries`) the memory, and indexes it.

        `index`: the backend's `adopt_index` arguments, for an index built
        elsewhere (a sharded memory's), instead of `fit`.
        """
        self._check_entry_shape(entries)
        _validation.k_within(self.k, entries.memory_size)
        if self._projection is not None:
            self._projection.check_fit(entries.memory_size)
        if not self.built:
            self.memory_size = entries.memory_size
            self.key_dim, self.num_outputs = entries.key_dim, entries.num_outputs
            self._filling = True
            try:
                self.build()
            except BaseException:
                self.memory_size = self.key_dim = self.num_outputs = None
                raise
            finally:
                self._filling = False
        try:
            if self._projection is not None:
                self._projection.fit(entries.arrays["keys"])
                self._project_entries(entries)
            self._adopt_all(entries.arrays, entries.bases)
            if self._backend is None:  # attached empty: the first fill
                self._filling = True
                try:
                    self._build_backend()
                finally:
                    self._filling = False
            else:
                self._backend.resolve(self.memory_size, self.stored_key_dim)
            if index is None:
                self._backend.fit(verbose=verbose)
            else:
                self._backend.adopt_index(**index)
        except BaseException:
            self._fill_failed = True
            raise
        self._fill_failed = False

    def _project_entries(self, entries):
        """Replaces `entries`' keys by their projection (with the fit the memory holds)."""
        keys, base = writer_lib.with_spare_rows(
            entries.memory_size, (self._projection.dim,), np.float32
        )
        self._projection.project_array(entries.arrays["keys"], out=keys)
        entries.arrays["keys"] = keys
        entries.bases["keys"] = base

    def _adopt_all(self, arrays, bases=None):
        """Makes `arrays` (by variable name, all with the same rows) the entries' values.

        `bases` are the buffers the arrays start, with spare rows after them.
        """
        self._bases = {}
        for name, array in arrays.items():
            _adopt(self._entry_vars[name], array)
        arrays.clear()
        self._bases = dict(bases or {})

    def _append(self, entries, verbose=0):
        """Adds `entries` after the memory's own, and updates the index."""
        self._check_entry_shape(entries)
        if self._projection is not None:
            # The fit the memory holds: adding examples does not move the other keys.
            self._project_entries(entries)
        held = self._entry_vars[_IDS].numpy()
        taken = np.isin(entries.arrays[_IDS], held)
        if taken.any():
            raise ValueError(
                f"`ids` must be new: {int(taken.sum())} of the {entries.memory_size} ids are "
                f"already in the memory, e.g. {entries.arrays[_IDS][taken][:5].tolist()}. "
                "`forget` them first to replace those entries."
            )
        start = self.memory_size
        grown, bases = {}, {}
        for name, variable in self._entry_vars.items():
            old = np.asarray(tf.convert_to_tensor(variable))
            new = entries.arrays.pop(name)
            n, m = len(old), len(new)
            base = self._bases.get(name)
            if (
                base is None
                or base.ctypes.data != old.ctypes.data  # the variable holds another buffer
                or len(base) < n + m
            ):
                # No room after the entries: a new buffer, with spare rows
                # for the next additions (one copy, amortized over them).
                _, base = writer_lib.with_spare_rows(n + m, old.shape[1:], old.dtype)
                base[:n] = old
            # Rows past the variable's are written, never its own: a graph
            # reading it now sees them unchanged.
            base[n : n + m] = new
            grown[name], bases[name] = base[: n + m], base
        self._update_entries(
            grown, lambda: self._backend.entries_added(start, verbose=verbose), bases
        )

    def _remove(self, kept, verbose=0):
        """Keeps only the entries at positions `kept` (sorted), and updates the index."""
        kept = np.asarray(kept, np.int64)
        smaller, bases = {}, {}
        for name, variable in self._entry_vars.items():
            old = np.asarray(tf.convert_to_tensor(variable))
            # A new buffer: the removed entries' rows are not kept anywhere.
            out, bases[name] = writer_lib.with_spare_rows(len(kept), old.shape[1:], old.dtype)
            np.take(old, kept, axis=0, out=out)
            smaller[name] = out
        self._update_entries(
            smaller, lambda: self._backend.entries_removed(kept, verbose=verbose), bases
        )

    def _update_entries(self, arrays, update_index, bases):
        try:
            self._adopt_all(arrays, bases)
            update_index()
        except BaseException:
            self._fill_failed = True
            raise

    def storage_bytes(self):
        """The memory's size in bytes, by part.

        Returns:
            A dict: `"keys"`, `"residuals"` (the stored network outputs, or
            the sparse residual entries), `"targets"`, `"index"` (the search
            backend's own state: IVF's lists and centroids, or ScaNN's
            serialized index; 0 for exact search), `"ids"` (the entries'
            int64 ids) and `"total"`. Divide by
            `memory_size` for bytes per entry. `"projection"`: the key
            projection's mean and components (0 without one).
        """
        self._check_ready()

        def nbytes(*names):
            return sum(
                math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
                for name, v in self._entry_vars.items()
                if name in names
            )

        sizes = {
            "keys": nbytes("keys"),
            "residuals": nbytes("memory_scores", "residual_ids", "residual_values"),
            "targets": nbytes("memory_targets"),
            "ids": nbytes(_IDS),
            "index": int(self._backend.storage_bytes()),
            "projection": 0 if self._projection is None else self._projection.storage_bytes(),
        }
        sizes["total"] = sum(sizes.values())
        return sizes

    # Searching and combining.

    def _hparam_tensor(self, name):
        value = tf.convert_to_tensor(self._hparam_vars[name])
        return value if _HPARAM_DTYPES[name] == "int32" else tf.cast(value, tf.float32)

    def _search_neighbors(self, queries, k, searcher):
        ids = searcher.search(queries, k)
        # Exact distances of the k found, whatever the backend: an approximate
        # search may miss a neighbour but never mis-weights one.
        neighbor_keys = tf.gather(self.keys, ids)
        squared = tf.reduce_sum(tf.square(queries[:, None, :] - neighbor_keys), axis=-1)
        distances = tf.sqrt(tf.maximum(squared, 0.0))
        # Nearest first by the exact distance, so that the first j of k
        # neighbours are the j nearest (the tuner truncates k this way).
        order = tf.argsort(distances, axis=-1, stable=True)
        return tf.gather(ids, order, batch_dims=1), tf.gather(distances, order, batch_dims=1)

    def neighbors(self, embeddings, k=None):
        """The `k` nearest memory entries of each query, and their weights.

        Args:
            embeddings: `(m, ...)` query embeddings (flattened to `key_dim`).
            k: how many; default the layer's `k`. Passing it does not change
                the layer.

        Returns:
            `(ids, distances, weights)`, each `(m, k)`, nearest first: the
            entries' int64 ids (see `memorize`), L2 distances, and the
            normalised weights.
        """
        positions, distances, weights = self.nearest_positions(embeddings, k)
        return tf.gather(self._entry_vars[_IDS], positions), distances, weights

    def nearest_positions(self, embeddings, k=None):
        """`neighbors`, with the entries' int32 positions in storage for ids.

        Positions change when entries are forgotten; they are what
        `neighbor_rows` reads, for callers that search once and combine many
        times (`keras_resmem.tuning.NeighborCache`).
        """
        self._check_ready()
        if k is None:
            k = self._hparam_tensor("k")
        else:
            k = _validation.k_within(k, self.memory_size)
        queries = tf.reshape(tf.cast(embeddings, tf.float32), [-1, self.key_dim])
        queries = self._project(queries)
        positions, distances = self._search_neighbors(queries, k, self._backend)
        weights = residuals_lib.neighbor_weights(distances, self._hparam_tensor("sigma"))
        return positions, distances, weights

    def neighbor_rows(self, ids, methods=residuals_lib.METHODS):
        """The stored rows of the entries at positions `ids` that `methods` combine, by name.

        `ids` are positions, as `nearest_positions` returns them.

        Returns:
            A dict for `combine`: `"targets"`, and for `"resmem"` either
            `"scores"` (dense) or `"residual_ids"` and `"residual_values"`.
        """
        rows = {"targets": tf.gather(self.memory_targets, ids)}
        if "resmem" in methods:
            if self.sparse_residuals is None:
                rows["scores"] = tf.gather(self.memory_scores, ids)
            else:
                rows["residual_ids"] = tf.gather(self.residual_ids, ids)
                rows["residual_values"] = tf.gather(self.residual_values, ids)
        return rows

    def combine(self, method, scores, rows, distances, *, sigma, temperature, knn_weight):
        """One method's prediction from the neighbours' rows, and the weights.

        The combine step of `call`, open to callers that search once and
        combine many times (`keras_resmem.tuning.NeighborCache`).

        Args:
            method: `"resmem"`, `"knn"` or `"interpolation"`.
            scores: `(m, num_outputs)` the network's outputs on the queries.
            rows: `neighbor_rows(ids)`, each `(m, k, ...)`.
            distances: `(m, k)` L2 distances, nearest first.
            sigma, temperature, knn_weight: float32 scalars.
        """
        return residuals_lib.combine(
            method,
            scores,
            rows,
            distances,
            sigma=sigma,
            temperature=temperature,
            knn_weight=knn_weight,
            task=self.task,
            from_logits=self.from_logits,
            sparse=self.sparse_residuals is not None,
        )

    def _combine_method(self, method, scores, ids, distances):
        return self.combine(
            method,
            scores,
            self.neighbor_rows(ids, (method,)),
            distances,
            sigma=self._hparam_tensor("sigma"),
            temperature=self._hparam_tensor("temperature"),
            knn_weight=self._hparam_tensor("knn_weight"),
        )

    def call(self, inputs, return_neighbors=False):
        self._check_ready()
        return self._predict(inputs, self._backend, return_neighbors)

    def _predict(self, inputs, searcher, return_neighbors=False):
        """`call`, searching with `searcher` (an export's, or the layer's backend)."""
        self._check_input_shapes([tuple(t.shape) for t in inputs])
        embeddings, scores = inputs
        scores = tf.cast(scores, tf.float32)
        batch_shape = tf.shape(scores)[:-1]
        flat_scores = tf.reshape(scores, [-1, self.num_outputs])
        queries = tf.reshape(tf.cast(embeddings, tf.float32), [-1, self.key_dim])
        # A query row with NaN or infinity (in its key or the network's
        # output) gets NaN scores; it is searched as zeros, so that it never
        # fails or changes the other rows of its batch.
        finite = tf.logical_and(
            tf.reduce_all(tf.math.is_finite(queries), axis=-1),
            tf.reduce_all(tf.math.is_finite(flat_scores), axis=-1),
        )
        queries = self._project(tf.where(finite[:, None], queries, 0.0))
        ids, distances = self._search_neighbors(queries, self._hparam_tensor("k"), searcher)
        # Only the chosen method's branch runs (and gathers what it needs).
        prediction, weights = tf.switch_case(
            self._hparam_tensor("method"),
            [
                functools.partial(self._combine_method, method, flat_scores, ids, distances)
                for method in residuals_lib.METHODS
            ],
        )
        prediction = tf.where(finite[:, None], prediction, np.nan)
        weights = tf.where(finite[:, None], weights, np.nan)
        prediction = tf.reshape(prediction, tf.shape(scores))
        if not return_neighbors:
            return prediction
        neighbor_shape = tf.concat([batch_shape, [-1]], axis=0)
        ids = tf.gather(self._entry_vars[_IDS], ids)
        return prediction, tf.reshape(ids, neighbor_shape), tf.reshape(weights, neighbor_shape)

    def compute_output_spec(self, inputs, return_neighbors=False):
        _, scores = inputs
        prediction = keras.KerasTensor(scores.shape, dtype="float32")
        if not return_neighbors:
            return prediction
        neighbor_shape = tuple(scores.shape[:-1]) + (None,)
        return (
            prediction,
            keras.KerasTensor(neighbor_shape, dtype="int64"),
            keras.KerasTensor(neighbor_shape, dtype="float32"),
        )

    def _with_settings(self, **settings):
        """A new layer with other settings that shares this one's memory and index (no copy).

        `settings` are `ResidualMemory` arguments: `k`, `sigma`,
        `temperature`, `method`, `knn_weight`.
        """
        self._check_ready()
        config = {**self.get_config(), **settings}
        layer = type(self).from_config(config)
        layer._share_state_of = self
        layer.build()
        layer._share_state_of = None
        return layer

    # Saving. Variables are saved by name, so that a later version can add
    # one without breaking older files.

    def save_own_variables(self, store):
        self._check_ready()
        for variable in self.variables:
            store[variable.name] = variable

    def load_own_variables(self, store):
        names = list(store.keys())
        if names and all(name.isdigit() for name in names):
            store = self._legacy_store(store)
        variables = {v.name: v for v in self.variables}
        optional = set(_ADDED_LATER) | set(self._backend.knobs) | {_IDS}
        missing = sorted(set(variables) - set(store.keys()) - optional)
        unknown = sorted(set(store.keys()) - set(variables))
        if missing or unknown:
            raise ValueError(
                f"The saved memory of layer {self.name!r} does not fit its config: "
                f"variables missing {missing}, unknown {unknown}."
            )
        for name in store.keys():
            variable, value = variables[name], store[name]
            shape, expected = tuple(value.shape), tuple(variable.shape)
            if isinstance(variable, _variables.GrowableVariable):
                # An index's own per-entry state (IVF partitions trained at
                # another size) may have any number of rows.
                shape, expected = shape[1:], expected[1:]
                rows = int(tuple(value.shape)[0])
                if name in self._entry_vars and rows != self.memory_size:
                    shape, expected = (rows,), (self.memory_size,)
            if shape != expected:
                raise ValueError(
                    f"The saved variable {name!r} of layer {self.name!r} has shape "
                    f"{tuple(value.shape)}, but the layer's config gives {tuple(variable.shape)}."
                )
            variable.assign(value)
        self._bases = {}
        if _IDS not in store.keys():  # saved before ids: entries are numbered by position
            self._entry_vars[_IDS].assign(np.arange(self.memory_size, dtype=np.int64))
        try:
            # Before any graph or native code reads them (a file is untrusted input).
            self._check_loaded()
        except BaseException:
            self._fill_failed = True
            raise
        self._fill_failed = False
        # The index may no longer match the keys; the backend catches up.
        self._backend.keys_changed()

    def _variable_arrays(self):
        """The layer's variables as NumPy arrays (views, not copies), by name."""
        return {v.name: np.asarray(tf.convert_to_tensor(v)) for v in self.variables}

    def _check_loaded(self):
        """Checks loaded values: entries, hyperparameters and the backend's own state."""
        arrays = self._variable_arrays()
        _integrity.check_entries(
            self.name,
            {name: arrays[name] for name in self._entry_vars},
            task=self.task,
            num_outputs=self.num_outputs,
            memory_size=self.memory_size,
            key_dim=self.stored_key_dim,
        )
        if self._projection is not None:
            self._projection.check_loaded(
                arrays, lambda part, problem: _integrity.fail(self.name, part, problem)
            )
        _integrity.check_hparams(
            self.name, {name: arrays[name] for name in _HPARAM_DTYPES}, self.memory_size
        )
        self._backend.check_loaded(
            arrays, lambda part, problem: _integrity.fail(self.name, part, problem)
        )

    def _legacy_store(self, store):
        """A version 0.1 file's variables (saved by position), by name."""
        names = [
            "keys",
            *(
                ["memory_scores"]
                if self.sparse_residuals is None
                else ["residual_ids", "residual_values"]
            ),
            "memory_targets",
            "k",
            "sigma",
            "temperature",
            *self._backend.legacy_variable_names(),
            *_ADDED_LATER,
        ]
        n = len(store.keys())
        if n not in (len(names), len(names) - len(_ADDED_LATER)):
            raise ValueError(
                f"The saved memory of layer {self.name!r} has {n} variables, but a memory with "
                f"its config saved by version 0.1 has {len(names)}."
            )
        return {name: store[str(i)] for i, name in enumerate(names[:n])}

    def save_assets(self, dir_path):
        self._check_ready()
        self._backend.save_assets(dir_path)
        # Of everything saved: the variables and the backend's files.
        _integrity.write_digest(dir_path, self._variable_arrays())

    def load_assets(self, dir_path):
        # Variables are loaded first (Keras's order): the digest covers both.
        _integrity.check_digest(self.name, dir_path, self._variable_arrays())
        self._backend.load_assets(dir_path)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "k": self.k,
                "sigma": self.sigma,
                "temperature": self.temperature,
                "method": self.method,
                "knn_weight": self.knn_weight,
                "task": self.task,
                "from_logits": self.from_logits,
                "search": keras.saving.serialize_keras_object(self.search),
                "sparse_residuals": self.sparse_residuals,
                "key_projection": (
                    None
                    if self._projection is None
                    else keras.saving.serialize_keras_object(self._projection)
                ),
                "memory_size": self.memory_size,
                "key_dim": self.key_dim,
                "num_outputs": self.num_outputs,
            }
        )
        return config


# Rows validated and written at once by `memorize` (bounds its temporary memory).
_WRITE_ROWS = 16384


def _unwritten(shape, dtype=None):
    """An uninitialized tensor (every entry is written before the memory is used)."""
    return tf.raw_ops.Empty(shape=shape, dtype=dtype or "float32", init=False)


def _adopt(variable, array):
    """`variable.assign(array)`, the variable taking over the array's memory.

    DLPack hands an aligned array to TensorFlow without a copy, and
    `AssignVariableOp` keeps the buffer of the tensor it is given: the memory
    exists once, and the caller must not write to `array` afterwards.

    Entries are written this way, whole, and never row by row into the
    variable: a sliced assignment (`ResourceStridedSliceAssign`) puts a
    TensorFlow variable in copy-on-read mode for good, and from then on every
    whole read of it copies the whole table: each search, each gather of
    neighbours' rows (a Keras variable is read whole for `tf.gather`), each
    index build.
    """
    variable.assign(tf.experimental.dlpack.from_dlpack(array.__dlpack__()))
