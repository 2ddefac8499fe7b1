"""The `ResidualMemory` layer: a kNN memory of a network's training residuals."""

import functools
import math

import keras
import numpy as np
import tensorflow as tf

from keras_resmem import residuals as residuals_lib
from keras_resmem import search as search_lib
from keras_resmem.api_export import keras_resmem_export


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def _check_unit_float(name, value):
    is_number = isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(value, bool) or not is_number or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1]. Received: {name}={value!r}")
    return float(value)


def _check_positive_float(name, value):
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a positive number. Received: {name}={value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a positive number. Received: {name}={value!r}"
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive, finite number. Received: {name}={value}")
    return value


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

    Most users get this layer from `keras_resmem.attach_memory`, which runs the
    network over the training data and calls `memorize`.

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
        search: the neighbour search backend: `"exact"` (stock TensorFlow
            ops), `"ivf"` (approximate, an inverted-file index in stock
            TensorFlow ops: runs on stock TensorFlow Serving), `"scann"`
            (approximate, ScaNN's custom ops), or `"auto"` (exact below 200,000
            entries, else IVF).
        sparse_residuals: `None` (store the network's outputs, dense), or
            `m`, the number of largest-magnitude residual entries stored per
            memory entry (classification only).
        memory_size, key_dim, num_outputs: the memory's shape. Set by
            `memorize`; given only when re-creating a layer from its config.
        chunk_size: exact search scores this many memory entries at once,
            which bounds its memory use.
        scann_options: overrides of the ScaNN settings (`brute_force`,
            `num_leaves`, `num_leaves_to_search`, `training_sample_size`,
            `min_partition_size`, `scoring`: `"exact"` or `"ah"`, and for `"ah"`
            `dimensions_per_block` and `reorder`); see
            `keras_resmem.search.default_scann_options`.
        ivf_options: overrides of the IVF settings (`num_partitions`,
            `num_probes`, `training_sample_size`, `iterations`, `seed`); see
            `keras_resmem.search.default_ivf_options`.
        **kwargs: base layer keyword arguments, such as `name`.

    Call arguments:
        inputs: a list `[embeddings, scores]`: `scores` is the network's
            output, `(batch, num_outputs)` or `(batch, time, num_outputs)`;
            `embeddings` has the same leading dimensions, and the rest are
            flattened to `key_dim`.
        return_neighbors: if `True`, also return the int32 neighbour ids and
            their weights, each `(batch, k)` (or `(batch, time, k)`), nearest
            first.

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
        memory_size=None,
        key_dim=None,
        num_outputs=None,
        chunk_size=65536,
        scann_options=None,
        ivf_options=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if task not in residuals_lib.TASKS:
            raise ValueError(
                f"`task` must be one of {residuals_lib.TASKS}. Received: task={task!r}"
            )
        if not isinstance(from_logits, bool):
            raise ValueError(
                f"`from_logits` must be True or False. Received: from_logits={from_logits!r}"
            )
        if search not in search_lib.BACKENDS:
            raise ValueError(
                f"`search` must be one of {search_lib.BACKENDS}. Received: search={search!r}"
            )
        for name, value in (
            ("memory_size", memory_size),
            ("key_dim", key_dim),
            ("num_outputs", num_outputs),
        ):
            if value is not None:
                _check_positive_int(name, value)
        if sparse_residuals is not None:
            sparse_residuals = _check_positive_int("sparse_residuals", sparse_residuals)
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
        if scann_options is not None and not isinstance(scann_options, dict):
            raise ValueError(
                f"`scann_options` must be a dict. Received: scann_options={scann_options!r}"
            )
        self.task = task
        self.from_logits = from_logits
        self.search = search
        self.sparse_residuals = sparse_residuals
        self.memory_size = None if memory_size is None else int(memory_size)
        self.key_dim = None if key_dim is None else int(key_dim)
        self.num_outputs = None if num_outputs is None else int(num_outputs)
        self.chunk_size = _check_positive_int("chunk_size", chunk_size)
        # Unknown names and bad values fail now, not after a pass over the data.
        search_lib.resolve_scann_options(1_000_000, 2, scann_options)
        self.scann_options = dict(scann_options) if scann_options else None
        if ivf_options is not None and not isinstance(ivf_options, dict):
            raise ValueError(f"`ivf_options` must be a dict. Received: ivf_options={ivf_options!r}")
        # Unknown names and bad values fail now, not after a pass over the data.
        search_lib.resolve_ivf_options(1, ivf_options)
        self.ivf_options = dict(ivf_options) if ivf_options else None
        self._hparam_vars = None
        self._searcher = None
        self._filling = False
        self.k = k
        self.sigma = sigma
        self.temperature = temperature
        self.method = method
        self.knn_weight = knn_weight
        self.trainable = False

    # Hyperparameters: Python values until built, then variables.

    def _get_hparam(self, name):
        if self._hparam_vars is not None:
            return self._hparam_vars[name].numpy().item()
        # None while __init__ runs (TensorFlow's tracking reads attributes first).
        return self.__dict__.get(f"_{name}_value")

    def _set_hparam(self, name, value):
        if self._hparam_vars is not None:
            self._hparam_vars[name].assign(value)
        else:
            self.__dict__[f"_{name}_value"] = value

    @property
    def k(self):
        """The number of neighbours combined."""
        value = self._get_hparam("k")
        return None if value is None else int(value)

    @k.setter
    def k(self, value):
        value = _check_positive_int("k", value)
        if self.memory_size is not None and value > self.memory_size:
            raise ValueError(
                f"`k` must be at most the memory size ({self.memory_size} entries). "
                f"Received: k={value}"
            )
        self._set_hparam("k", value)

    @property
    def sigma(self):
        """The distance scale of the neighbour weights."""
        value = self._get_hparam("sigma")
        return None if value is None else float(value)

    @sigma.setter
    def sigma(self, value):
        self._set_hparam("sigma", _check_positive_float("sigma", value))

    @property
    def temperature(self):
        """The softmax temperature `T`."""
        value = self._get_hparam("temperature")
        return None if value is None else float(value)

    @temperature.setter
    def temperature(self, value):
        value = _check_positive_float("temperature", value)
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
        return None if value is None else residuals_lib.METHODS[int(value)]

    @method.setter
    def method(self, value):
        if not isinstance(value, str) or value not in residuals_lib.METHODS:
            raise ValueError(
                f"`method` must be one of {residuals_lib.METHODS}. Received: method={value!r}"
            )
        self._set_hparam("method", residuals_lib.METHODS.index(value))

    @property
    def knn_weight(self):
        """`"interpolation"` only: the weight `lambda` of the kNN on labels."""
        value = self._get_hparam("knn_weight")
        return None if value is None else float(value)

    @knn_weight.setter
    def knn_weight(self, value):
        self._set_hparam("knn_weight", _check_unit_float("knn_weight", value))

    @property
    def num_probes(self):
        """IVF search only: the number of partitions probed per query.

        More probes find more of the true neighbours and cost more time. Can
        be changed at any time, like `k`.
        """
        if self.search_backend != "ivf":
            return None
        if self._hparam_vars is None:
            return self._ivf_options_in_use()["num_probes"]
        return int(self._hparam_vars["num_probes"].numpy())

    @num_probes.setter
    def num_probes(self, value):
        if self.search_backend != "ivf":
            raise ValueError(
                "`num_probes` applies to the 'ivf' search backend only; this memory uses "
                f"search={self.search_backend!r}."
            )
        value = _check_positive_int("num_probes", value)
        if self._hparam_vars is None:
            self.ivf_options = {**(self.ivf_options or {}), "num_probes": value}
        else:
            self._hparam_vars["num_probes"].assign(value)

    def _ivf_options_in_use(self):
        return search_lib.resolve_ivf_options(self.memory_size, self.ivf_options)

    @property
    def search_backend(self):
        """The backend in use: `"exact"`, `"ivf"` or `"scann"` (`"auto"` resolved)."""
        if self.memory_size is None:
            return None
        return search_lib.resolve_backend(self.search, self.memory_size)

    def build(self, input_shape=None):
        if self.memory_size is None or self.key_dim is None or self.num_outputs is None:
            raise ValueError(
                "This ResidualMemory has no memory yet: call `memorize(...)` first, "
                "or create it with `keras_resmem.attach_memory(...)`."
            )
        if input_shape is not None:
            self._check_input_shapes(input_shape)
        n, c = self.memory_size, self.num_outputs
        hparams = {
            "k": self._k_value,
            "sigma": self._sigma_value,
            "temperature": self._temperature_value,
        }
        self.keys = self.add_weight(
            name="keys",
            shape=(n, self.key_dim),
            initializer=self._entry_initializer(),
            trainable=False,
        )
        if self.sparse_residuals is None:
            self.memory_scores = self.add_weight(
                name="memory_scores",
                shape=(n, c),
                initializer=self._entry_initializer(),
                trainable=False,
            )
        else:
            m = self.sparse_residuals
            self.residual_ids = self.add_weight(
                name="residual_ids",
                shape=(n, m),
                dtype="int32",
                initializer=self._entry_initializer(),
                trainable=False,
            )
            self.residual_values = self.add_weight(
                name="residual_values",
                shape=(n, m),
                dtype="float16",
                initializer=self._entry_initializer(),
                trainable=False,
            )
        target_shape, target_dtype = (
            ((n,), "int32") if self.task == "classification" else ((n, c), "float32")
        )
        self.memory_targets = self.add_weight(
            name="memory_targets",
            shape=target_shape,
            dtype=target_dtype,
            initializer=self._entry_initializer(),
            trainable=False,
        )
        self._hparam_vars = {
            "k": self.add_weight(
                name="k", shape=(), dtype="int32", initializer="zeros", trainable=False
            ),
            # float64, so that get_config() gives back exactly the value set.
            "sigma": self.add_weight(
                name="sigma", shape=(), dtype="float64", initializer="ones", trainable=False
            ),
            "temperature": self.add_weight(
                name="temperature", shape=(), dtype="float64", initializer="ones", trainable=False
            ),
        }
        for name, value in hparams.items():
            self._hparam_vars[name].assign(value)
        if self.search_backend == "exact":
            self._searcher = search_lib.ExactSearch(self.keys, self.chunk_size)
        elif self.search_backend == "ivf":
            self._build_ivf()
        # Last, after every other variable: a file saved before these two
        # existed still loads (`load_own_variables`).
        self._hparam_vars["method"] = self.add_weight(
            name="method", shape=(), dtype="int32", initializer="zeros", trainable=False
        )
        self._hparam_vars["knn_weight"] = self.add_weight(
            name="knn_weight", shape=(), dtype="float64", initializer="zeros", trainable=False
        )
        for name in ("method", "knn_weight"):
            self._hparam_vars[name].assign(self.__dict__[f"_{name}_value"])
        self.built = True

    def _key_array(self):
        # A read-only view of the key variable: `.numpy()` would copy it.
        return np.asarray(tf.convert_to_tensor(self.keys))

    def _entry_initializer(self):
        # A memory being filled gets uninitialized per-entry variables: their
        # pages take no RAM until written, so the memory never exists twice.
        return _unwritten if self._filling else "zeros"

    def _build_ivf(self):
        opts = self._ivf_options_in_use()
        p = opts["num_partitions"]
        self.ivf_centroids = self.add_weight(
            name="ivf_centroids", shape=(p, self.key_dim), initializer="zeros", trainable=False
        )
        self.ivf_offsets = self.add_weight(
            name="ivf_offsets",
            shape=(p + 1,),
            dtype="int32",
            initializer="zeros",
            trainable=False,
        )
        self.ivf_ids = self.add_weight(
            name="ivf_ids",
            shape=(self.memory_size,),
            dtype="int32",
            initializer=self._entry_initializer(),
            trainable=False,
        )
        self._hparam_vars["num_probes"] = self.add_weight(
            name="num_probes", shape=(), dtype="int32", initializer="zeros", trainable=False
        )
        self._hparam_vars["num_probes"].assign(opts["num_probes"])
        self._searcher = search_lib.IVFSearch(
            self.keys,
            self.ivf_centroids,
            self.ivf_offsets,
            self.ivf_ids,
            self._hparam_vars["num_probes"],
            chunk_size=self.chunk_size,
        )

    def _check_input_shapes(self, input_shape):
        if not (isinstance(input_shape, (list, tuple)) and len(input_shape) == 2) or not all(
            isinstance(shape, (list, tuple)) for shape in input_shape
        ):
            raise ValueError(
                "ResidualMemory is called on a list `[embeddings, scores]`. "
                f"Received input shape: {input_shape}"
            )
        emb_shape, score_shape = (tuple(s) for s in input_shape)
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

    def memorize(self, embeddings, scores, targets, verbose=0):
        """Stores the memory: one entry per training example.

        Args:
            embeddings: `(n, ...)` training embeddings (flattened to `(n, d)`).
            scores: `(n, num_outputs)` the network's outputs on them (logits
                or probabilities, as `from_logits` says; predictions for regression).
            targets: classification: `(n,)` integer class ids; regression:
                `(n, num_outputs)` (or `(n,)` for one output).
            verbose: 1 shows a progress bar while an IVF index is trained.

        Raises:
            ValueError: on shapes that disagree, non-finite values, or class
                ids outside `[0, num_outputs)`.
        """
        embeddings = np.asarray(embeddings, dtype=np.float32)
        scores = np.asarray(scores, dtype=np.float32)
        n = len(embeddings)
        if n == 0:
            raise ValueError("`embeddings` is empty: a memory needs at least one entry.")
        embeddings = embeddings.reshape(n, -1)
        if scores.ndim != 2 or len(scores) != n:
            raise ValueError(
                f"`scores` must have shape (n, num_outputs) with n={n} (the number of "
                f"embeddings). Received: scores.shape={scores.shape}"
            )
        targets = self._check_targets(np.asarray(targets), n, scores.shape[1])
        for name, value in (("embeddings", embeddings), ("scores", scores)):
            bad = ~np.isfinite(value).all(axis=tuple(range(1, value.ndim)))
            if bad.any():
                raise ValueError(
                    f"`{name}` contains NaN or infinite values, in {int(bad.sum())} of {n} "
                    f"entries (the first at index {int(np.argmax(bad))})."
                )
        writer = _MemoryWriter(self, capacity=n)
        for i in range(0, n, _WRITE_ROWS):
            writer.write(
                embeddings[i : i + _WRITE_ROWS],
                scores[i : i + _WRITE_ROWS],
                targets[i : i + _WRITE_ROWS],
            )
        writer.close(verbose=verbose)

    def _allocate(self, n, key_dim, num_outputs):
        """Creates (or re-uses) the variables of an `n`-entry memory."""
        shape = (n, key_dim, num_outputs)
        if self.built and shape != (self.memory_size, self.key_dim, self.num_outputs):
            raise ValueError(
                "This layer already holds a memory of a different shape "
                f"({self.memory_size}, {self.key_dim}, {self.num_outputs}); create a new "
                f"ResidualMemory for one of shape {shape}."
            )
        if self.k > n:
            raise ValueError(
                f"`k` must be at most the memory size ({n} entries). Received: k={self.k}"
            )
        self._check_num_outputs(num_outputs)
        self.memory_size, self.key_dim, self.num_outputs = shape
        if not self.built:
            self._filling = True
            try:
                self.build()
            finally:
                self._filling = False

    def _check_num_outputs(self, num_outputs):
        if self.sparse_residuals is not None and self.sparse_residuals > num_outputs:
            raise ValueError(
                f"`sparse_residuals` must be at most the number of outputs ({num_outputs}). "
                f"Received: sparse_residuals={self.sparse_residuals}"
            )

    def _entry_arrays(self, scores, targets):
        """What the memory stores per entry, by variable name, from validated arrays."""
        if self.sparse_residuals is None:
            return {"memory_scores": scores, "memory_targets": targets}
        ids, values = residuals_lib.sparse_residuals(
            scores,
            targets,
            self.sparse_residuals,
            temperature=self.temperature,
            from_logits=self.from_logits,
        )
        return {
            "residual_ids": ids.numpy(),
            "residual_values": values.numpy(),
            "memory_targets": targets,
        }

    def _build_index(self, verbose=0):
        if self.search_backend == "scann":
            self._searcher = search_lib.ScannSearch.build(self.keys, self.scann_options)
        elif self.search_backend == "ivf":
            centroids, offsets, ids = search_lib.train_ivf(
                self._key_array(), self._ivf_options_in_use(), verbose=verbose
            )
            self.ivf_centroids.assign(centroids)
            self.ivf_offsets.assign(offsets)
            self.ivf_ids.assign(ids)

    def storage_bytes(self):
        """The memory's size in bytes, by part.

        Returns:
            A dict: `"keys"`, `"residuals"` (the stored network outputs, or
            the sparse residual entries), `"targets"`, `"index"` (IVF's lists
            and centroids, or ScaNN's serialized index; 0 for exact search)
            and `"total"`. Divide by `memory_size` for bytes per entry.
        """
        if not self.built:
            raise ValueError("This ResidualMemory holds no memory yet: call `memorize` first.")

        def nbytes(*variables):
            return sum(
                math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
                for v in variables
            )

        if self.sparse_residuals is None:
            residual_bytes = nbytes(self.memory_scores)
        else:
            residual_bytes = nbytes(self.residual_ids, self.residual_values)
        index_bytes = 0
        if self.search_backend == "ivf":
            index_bytes = nbytes(self.ivf_centroids, self.ivf_offsets, self.ivf_ids)
        elif self.search_backend == "scann":
            index_bytes = sum(
                _tensor_bytes(t) for t in self._ensure_searcher().index_tensors().values()
            )
        sizes = {
            "keys": nbytes(self.keys),
            "residuals": residual_bytes,
            "targets": nbytes(self.memory_targets),
            "index": index_bytes,
        }
        sizes["total"] = sum(sizes.values())
        return sizes

    def _check_targets(self, targets, n, c):
        if len(targets) != n:
            raise ValueError(
                f"`targets` must have one row per embedding ({n}). Received: {len(targets)} rows"
            )
        if self.task == "regression":
            targets = targets.astype(np.float32).reshape(n, -1)
            if targets.shape[1] != c:
                raise ValueError(
                    f"Regression targets must have the width of the scores ({c}). "
                    f"Received: targets.shape={targets.shape}"
                )
            if not np.isfinite(targets).all():
                raise ValueError("`targets` contains NaN or infinite values.")
            return targets
        if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
            raise ValueError(
                "Classification targets must be integer class ids of shape (n,). "
                f"Received: dtype={targets.dtype}, shape={targets.shape}"
            )
        if targets.min() < 0 or targets.max() >= c:
            raise ValueError(
                f"Class ids must lie in [0, {c}) for a model with {c} outputs. "
                f"Received ids from {targets.min()} to {targets.max()}"
            )
        return targets.astype(np.int32)

    def _ensure_searcher(self):
        if self._searcher is None:
            # A ScaNN memory loaded without its index (e.g. from a weights
            # file): rebuild the index from the keys, eagerly, once.
            with tf.init_scope():
                self._searcher = search_lib.ScannSearch.build(self.keys, self.scann_options)
        return self._searcher

    def _hparam_tensor(self, name):
        value = tf.convert_to_tensor(self._hparam_vars[name])
        return value if name in ("k", "method") else tf.cast(value, tf.float32)

    def _search(self, queries):
        ids = self._ensure_searcher().search(queries, self._hparam_tensor("k"))
        # Exact distances of the k found, whatever the backend: an approximate
        # search may miss a neighbour but never mis-weights one.
        neighbor_keys = tf.gather(self.keys, ids)
        squared = tf.reduce_sum(tf.square(queries[:, None, :] - neighbor_keys), axis=-1)
        distances = tf.sqrt(tf.maximum(squared, 0.0))
        # Nearest first by the exact distance, so that the first j of k
        # neighbours are the j nearest (the tuner truncates k this way).
        order = tf.argsort(distances, axis=-1, stable=True)
        return tf.gather(ids, order, batch_dims=1), tf.gather(distances, order, batch_dims=1)

    def neighbors(self, embeddings):
        """The `k` nearest memory entries of each query, and their weights.

        Args:
            embeddings: `(m, ...)` query embeddings (flattened to `key_dim`).

        Returns:
            `(ids, distances, weights)`, each `(m, k)`, nearest first: int32
            memory ids, L2 distances, and the normalised weights.
        """
        queries = tf.reshape(tf.cast(embeddings, tf.float32), [-1, self.key_dim])
        ids, distances = self._search(queries)
        weights = residuals_lib.neighbor_weights(distances, self._hparam_tensor("sigma"))
        return ids, distances, weights

    def call(self, inputs, return_neighbors=False):
        self._check_input_shapes([tuple(t.shape) for t in inputs])
        embeddings, scores = inputs
        scores = tf.cast(scores, tf.float32)
        batch_shape = tf.shape(scores)[:-1]
        flat_scores = tf.reshape(scores, [-1, self.num_outputs])
        queries = tf.reshape(tf.cast(embeddings, tf.float32), [-1, self.key_dim])
        ids, distances = self._search(queries)
        # Only the chosen method's branch runs (and gathers what it needs).
        prediction, weights = tf.switch_case(
            self._hparam_tensor("method"),
            [
                functools.partial(self._combine, method, flat_scores, ids, distances)
                for method in residuals_lib.METHODS
            ],
        )
        prediction = tf.reshape(prediction, tf.shape(scores))
        if not return_neighbors:
            return prediction
        neighbor_shape = tf.concat([batch_shape, [-1]], axis=0)
        return prediction, tf.reshape(ids, neighbor_shape), tf.reshape(weights, neighbor_shape)

    def _combine(self, method, scores, ids, distances):
        gather = lambda variable: tf.gather(variable, ids)  # noqa: E731
        neighbors = {"targets": gather(self.memory_targets)}
        if method == "resmem":
            if self.sparse_residuals is None:
                neighbors["scores"] = gather(self.memory_scores)
            else:
                neighbors["residual_ids"] = gather(self.residual_ids)
                neighbors["residual_values"] = gather(self.residual_values)
        return residuals_lib.combine(
            method,
            scores,
            neighbors,
            distances,
            sigma=self._hparam_tensor("sigma"),
            temperature=self._hparam_tensor("temperature"),
            knn_weight=self._hparam_tensor("knn_weight"),
            task=self.task,
            from_logits=self.from_logits,
            sparse=self.sparse_residuals is not None,
        )

    def compute_output_spec(self, inputs, return_neighbors=False):
        _, scores = inputs
        prediction = keras.KerasTensor(scores.shape, dtype="float32")
        if not return_neighbors:
            return prediction
        neighbor_shape = tuple(scores.shape[:-1]) + (None,)
        return (
            prediction,
            keras.KerasTensor(neighbor_shape, dtype="int32"),
            keras.KerasTensor(neighbor_shape, dtype="float32"),
        )

    def load_own_variables(self, store):
        if len(store.keys()) == len(self.variables) - 2:
            # Saved before `method` and `knn_weight` existed (always the last
            # two variables): those keep the values of the layer's config.
            n = len(store.keys())
            store = {str(i): store[str(i)] for i in range(n)}
            store[str(n)] = self._hparam_vars["method"].numpy()
            store[str(n + 1)] = self._hparam_vars["knn_weight"].numpy()
        super().load_own_variables(store)
        if self.search_backend == "scann":
            # The index no longer matches the keys; `load_assets` (or the
            # first call) restores it.
            self._searcher = None

    def save_assets(self, dir_path):
        if self.search_backend == "scann" and self._searcher is not None:
            self._searcher.save(dir_path)

    def load_assets(self, dir_path):
        if self.search_backend == "scann":
            self._searcher = search_lib.ScannSearch.load(
                dir_path, self.keys, self._scann_options_in_use()
            )

    def _scann_options_in_use(self):
        return search_lib.resolve_scann_options(self.memory_size, self.key_dim, self.scann_options)

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
                "search": self.search,
                "sparse_residuals": self.sparse_residuals,
                "memory_size": self.memory_size,
                "key_dim": self.key_dim,
                "num_outputs": self.num_outputs,
                "chunk_size": self.chunk_size,
                "scann_options": self.scann_options,
                "ivf_options": self.ivf_options,
            }
        )
        return config


