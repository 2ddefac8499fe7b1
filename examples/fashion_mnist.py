"""The main job: a small CNN on Fashion-MNIST, with and without a residual memory.

Trains a CNN of under 20k parameters for a few epochs, attaches a ResMem
memory of its training residuals, chooses the key layer, k, sigma and T on a
validation split carved from the training data, and reports DeepNet vs ResMem (and a plain
kNN-on-labels baseline over the same embeddings) on the test set once.
Writes `results.json`, `results.md`, the saved `resmem.keras` and a SavedModel for
TensorFlow Serving (`saved_model/1`, stock TensorFlow ops) to --output-dir.

    python examples/fashion_mnist.py            # ~3 minutes on 2 CPU cores

The memory's key layer is itself a hyperparameter, chosen on validation among
--layers (the paper keys on the pre-logit layer; a wider feature map can give
the memory a better notion of "near").
"""

import argparse
import itertools
import json
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import keras_resmem
from keras_resmem import _io
from keras_resmem import search as search_lib
from keras_resmem.datasets import load_fashion_mnist


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


def choose(evaluate, grid, y):
    """The grid point with the best accuracy of `evaluate(**point)` on (val) labels `y`."""
    best = None
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        accuracy = float((evaluate(**point).argmax(-1) == y).mean())
        if best is None or accuracy > best[1]:
            best = (point, accuracy)
    return best


