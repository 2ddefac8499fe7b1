"""The protocol every example follows, in one place.

1. The base network is trained to convergence: early stopping on the
   validation split (carved from the training data), best weights restored,
   the learning rate cut when the validation loss stalls, and an epoch cap that
   the default models never reach. The epoch where each run stopped is
   reported.
2. ResMem is compared with the network and with the two baselines over the
   same neighbours (kNN on labels, kNN-LM-style interpolation), each with its
   settings chosen on the validation split; the test split is scored once.
"""

import time

import keras
import numpy as np

import keras_resmem

METHODS = ("resmem", "knn", "interpolation")
LABELS = {"resmem": "ResMem", "knn": "kNN on labels", "interpolation": "interpolation"}
# Validation grids. sigma is in the units of the keys' L2 distances.
SIGMAS = [0.1, 0.2, 0.4, 0.7, 1.0, 2.0, 4.0, 8.0]
TEMPERATURES = [0.5, 1.0, 1.4, 2.0, 3.0]
KNN_WEIGHTS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def grids(ks, sigmas=SIGMAS, temperatures=TEMPERATURES):
    """The validation grid of each method over the given values."""
    return {
        "resmem": {"k": ks, "sigma": sigmas, "temperature": temperatures},
        "knn": {"k": ks, "sigma": sigmas},
        "interpolation": {
            "k": ks,
            "sigma": sigmas,
            "temperature": temperatures,
            "knn_weight": KNN_WEIGHTS,
        },
    }


def train_to_convergence(
    model,
    train,
    validation,
    *,
    max_epochs=300,
    patience=6,
    lr_patience=2,
    batch_size=128,
    sample_weight=None,
    callbacks=(),
    verbose=2,
):
    """Fits `model` (compiled) until the validation loss stops improving.

    Early stopping after `patience` epochs without a validation-loss
    improvement of at least 1e-4, best weights restored; the learning rate is
    divided by 3 after `lr_patience` such epochs (down to 1e-5), so training
    ends at a small learning rate. `train` and `validation` are `(x, y)`
    tuples (`validation` may be `(x, y, sample_weight)`) or `tf.data`
    datasets; `sample_weight` weighs `train`'s examples, and `callbacks` run
    before the two above (e.g. a warm-up).

    Returns:
        A dict: `epochs_run`, `best_epoch` (1-based, the weights kept),
        `capped` (True if `max_epochs` stopped it: not converged), `seconds`,
        the best `val_loss` and the `final_learning_rate`.
    """
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, min_delta=1e-4, restore_best_weights=True
    )
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", factor=1 / 3, patience=lr_patience, min_delta=1e-4, min_lr=1e-5
    )
    start = time.perf_counter()
    fit_args = {
        "epochs": max_epochs,
        "validation_data": validation,
        "callbacks": [*callbacks, plateau, stop],
        "verbose": verbose,
    }
    if isinstance(train, tuple):
        history = model.fit(*train, batch_size=batch_size, sample_weight=sample_weight, **fit_args)
    else:
        history = model.fit(train, **fit_args)
    losses = history.history["val_loss"]
    epochs_run = len(losses)
    result = {
        "epochs_run": epochs_run,
        "best_epoch": int(np.argmin(losses)) + 1,
        "capped": epochs_run == max_epochs and stop.stopped_epoch == 0,
        "seconds": time.perf_counter() - start,
        "val_loss": float(min(losses)),
        "final_learning_rate": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
    }
    if result["capped"]:
        print(
            f"WARNING: training hit the {max_epochs}-epoch cap before the validation loss "
            "stopped improving: the network is not converged."
        )
    return result


def choose_methods(memory, features, x_val, y_val, grids_by_method, batch_size=512):
    """Each method's setting chosen on validation, from one search of the memory.

    Returns:
        A dict from method to `keras_resmem.tuning.Choice`.
    """
    max_k = max(max(g["k"]) for g in grids_by_method.values())
    embeddings, scores = features.predict(x_val, batch_size=batch_size, verbose=0)
    cache = keras_resmem.tuning.NeighborCache(memory, embeddings, scores, max_k)
    return cache.choose_all(y_val, grids_by_method)


def score_methods(model, memory, choices, x, y, deepnet_scores, batch_size=1024):
    """Scores each chosen method once, through the model itself (`Choice.apply`).

    Returns:
        A dict from method to `keras_resmem.Comparison` against DeepNet.
    """
    predictions = {}
    for method, choice in choices.items():
        choice.apply(memory)
        predictions[method] = model.predict(x, batch_size=batch_size, verbose=0)
    return keras_resmem.compare(y, deepnet_scores, predictions)


def mean_std(values):
    """`(mean, standard deviation)` over seeds (0 for one seed)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def pct(values, signed=False):
    """`"m.mm ± s.ss%"` over seeds (`"+m.mm ± s.ss"` points with `signed`)."""
    mean, std = mean_std(np.asarray(values) * 100)
    if signed:
        return f"{mean:+.2f} ± {std:.2f}"
    return f"{mean:.2f} ± {std:.2f}%"
