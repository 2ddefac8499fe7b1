"""Real embeddings for the search benchmarks: augmented Fashion-MNIST through a trained CNN.

`fashion_mnist_embeddings(copies)` trains the main job's CNN (examples/fashion_mnist.py)
on the 60,000 training images, then embeds `copies` augmented copies of each
(shifts of up to 3 pixels and horizontal flips), giving `60,000 * copies` keys from
its 32-d `pre_logits` layer, and the 10,000 test images as queries. Arrays are
cached under `results/benchmarks/` as `.npy` files (no pickle), keyed by the settings.
"""

import itertools
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import keras  # noqa: E402

from keras_resmem import _io  # noqa: E402
from keras_resmem.datasets import load_fashion_mnist  # noqa: E402


def _augmentations(copies, seed):
    """`copies` distinct (dy, dx, flip) triples, the identity first."""
    combos = [c for c in itertools.product(range(-3, 4), range(-3, 4), (False, True))]
    combos.remove((0, 0, False))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(combos), size=copies - 1, replace=False)
    return [(0, 0, False)] + [combos[i] for i in picked]


def _shift(images, dy, dx, flip):
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    src = images[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[:, max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)] = src
    return out[:, :, ::-1] if flip else out


def fashion_mnist_embeddings(copies=17, layer="pre_logits", epochs=4, seed=0, verbose=1):
    """Returns `(keys, key_labels, queries, query_labels, model)`.

    `keys` is `(60_000 * copies, 32)` float32, `queries` `(10_000, 32)`.
    """
    cache = os.path.join(ROOT, "results", "benchmarks", f"fmnist_{layer}_x{copies}_s{seed}")
    model_path = cache + "_model.keras"
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    x_train = (x_train.astype("float32") / 255.0)[..., None]
    x_test = (x_test.astype("float32") / 255.0)[..., None]
    names = ("keys", "key_labels", "queries", "query_labels")
    if all(os.path.exists(f"{cache}_{n}.npy") for n in names) and os.path.exists(model_path):
        arrays = [np.load(f"{cache}_{n}.npy", allow_pickle=False) for n in names]
        return (*arrays, keras.models.load_model(model_path))

    from fashion_mnist import build_cnn

    keras.utils.set_random_seed(seed)
    model = build_cnn()
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=128, epochs=epochs, verbose=verbose)
    embed = keras.Model(model.inputs, model.get_layer(layer).output)
    start = time.perf_counter()
    keys = np.empty((len(x_train) * copies, embed.output.shape[-1]), dtype=np.float32)
    for c, (dy, dx, flip) in enumerate(_augmentations(copies, seed)):
        batch = _shift(x_train, dy, dx, flip)
        keys[c * len(x_train) : (c + 1) * len(x_train)] = embed.predict(
            batch, batch_size=1024, verbose=0
        )
        if verbose:
            print(f"embedded copy {c + 1}/{copies} ({time.perf_counter() - start:.0f} s)")
    key_labels = np.tile(y_train.astype(np.int32), copies)
    queries = embed.predict(x_test, batch_size=1024, verbose=0)
    arrays = (keys, key_labels, queries, y_test.astype(np.int32))
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    for n, a in zip(names, arrays, strict=True):
        with _io.atomic_path(f"{cache}_{n}.npy") as tmp:
            np.save(tmp, a, allow_pickle=False)
    _io.save_model(model, model_path)
    return (*arrays, model)