def export_and_check(resmem, path, x):
    """Exports a SavedModel for TensorFlow Serving and checks it against the Keras model."""
    memory = resmem.get_layer("residual_memory")
    mode = "portable" if memory.search_backend in search_lib.PORTABLE_BACKENDS else "scann"
    keras_resmem.export_saved_model(resmem, path, mode=mode, overwrite=True)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    batch = x[:256]
    served = serve(image=tf.constant(batch))["class_ids"].numpy()
    agree = float((served == resmem.predict(batch, verbose=0).argmax(-1)).mean())
    print(f"Exported {path} ({mode}); its classes agree with the Keras model on {agree:.0%}")
    return {"path": path, "mode": mode, "class_agreement_256_test_images": agree}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--val-size", type=int, default=6000)
    parser.add_argument("--train-size", type=int, default=None, help="use a subset (smoke runs)")
    parser.add_argument("--search", default="auto", choices=["auto", "exact", "ivf", "scann"])
    parser.add_argument(
        "--layers",
        default="pre_logits,pooled,pool2",
        help="comma-separated candidate layers to key the memory on; chosen on validation",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="results/fashion_mnist")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_splits(args.val_size, args.seed)
    if args.train_size:
        x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]

    base = build_cnn()
    print(
        f"DeepNet: {base.count_params():,} parameters; {len(x_train):,} training, "
        f"{len(x_val):,} validation, {len(x_test):,} test images"
    )
    base.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    base.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_val, y_val),
        verbose=2,
    )
    train_seconds = time.perf_counter() - start

    # Everything below is chosen on the validation split only: the layer the
    # memory is keyed on, k, sigma and T. For each candidate layer the network
    # runs once over the training set (attach_memory) and once over the
    # validation set; the memory is searched once for the largest k.
    grid = {
        "k": [10, 25, 50, 100],
        "sigma": [0.1, 0.2, 0.4, 0.7, 1.0, 2.0, 4.0, 8.0],
        "temperature": [0.5, 1.0, 1.4, 2.0, 3.0],
    }
    max_k = max(grid["k"])
    best, per_layer, attach_seconds = None, {}, {}
    for layer in args.layers.split(","):
        print(f"Attaching a memory keyed on {layer!r} (one pass over the training set)...")
        start = time.perf_counter()
        resmem = keras_resmem.attach_memory(base, layer, (x_train, y_train), search=args.search)
        attach_seconds[layer] = time.perf_counter() - start
        memory = resmem.get_layer("residual_memory")
        features = keras.Model(base.inputs, [base.get_layer(layer).output, base.output])
        val = keras_resmem.tuning.NeighborCache(memory, *features.predict(x_val, verbose=0), max_k)
        chosen, val_accuracy = choose(val.predict, grid, y_val)
        per_layer[layer] = {"key_dim": memory.key_dim, "chosen": chosen, "val": val_accuracy}
        print(f"  {memory.key_dim}-d keys; best on validation {chosen}: {val_accuracy:.2%}")
        if best is None or val_accuracy > best[-1]:
            best = (layer, resmem, memory, features, val, chosen, val_accuracy)
        del resmem, memory, val
    layer, resmem, memory, features, val, chosen, val_accuracy = best
    knn_grid = {"k": grid["k"], "sigma": grid["sigma"]}
    knn_chosen, knn_val = choose(val.knn_label_scores, knn_grid, y_val)
    print(
        f"Chosen on validation: layer {layer!r}, {chosen} (val acc {val_accuracy:.2%}); "
        f"kNN-on-labels over the same keys {knn_chosen} (val acc {knn_val:.2%})"
    )

    test_cache = keras_resmem.tuning.NeighborCache(
        memory, *features.predict(x_test, verbose=0), max_k
    )
    knn_test = test_cache.knn_label_scores(**knn_chosen)
    memory.k, memory.sigma = chosen["k"], chosen["sigma"]
    memory.temperature = chosen["temperature"]
    # Large batches: each one is a (batch x memory) distance matrix.
    predict = lambda m, x: m.predict(x, batch_size=1024, verbose=0)  # noqa: E731
    test = keras_resmem.compare(y_test, predict(base, x_test), predict(resmem, x_test))
    train = keras_resmem.compare(y_train, predict(base, x_train), predict(resmem, x_train))
    knn_accuracy = float((knn_test.argmax(-1) == y_test).mean())

    path = os.path.join(args.output_dir, "resmem.keras")
    _io.save_model(resmem, path)
    export = export_and_check(resmem, os.path.join(args.output_dir, "saved_model", "1"), x_test)

    results = {
        "deepnet_parameters": base.count_params(),
        "epochs": args.epochs,
        "train_size": len(x_train),
        "memory_entries": memory.memory_size,
        "search_backend": memory.search_backend,
        "layer": layer,
        "key_dim": memory.key_dim,
        "chosen": chosen,
        "per_layer_validation": per_layer,
        "knn_chosen": knn_chosen,
        "validation": {"resmem_accuracy": val_accuracy, "knn_labels_accuracy": knn_val},
        "test": {
            "deepnet_accuracy": test.deepnet_accuracy,
            "resmem_accuracy": test.resmem_accuracy,
            "knn_labels_accuracy": knn_accuracy,
            "tpr": test.tpr,
            "fpr": test.fpr,
            "gain": test.gain,
        },
        "train": {
            "deepnet_accuracy": train.deepnet_accuracy,
            "resmem_accuracy": train.resmem_accuracy,
        },
        "seconds": {"train": train_seconds, "attach_memory": attach_seconds},
        "saved_model": path,
        "export": export,
    }
    rows = [
        ("DeepNet", test.deepnet_accuracy, train.deepnet_accuracy),
        ("ResMem", test.resmem_accuracy, train.resmem_accuracy),
        ("kNN on labels", knn_accuracy, None),
    ]
    fmt = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
    table = "\n".join(
        ["| model | test accuracy | training accuracy |", "|---|---|---|"]
        + [f"| {name} | {fmt(te)} | {fmt(tr)} |" for name, te, tr in rows]
        + [
            "",
            "| TPR | FPR | gain |",
            "|---|---|---|",
            f"| {test.tpr:.2%} | {test.fpr:.2%} | {test.gain:+.2%} |",
            "",
            f"Memory keyed on layer {layer!r} ({memory.key_dim}-d), k={chosen['k']}, "
            f"sigma={chosen['sigma']}, T={chosen['temperature']}, all chosen on "
            f"{len(x_val):,} validation images; kNN on labels: k={knn_chosen['k']}, "
            f"sigma={knn_chosen['sigma']}. Memory of {memory.memory_size:,} entries, "
            f"{memory.search_backend} search; DeepNet {base.count_params():,} parameters, "
            f"{args.epochs} epochs.",
            "",
            "| candidate layer | key dim | best k, sigma, T | validation accuracy |",
            "|---|---|---|---|",
        ]
        + [
            f"| {name} | {v['key_dim']} | {v['chosen']['k']}, {v['chosen']['sigma']}, "
            f"{v['chosen']['temperature']} | {v['val']:.2%} |"
            for name, v in per_layer.items()
        ]
    )
    print("\n" + table + "\n")
    with _io.atomic_path(os.path.join(args.output_dir, "results.md")) as tmp, open(tmp, "w") as f:
        f.write(
            f"# Fashion-MNIST: DeepNet vs ResMem\n\n`python examples/fashion_mnist.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{table}\n"
        )
    with _io.atomic_path(os.path.join(args.output_dir, "results.json")) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    print(
        f"Saved the ResMem model to {path}, its SavedModel for TensorFlow Serving to "
        f"{export['path']} ({export['mode']}), and results to {args.output_dir}/"
    )
    return results


if __name__ == "__main__":
    main()
