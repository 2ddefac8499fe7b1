"""The main job: a small CNN on Fashion-MNIST, with and without a residual memory.

Trains a CNN of under 20k parameters to convergence (early stopping on a
validation split carved from the training data, best weights restored), attaches
a ResMem memory of its training residuals, and compares it on the test set,
once, with DeepNet and with the two baselines over the same neighbours: kNN on
labels and kNN-LM-style interpolation. Each method's key layer and settings are
chosen on the validation split. With several `--seeds`, reports mean ± std.
Writes `results.json`, `results.md`, the saved `resmem.keras` and a SavedModel
for TensorFlow Serving (`saved_model/1`, stock TensorFlow ops) to --output-dir
(one sub-folder per seed when there are several).

    python examples/fashion_mnist.py                  # one seed: 60-85 epochs, then the memory
    python examples/fashion_mnist.py --seeds 0,1,2    # the README's table

The memory's key layer is itself a hyperparameter, chosen on validation among
--layers (the paper keys on the pre-logit layer; a wider feature map can give
the memory a better notion of "near").
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import keras_resmem
from keras_resmem import _io
from keras_resmem.datasets import load_fashion_mnist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _protocol as protocol  # noqa: E402


def build_cnn(width=16, embedding_dim=32, num_classes=10):
    """A small CNN; its 'pre_logits' layer is the memory's key."""
    inputs = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Conv2D(width, 3, activation="relu", padding="same", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(2 * width, 3, activation="relu", padding="same", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Conv2D(2 * width, 3, activation="relu", padding="same", name="conv3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    x = keras.layers.Dense(embedding_dim, activation="relu", name="pre_logits")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="fashion_cnn")


def train_cnn(base, train, validation, args, seed):
    """Compiles the main job's CNN and trains it to convergence (early stopping on validation).

    `args` gives `max_epochs`, `patience`, `batch_size` and `verbose`.
    Returns `examples/_protocol.py`'s `train_to_convergence` summary.
    """
    base.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    training = protocol.train_to_convergence(
        base,
        train,
        validation,
        max_epochs=args.max_epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        verbose=2 if args.verbose else 0,
    )
    print(
        f"[seed {seed}] DeepNet stopped after {training['epochs_run']} epochs (best weights: "
        f"epoch {training['best_epoch']}, {training['seconds']:.0f} s)",
        flush=True,
    )
    return training


def load_splits(val_size, seed):
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    prep = lambda x: (x.astype("float32") / 255.0)[..., None]  # noqa: E731
    order = np.random.default_rng(seed).permutation(len(x_train))
    val, train = order[:val_size], order[val_size:]
    return (
        (prep(x_train[train]), y_train[train].astype("int32")),
        (prep(x_train[val]), y_train[val].astype("int32")),
        (prep(x_test), y_test.astype("int32")),
    )


def export_and_check(resmem, path, x):
    """Exports a SavedModel for TensorFlow Serving and checks it against the Keras model."""
    memory = resmem.get_layer("residual_memory")
    mode = "portable" if memory.search.portable else "scann"
    keras_resmem.export_saved_model(resmem, path, mode=mode, overwrite=True)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    batch = x[:256]
    served = serve(image=tf.constant(batch))["class_ids"].numpy()
    agree = float((served == resmem.predict(batch, verbose=0).argmax(-1)).mean())
    print(f"Exported {path} ({mode}); its classes agree with the Keras model on {agree:.0%}")
    return {"path": path, "mode": mode, "class_agreement_256_test_images": agree}


def run_seed(args, seed, output_dir):
    """One seed: trains DeepNet to convergence, attaches a memory per candidate
    layer, chooses each method's layer and settings on validation, scores the
    test set once. Saves and exports the chosen ResMem model."""
    seed_start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    os.makedirs(output_dir, exist_ok=True)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_splits(args.val_size, seed)
    if args.train_size:
        x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]

    base = build_cnn()
    print(
        f"[seed {seed}] DeepNet: {base.count_params():,} parameters; {len(x_train):,} training, "
        f"{len(x_val):,} validation, {len(x_test):,} test images"
    )
    training = train_cnn(base, (x_train, y_train), (x_val, y_val), args, seed)

    # Everything below is chosen on the validation split only, for each method
    # on its own: the layer the memory is keyed on, k, sigma (and T, lambda).
    # For each candidate layer the network runs once over the training set
    # (attach_memory) and once over the validation set; the memory is
    # searched once, for the largest k.
    grids = protocol.grids(args.ks)
    best, per_layer, attach_seconds, choose_seconds, models = {}, {}, {}, {}, {}
    for layer in args.layers.split(","):
        start = time.perf_counter()
        resmem = keras_resmem.attach_memory(
            base, layer, (x_train, y_train), search=args.search, verbose=0
        )
        attach_seconds[layer] = time.perf_counter() - start
        memory = resmem.get_layer("residual_memory")
        features = keras.Model(base.inputs, [base.get_layer(layer).output, base.output])
        start = time.perf_counter()
        choices = protocol.choose_methods(memory, features, x_val, y_val, grids)
        choose_seconds[layer] = time.perf_counter() - start
        per_layer[layer] = {
            "key_dim": memory.key_dim,
            **{m: {"settings": c.settings, "val": c.accuracy} for m, c in choices.items()},
        }
        print(
            f"[seed {seed}] {layer!r} ({memory.key_dim}-d keys; attached in "
            f"{attach_seconds[layer]:.0f} s, chosen in {choose_seconds[layer]:.0f} s), "
            "validation accuracy: "
            + ", ".join(f"{protocol.LABELS[m]} {c.accuracy:.2%}" for m, c in choices.items())
        )
        models[layer] = resmem
        for method, choice in choices.items():
            if method not in best or choice.accuracy > best[method][1].accuracy:
                best[method] = (layer, choice)
    # Only the chosen layers' memories are kept.
    models = {layer: models[layer] for layer, _ in best.values()}

    predict = lambda m, x: m.predict(x, batch_size=1024, verbose=0)  # noqa: E731
    # Training accuracy on a random subset: each image is a search of the
    # whole memory, and with 1568-d keys the full set takes minutes a method.
    subset = np.random.default_rng(seed).permutation(len(x_train))[: args.train_eval_size]
    x_train_eval, y_train_eval = x_train[subset], y_train[subset]
    deepnet_test, deepnet_train = predict(base, x_test), predict(base, x_train_eval)
    test, train = {}, {}
    for method, (layer, choice) in best.items():
        model = models[layer]
        choice.apply(model.get_layer("residual_memory"))
        test[method] = keras_resmem.compare(y_test, deepnet_test, predict(model, x_test))
        train[method] = keras_resmem.compare(
            y_train_eval, deepnet_train, predict(model, x_train_eval)
        )

    print(
        f"[seed {seed}] test: DeepNet {test['resmem'].deepnet_accuracy:.2%}, "
        + ", ".join(f"{protocol.LABELS[m]} {c.resmem_accuracy:.2%}" for m, c in test.items())
        + f" ({time.perf_counter() - seed_start:.0f} s)",
        flush=True,
    )
    layer, choice = best["resmem"]
    resmem = models[layer]
    choice.apply(resmem.get_layer("residual_memory"))
    memory = resmem.get_layer("residual_memory")
    path = os.path.join(output_dir, "resmem.keras")
    _io.save_model(resmem, path)
    export = export_and_check(resmem, os.path.join(output_dir, "saved_model", "1"), x_test)
    return {
        "seed": seed,
        "deepnet_parameters": base.count_params(),
        "training": training,
        "train_size": len(x_train),
        "val_size": len(x_val),
        "train_eval_size": len(x_train_eval),
        "memory_entries": memory.memory_size,
        "search_backend": memory.search_backend,
        "chosen": {
            m: {
                "layer": lay,
                "key_dim": per_layer[lay]["key_dim"],
                "settings": c.settings,
                "val_accuracy": c.accuracy,
            }
            for m, (lay, c) in best.items()
        },
        "per_layer_validation": per_layer,
        "test": {
            "deepnet_accuracy": test["resmem"].deepnet_accuracy,
            **{
                m: {"accuracy": c.resmem_accuracy, "tpr": c.tpr, "fpr": c.fpr, "gain": c.gain}
                for m, c in test.items()
            },
        },
        "train": {
            "deepnet_accuracy": train["resmem"].deepnet_accuracy,
            **{m: {"accuracy": c.resmem_accuracy} for m, c in train.items()},
        },
        "seconds": {
            "train": training["seconds"],
            "attach_memory": attach_seconds,
            "choose_on_validation": choose_seconds,
            "seed": time.perf_counter() - seed_start,
        },
        "saved_model": path,
        "export": export,
    }


def summary_table(runs):
    """Markdown: DeepNet, ResMem and the baselines, mean ± std over the runs' seeds."""
    col = lambda f: [f(r) for r in runs]  # noqa: E731
    lines = [
        "| model | test accuracy | TPR | FPR | gain (points) | training accuracy |",
        "|---|---|---|---|---|---|",
        f"| DeepNet | {protocol.pct(col(lambda r: r['test']['deepnet_accuracy']))} | - | - | - "
        f"| {protocol.pct(col(lambda r: r['train']['deepnet_accuracy']))} |",
    ]
    for m in protocol.METHODS:
        t = lambda key, m=m: col(lambda r: r["test"][m][key])  # noqa: E731
        lines.append(
            f"| {protocol.LABELS[m]} | {protocol.pct(t('accuracy'))} | {protocol.pct(t('tpr'))} "
            f"| {protocol.pct(t('fpr'))} | {protocol.pct(t('gain'), signed=True)} "
            f"| {protocol.pct(col(lambda r, m=m: r['train'][m]['accuracy']))} |"
        )
    margin = [
        r["test"]["resmem"]["accuracy"]
        - max(r["test"]["knn"]["accuracy"], r["test"]["interpolation"]["accuracy"])
        for r in runs
    ]
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines += [
        "",
        f"ResMem minus the better baseline (per seed): {protocol.pct(margin, signed=True)} "
        f"points. Seeds {seeds}; mean ± standard deviation over seeds.",
        "",
        "| seed | epochs run (best) | "
        + " | ".join(f"{protocol.LABELS[m]}: layer, settings" for m in protocol.METHODS)
        + " |",
        "|---|---|" + "---|" * len(protocol.METHODS),
    ]
    for r in runs:
        cells = [
            f"{c['layer']}, " + ", ".join(f"{k}={v:g}" for k, v in c["settings"].items())
            for c in (r["chosen"][m] for m in protocol.METHODS)
        ]
        lines.append(
            f"| {r['seed']} | {r['training']['epochs_run']} ({r['training']['best_epoch']}) | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", default="0", help="comma-separated seeds; several give mean ± std"
    )
    parser.add_argument("--max-epochs", type=int, default=300, help="cap; never reached")
    parser.add_argument("--patience", type=int, default=8, help="early stopping, on val loss")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--val-size", type=int, default=6000)
    parser.add_argument("--train-size", type=int, default=None, help="use a subset (smoke runs)")
    parser.add_argument("--search", default="auto", choices=["auto", "exact", "ivf", "scann"])
    parser.add_argument(
        "--layers",
        default="pre_logits,pooled,pool2",
        help="comma-separated candidate layers to key the memory on; chosen on validation",
    )
    parser.add_argument(
        "--ks", default="10,25,50,100", type=lambda s: [int(k) for k in s.split(",")]
    )
    parser.add_argument(
        "--train-eval-size", type=int, default=10000, help="training images scored for accuracy"
    )
    parser.add_argument("--verbose", action="store_true", help="print every training epoch")
    parser.add_argument("--output-dir", default="results/fashion_mnist")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]

    start = time.perf_counter()
    runs = []
    for seed in seeds:
        out = args.output_dir if len(seeds) == 1 else os.path.join(args.output_dir, f"seed{seed}")
        runs.append(run_seed(args, seed, out))
    table = summary_table(runs)
    seconds = time.perf_counter() - start
    command = (
        f"python examples/fashion_mnist.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    print("\n" + table + "\n")
    print(f"{seconds:.0f} s in all")
    results = {"command": command.strip(), "seconds": seconds, "runs": runs}
    os.makedirs(args.output_dir, exist_ok=True)
    with _io.atomic_path(os.path.join(args.output_dir, "results.md")) as tmp, open(tmp, "w") as f:
        f.write(
            f"# Fashion-MNIST: DeepNet, ResMem and the kNN baselines\n\n`{command.strip()}`\n\n"
            f"DeepNet trained to convergence (early stopping on {args.val_size:,} validation "
            f"images carved from the training set, best weights restored); each method's key "
            f"layer and settings chosen on the same validation images; test set scored once. "
            f"Training accuracy on {runs[0]['train_eval_size']:,} random training images. "
            f"{seconds:.0f} s.\n\n{table}\n"
        )
    with _io.atomic_path(os.path.join(args.output_dir, "results.json")) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    print(
        f"Saved the ResMem model(s), SavedModel(s) for TensorFlow Serving and results to "
        f"{args.output_dir}/"
    )
    return results


if __name__ == "__main__":
    main()