# Rows written to the variables at once by `memorize` (bounds its temporary memory).
_WRITE_ROWS = 16384


def _unwritten(shape, dtype=None):
    """An uninitialized tensor (every entry is written before the memory is used)."""
    return tf.raw_ops.Empty(shape=shape, dtype=dtype or "float32", init=False)


def _tensor_bytes(tensor):
    array = np.asarray(tensor)
    if array.dtype == object:  # tf.string: serialized protos
        return sum(len(b) for b in array.reshape(-1))
    return int(array.nbytes)


def _aligned_empty(shape, dtype, align=64):
    """An uninitialized C-contiguous array whose data starts on an `align`-byte boundary.

    TensorFlow shares, rather than copies, the memory of an array this aligned
    (`_adopt`). Its pages take RAM only as they are written.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


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


class _BlockBuffer:
    """Rows appended into blocks of about 64 MB.

    Blocks that large are mapped from the OS on their own and given back when
    freed; a list of small per-batch arrays would stay in the allocator's
    heap after it is freed, and the process would hold the memory twice.
    """

    BLOCK_BYTES = 64 * 2**20

    def __init__(self, row_shape, dtype):
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        row_bytes = max(1, math.prod(self.row_shape) * self.dtype.itemsize)
        self.block_rows = max(1, self.BLOCK_BYTES // row_bytes)
        self.blocks, self.filled = [], 0

    def append(self, rows):
        while len(rows):
            if not self.blocks or self.filled == self.block_rows:
                self.blocks.append(np.empty((self.block_rows, *self.row_shape), self.dtype))
                self.filled = 0
            take = min(len(rows), self.block_rows - self.filled)
            self.blocks[-1][self.filled : self.filled + take] = rows[:take]
            self.filled += take
            rows = rows[take:]

    def pop_blocks(self):
        """Yields the filled rows block by block, dropping each block."""
        self.blocks.reverse()
        while self.blocks:
            block = self.blocks.pop()
            yield block if self.blocks else block[: self.filled]


class _MemoryWriter:
    """Streams entries into a `ResidualMemory`, a batch at a time.

    With `capacity` (the number of entries) known in advance, each batch is
    written straight into arrays of the memory's full size, which the
    variables then take over (`_adopt`): only the memory itself and one batch
    are ever held. Without it, batches are kept in blocks as they come and
    copied into those arrays at the end, each block freed once copied; the
    arrays' pages take RAM only as they are written, so the memory is never
    held twice there either.
    """

    def __init__(self, memory, capacity=None):
        self.memory = memory
        self.capacity = capacity
        self.count = 0
        self.buffers = None
        self.arrays = None

    def write(self, keys, scores, targets):
        """Adds entries: `keys (b, d)` float32, `scores (b, c)`, validated `targets`."""
        if len(keys) == 0:
            return
        self.memory._check_num_outputs(scores.shape[1])
        arrays = {"keys": keys, **self.memory._entry_arrays(scores, targets)}
        if self.count == 0:
            self.key_dim, self.num_outputs = keys.shape[1], scores.shape[1]
            self.row_specs = {name: (a.shape[1:], a.dtype) for name, a in arrays.items()}
            if self.capacity is not None:
                self.memory._allocate(self.capacity, self.key_dim, self.num_outputs)
                self.arrays = self._full_arrays(self.capacity)
            else:
                self.buffers = {name: _BlockBuffer(*spec) for name, spec in self.row_specs.items()}
        if self.capacity is not None:
            if self.count + len(keys) > self.capacity:
                raise ValueError(
                    f"The data gave more memory entries than the {self.capacity} expected."
                )
            for name, values in arrays.items():
                self.arrays[name][self.count : self.count + len(keys)] = values
        else:
            for name, values in arrays.items():
                self.buffers[name].append(values)
        self.count += len(keys)

    def _full_arrays(self, n):
        # In the variables' dtypes: a mixed-precision model gives float16 keys.
        return {
            name: _aligned_empty(
                (n, *row_shape),
                keras.backend.standardize_dtype(getattr(self.memory, name).dtype),
            )
            for name, (row_shape, _) in self.row_specs.items()
        }

    def close(self, verbose=0):
        """Finishes the memory and builds its search index."""
        if self.count == 0:
            raise ValueError("No memory entries: a memory needs at least one training example.")
        if self.capacity is not None and self.count != self.capacity:
            raise ValueError(
                f"The data gave {self.count} memory entries, not the {self.capacity} expected."
            )
        if self.buffers is not None:
            self.memory._allocate(self.count, self.key_dim, self.num_outputs)
            self.arrays = self._full_arrays(self.count)
            for name, buffer in self.buffers.items():
                start = 0
                for block in buffer.pop_blocks():
                    self.arrays[name][start : start + len(block)] = block
                    start += len(block)
                    del block
            self.buffers = None
        for name in list(self.arrays):
            _adopt(getattr(self.memory, name), self.arrays.pop(name))
        self.memory._build_index(verbose=verbose)
