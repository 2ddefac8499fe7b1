"""`ResMemTuner`: Keras Tuner sweeps over a memory that is already built."""

import os

import keras
import keras_tuner
import numpy as np
import tensorflow as tf

from keras_resmem import projection as projection_lib
from keras_resmem import residuals as residuals_lib
from keras_resmem.api_export import keras_resmem_export
from keras_resmem.attach import _as_dataset, _class_ids, attach_memory
from keras_resmem.tuning.neighbor_cache import NeighborCache
from keras_resmem.tuning.objectives import (
    CLASSIFICATION_OBJECTIVES,
    REGRESSION_OBJECTIVES,
    direction,
    trial_metrics,
)


def _largest_value(hp):
    config = hp.get_config()
    if config.get("values"):
        return max(config["values"])
    if "max_value" in config:
        return config["max_value"]
    return config["value"]  # Fixed


@keras_resmem_export("keras_resmem.tuning.ResMemTuner")
class ResMemTuner(keras_tuner.engine.base_tuner.BaseTuner):
    """Keras Tuner sweeps of a memory's `k`, `sigma`, `temperature` (and `method`).

    A `keras_tuner` tuner whose trials are settings of a memory that is
    already built: the network runs once over the validation set, and the
    memory is searched once for the largest `k` of the space; each trial only
    recombines the cached neighbours' residuals. Any Keras Tuner oracle
    (random, grid, Bayesian) can drive it. Regression trials report
    `val_mse`, `val_mae` and DeepNet's `val_deepnet_mse`; classification
    trials report `val_accuracy`,
    `val_gain` (ResMem minus DeepNet), `val_tpr`, `val_fpr` and
    `val_tpr_at_fpr`: the TPR where FPR < `fpr_bound`, and `-FPR` otherwise,
    so a setting that breaks the bound ranks below every one that keeps it
    without failing. With `tensorboard=True` each trial is logged for the
    TensorBoard HParams dashboard under `<project_dir>/tensorboard`.

    `method` sweeps the baselines instead of ResMem, or lets the search pick
    among several methods (a `method` hyperparameter): `"knn"` (kNN on
    labels) and `"interpolation"` (kNN-LM-style, with a `knn_weight`
    hyperparameter); see `keras_resmem.ResidualMemory`. A hyperparameter the
    trial's method does not use is ignored.

    `layers` tunes the key layer too: one memory is built per candidate layer
    from `train_data` (the model's own memory is reused for its layer), and a
    `layer` hyperparameter chooses among them. Distances differ from layer to
    layer, so `sigma` is then searched as `sigma_scale`, a multiple of each
    layer's median nearest-neighbour distance (`sigma = sigma_scale * scale`);
    `load_model` and `get_best_models` give the absolute `sigma`.

    `key_projections` tunes the memory's key projection the same way: one
    memory per candidate from `train_data`, each a
    `keras_resmem.projection.PCA(dim)` or None, chosen by a
    `key_projection` hyperparameter that holds the `dim` (0 for None).
    With both `layers` and `key_projections`, every pair is a candidate.

    Args:
        model: the model returned by `keras_resmem.attach_memory`.
        validation_data: carved from the training data, in any form
            `attach_memory` takes: arrays `(x_val, y_val)` or a `tf.data.Dataset`
            of `(x, y)`; integer or one-hot labels (regression: targets).
        objective: with no `oracle`: classification `"val_accuracy"` (the
            default), `"val_gain"` or `"val_tpr_at_fpr"` (maximised);
            regression `"val_mse"` (the default) or `"val_mae"` (minimised).
        fpr_bound: the FPR bound of `val_tpr_at_fpr` (the paper's 0.05).
        method: `"resmem"`, `"knn"`, `"interpolation"`, or a list of them to
            choose among.
        oracle: a `keras_tuner` oracle; its objective names one of the metrics
            above with `direction="max"`. Default: random search.
        max_trials, seed: of the default random-search oracle.
        hyperparameters: a `keras_tuner.HyperParameters` with `k`, `sigma`,
            `temperature` (ResMem and interpolation), `knn_weight`
            (interpolation) and `method` (several methods); default
            `default_hyperparameters()`.
        layers: optional names of candidate key layers (as `attach_memory`
            takes them) to choose among.
        key_projections: optional candidate key projections to choose
            among: dims (or `keras_resmem.projection.PCA`), None for none.
        train_data: with `layers` or `key_projections`: the data the memories are built from, as
            `attach_memory` takes it (the data `model`'s memory holds).
        memory_layer: the name of the `ResidualMemory` layer in `model`.
        batch_size: batch size of the one pass over the validation set.
        tensorboard: whether to write HParams logs.
        directory, project_name, overwrite: as for every Keras Tuner tuner;
            a search with `overwrite=False` resumes where it stopped.

    Example:

    >>> import keras, keras_tuner, numpy as np
    >>> import keras_resmem
    >>> inputs = keras.Input((4,))
    >>> h = keras.layers.Dense(8, activation="relu", name="pre_logits")(inputs)
    >>> base = keras.Model(inputs, keras.layers.Dense(3)(h))
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(300, 4)).astype("float32"), rng.integers(0, 3, 300)
    >>> model = keras_resmem.attach_memory(base, "pre_logits", (x[:200], y[:200]), verbose=0)
    >>> import tempfile
    >>> tuner = keras_resmem.tuning.ResMemTuner(
    ...     model, (x[200:], y[200:]), objective="val_tpr_at_fpr", max_trials=5,
    ...     directory=tempfile.mkdtemp(), tensorboard=False)
    >>> tuner.search(verbose=0)
    >>> best = tuner.get_best_hyperparameters()[0].values
    >>> sorted(best)
    ['k', 'sigma', 'temperature']
    """

    def __init__(
        self,
        model,
        validation_data,
        *,
        objective=None,
        method="resmem",
        fpr_bound=0.05,
        oracle=None,
        max_trials=100,
        hyperparameters=None,
        seed=None,
        layers=None,
        key_projections=None,
        train_data=None,
        memory_layer="residual_memory",
        batch_size=1024,
        tensorboard=True,
        directory=None,
        project_name=None,
        overwrite=False,
    ):
        try:
            self.memory = model.get_layer(memory_layer)
        except ValueError:
            raise ValueError(
                f"`model` has no layer {memory_layer!r}; pass the model returned by "
                "`keras_resmem.attach_memory`, or name its ResidualMemory layer with "
                f"`memory_layer`. Layers: {[layer.name for layer in model.layers]}"
            ) from None
        methods = [method] if isinstance(method, str) else list(method)
        if not methods or any(m not in residuals_lib.METHODS for m in methods):
            raise ValueError(
                f"`method` must be one of {residuals_lib.METHODS}, or a list of them. "
                f"Received: method={method!r}"
            )
        self.methods = methods
        if not (isinstance(fpr_bound, float | int) and 0 < fpr_bound <= 1):
            raise ValueError(f"`fpr_bound` must be in (0, 1]. Received: fpr_bound={fpr_bound!r}")
        regression = self.memory.task == "regression"
        valid = REGRESSION_OBJECTIVES if regression else (CLASSIFICATION_OBJECTIVES)
        if oracle is None:
            objective = objective or valid[0]
            if objective not in valid:
                raise ValueError(
                    f"`objective` must be one of {valid} for a {self.memory.task} memory. "
                    f"Received: objective={objective!r}"
                )
            oracle = keras_tuner.oracles.RandomSearchOracle(
                objective=keras_tuner.Objective(objective, direction=direction(objective)),
                max_trials=max_trials,
                seed=seed,
            )
        self.model = model
        self.validation_data = validation_data
        self.fpr_bound = float(fpr_bound)
        self.batch_size = batch_size
        self.tensorboard = tensorboard
        self._caches = None
        self._scales = {}  # each memory's distance scale, by id
        # `{candidate: (model, memory)}`; one entry, keyed None, without `layers`
        # and `key_projections`. A candidate is a layer name, a projection dim
        # (0: none), or with both a `(layer, dim)` pair.
        self.candidates = {None: (model, self.memory)}
        self._tuned = ()
        if layers is not None or key_projections is not None:
            self.candidates = self._build_candidates(layers, key_projections, train_data)
        super().__init__(
            oracle,
            directory=directory,
            project_name=project_name or "resmem",
            overwrite=overwrite,
        )
        space = hyperparameters or self.default_hyperparameters()
        missing = self._required_names() - {hp.name for hp in space.space}
        if missing:
            raise ValueError(
                f"`hyperparameters` must define {sorted(self._required_names())} for "
                f"method={method!r}; missing {sorted(missing)}."
            )
        self.oracle.update_space(space)

    def _build_candidates(self, layers, key_projections, train_data):
        """One memory per key layer and projection, with the tuned memory's settings."""
        memory = self.memory
        embedding, output = memory.input
        own = embedding._keras_history.operation.name
        own_dim = 0 if memory.key_projection is None else memory.key_projection.dim
        tuned = []
        if layers is not None:
            layers = [layers] if isinstance(layers, str) else list(layers)
            if not layers or len(set(layers)) != len(layers):
                raise ValueError(
                    "`layers` must be a non-empty list of distinct layer names. "
                    f"Received: {layers!r}"
                )
            tuned.append("layer")
        if key_projections is not None:
            dims = [_projection_dim(p) for p in list(key_projections)]
            if not dims or len(set(dims)) != len(dims):
                raise ValueError(
                    "`key_projections` must be a non-empty list of distinct dims (None for no "
                    f"projection). Received: key_projections={key_projections!r}"
                )
            tuned.append("key_projection")
        if train_data is None:
            raise ValueError(
                f"`{'` and `'.join(n + 's' for n in tuned)}` builds one memory per candidate "
                "from `train_data`, the data the model's memory was built from; pass "
                "`train_data`."
            )
        self._tuned = tuple(tuned)
        base = keras.Model(self.model.inputs, output, name=self.model.name)
        candidates = {}
        for layer in layers or [own]:
            for dim in dims if key_projections is not None else [own_dim]:
                key = self._candidate_key({"layer": layer, "key_projection": dim})
                if layer == own and dim == own_dim:
                    candidates[key] = (self.model, memory)
                    continue
                resmem = self._attach(base, layer, dim, train_data)
                candidates[key] = (resmem, resmem.get_layer("residual_memory"))
        return candidates

    def _candidate_key(self, values):
        """The candidate of a trial (`values`: its hyperparameters)."""
        key = tuple(values[name] for name in self._tuned)
        return key[0] if len(key) == 1 else (key or None)

    def _attach(self, base, layer, dim, train_data):
        memory = self.memory
        return attach_memory(
            base,
            layer,
            train_data,
            k=memory.k,
            sigma=memory.sigma,
            temperature=memory.temperature,
            task=memory.task,
            from_logits=memory.from_logits,
            search=memory.search.clone(),
            sparse_residuals=memory.sparse_residuals,
            key_projection=dim or None,
            batch_size=self.batch_size,
            verbose=0,
        )

    @property
    def _layered(self):
        return None not in self.candidates

    def _required_names(self):
        names = {"k", "sigma_scale" if self._layered else "sigma", *self._tuned}
        # A sparse memory's ResMem temperature is fixed when it is built.
        uses_temperature = {"interpolation"} | (
            set() if self.memory.sparse_residuals is not None else {"resmem"}
        )
        if self.memory.task == "classification" and uses_temperature & set(self.methods):
            names.add("temperature")
        if "interpolation" in self.methods:
            names.add("knn_weight")
        if len(self.methods) > 1:
            names.add("method")
        return names

    def default_hyperparameters(self):
        """k in [1, 200] and sigma, T on log scales; sigma around the memory's spacing.

        A sparse memory's temperature is fixed when it is built, so ResMem on
        it tunes only `k` and `sigma`. With interpolation, `knn_weight` in
        [0, 1]; with several methods, a `method` choice.
        """
        hp = keras_tuner.HyperParameters()
        names = self._required_names()
        if "layer" in names:
            hp.Choice("layer", list(dict.fromkeys(self._candidate_layers())))
        if "key_projection" in names:
            hp.Choice("key_projection", list(dict.fromkeys(self._candidate_dims())))
        if "method" in names:
            hp.Choice("method", self.methods)
        smallest = min(memory.memory_size for _, memory in self.candidates.values())
        hp.Int("k", 1, min(200, smallest), sampling="log")
        if "sigma_scale" in names:
            hp.Float("sigma_scale", 1 / 20, 20.0, sampling="log")
        else:
            scale = self._distance_scale(self.memory)
            hp.Float("sigma", scale / 20, scale * 20, sampling="log")
        if "temperature" in names:
            hp.Float("temperature", 0.1, 5.0, sampling="log")
        if "knn_weight" in names:
            hp.Float("knn_weight", 0.0, 1.0)
        return hp

    def _candidate_layers(self):
        keys = list(self.candidates)
        return [k[0] for k in keys] if len(self._tuned) == 2 else keys

    def _candidate_dims(self):
        keys = list(self.candidates)
        return [k[1] for k in keys] if len(self._tuned) == 2 else keys

    def _trial_memory(self, values):
        """`(model, memory)` of a trial's key layer and projection."""
        return self.candidates[self._candidate_key(values)]

    def _trial_settings(self, values):
        """The `NeighborCache.predict` (and memory attribute) settings of a trial."""
        method = values.get("method", self.methods[0])
        _, memory = self._trial_memory(values)
        if self._layered:
            sigma = values["sigma_scale"] * self._distance_scale(memory)
        else:
            sigma = values["sigma"]
        settings = {"method": method, "k": values["k"], "sigma": sigma}
        if method == "resmem" and memory.sparse_residuals is not None:
            settings["temperature"] = memory.temperature
        elif method != "knn" and "temperature" in values:
            settings["temperature"] = values["temperature"]
        if method == "interpolation":
            settings["knn_weight"] = values["knn_weight"]
        return settings

    def _distance_scale(self, memory):
        """Median distance from a memory entry to its nearest other entry (cached)."""
        scales = self._scales
        if id(memory) not in scales:
            n = memory.memory_size
            ids = np.random.default_rng(0).permutation(n)[:256]
            sample = tf.gather(memory.keys, ids)  # 256 rows, not a copy of the table
            # Stored keys, already projected if the memory projects: searched as they are.
            _, distances = memory._search_neighbors(sample, min(2, n), memory.search)
            scale = float(np.median(distances.numpy()[:, -1]))
            scales[id(memory)] = scale if scale > 0 else 1.0
        return scales[id(memory)]

    def on_search_begin(self):
        super().on_search_begin()
        if self._caches is not None:
            return
        k_space = next(hp for hp in self.oracle.get_space().space if hp.name == "k")
        max_k = int(_largest_value(k_space))
        self._caches = {}
        for layer, (model, memory) in self.candidates.items():
            embeddings, scores, y_val = self._validation_outputs(model, memory)
            self._caches[layer] = NeighborCache(
                memory, embeddings, scores, max_k, batch_size=self.batch_size
            )
        num_outputs = self.memory.num_outputs
        scores = scores.reshape(-1, num_outputs)
        if self.memory.task == "regression":
            self._y_val = y_val.reshape(-1, num_outputs).astype(np.float32)
            self._deepnet = scores
        else:
            self._y_val = _class_ids(y_val.reshape(len(scores), -1), num_outputs, 0).reshape(-1)
            self._deepnet = scores.argmax(-1)

    def _validation_outputs(self, model, memory):
        """The network's embeddings and outputs on the validation data, and its labels.

        The same forms as `attach_memory`: arrays `(x, y)`, or a `tf.data.Dataset`
        of `(x, y)` (batched or not), read once; integer or one-hot labels.
        """
        features = keras.Model(model.inputs, memory.input)
        data = self.validation_data
        dataset = _as_dataset(data, self.batch_size, len(self.model.inputs[0].shape))
        parts = [[], [], []]
        for batch in dataset:
            for part, value in zip(parts, (*features.predict_on_batch(batch[0]), batch[1]),
                                   strict=True):  # fmt: skip
                part.append(np.asarray(value))
        if not parts[0]:
            raise ValueError("`validation_data` is empty.")
        return tuple(np.concatenate(part) for part in parts)

    def run_trial(self, trial, *args, **kwargs):
        values = trial.hyperparameters.values
        cache = self._caches[self._candidate_key(values)]
        scores = cache.predict(**self._trial_settings(values))
        metrics = trial_metrics(
            self._y_val, self._deepnet, scores, self.fpr_bound, task=self.memory.task
        )
        if self.tensorboard:
            self._log_tensorboard(trial, metrics)
        return metrics

    def _log_tensorboard(self, trial, metrics):
        from tensorboard.plugins.hparams import api as hparams_api

        log_dir = os.path.join(self.project_dir, "tensorboard", f"trial_{trial.trial_id}")
        with tf.summary.create_file_writer(log_dir).as_default():
            hparams_api.hparams(dict(trial.hyperparameters.values), trial_id=trial.trial_id)
            for name, value in metrics.items():
                tf.summary.scalar(name, value, step=0)

    def save_model(self, trial_id, model, step=0):
        pass  # a trial is three numbers; the model never changes

    def load_model(self, trial):
        """A model with the trial's method, k, sigma (and T, weight).

        A new model for each trial, whose memory layer shares the memory and
        index of the tuned model (nothing is copied); the tuned model is not
        changed.
        """
        values = trial.hyperparameters.values
        model, tuned = self._trial_memory(values)
        memory = tuned._with_settings(**self._trial_settings(values))
        return keras.Model(model.inputs, memory(tuned.input), name=model.name)


def _projection_dim(value):
    """A candidate key projection as its dim, 0 for None."""
    projection = projection_lib.get(value)
    return 0 if projection is None else projection.dim
