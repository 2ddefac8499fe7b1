"""Real embeddings for the search benchmarks: augmented Fashion-MNIST through a trained CNN.

`fashion_mnist_embeddings(copies)` trains the main job's CNN (examples/fashion_mnist.py)
on the 60,000 training images, then embeds `copies` augmented copies of each
(shifts of up to 3 pixels and horizontal flips), giving `60,000 * copies` keys from
its 32-d `pre_logits` layer, and the 10,000 test images as queries. Arrays are
cached under `results/benchmarks/` as `.npy` files (no pickle), keyed by the settings.

`fashion_mnist_memory(copies)` gives the same keys plus what a ResMem memory
stores beside them (the network's logits for every key, the labels) and the
test queries' logits, written straight into memory-mapped `.npy` files, so that
5 million entries (84 copies) are never held twice. `augmented_batches` yields
the augmented training images themselves, in the order of the keys, for
timing `attach_memory` against `predict` on the same inputs.
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


def _trained_model(cache, x_train, y_train, epochs, seed, verbose):
    """The benchmark CNN, loaded from `<cache>_model.keras` or trained and saved there."""
    model_path = cache + "_model.keras"
    if os.path.exists(model_path):
        return keras.models.load_model(model_path)
    from fashion_mnist import build_cnn

    keras.utils.set_random_seed(seed)
    model = build_cnn()
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=128, epochs=epochs, verbose=verbose)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    _io.save_model(model, model_path)
    return model


MEMORY_ARRAYS = ("keys", "key_logits", "key_labels", "queries", "query_logits", "query_labels")


def fashion_mnist_memory(copies=84, layer="pre_logits", epochs=4, seed=0, verbose=1):
    """A ResMem memory's contents for `60,000 * copies` augmented training images.

    Returns:
        `(arrays, model)`: `arrays` maps each of `MEMORY_ARRAYS` to an array:
        `keys` `(n, 32)` float32 and `key_logits` `(n, 10)` float32 (read-only
        memory maps of the cached files), `key_labels` `(n,)` int32, and the
        test images' `queries`, `query_logits` and `query_labels`. Entry `i` is
        training image `i % 60_000` under augmentation `i // 60_000`
        (`augmented_batches` yields the images in this order).
    """
    cache = os.path.join(ROOT, "results", "benchmarks", f"fmnist_{layer}_x{copies}_s{seed}")
    paths = {name: f"{cache}_{name}.npy" for name in MEMORY_ARRAYS}
    if not all(os.path.exists(p) for p in paths.values()) or not os.path.exists(
        cache + "_model.keras"
    ):
        _embed_memory(cache, paths, copies, layer, epochs, seed, verbose)
    arrays = {
        name: np.load(path, mmap_mode="r" if name in ("keys", "key_logits") else None)
        for name, path in paths.items()
    }
    return arrays, keras.models.load_model(cache + "_model.keras")


def _embed_memory(cache, paths, copies, layer, epochs, seed, verbose):
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    model = _trained_model(
        cache, (x_train.astype("float32") / 255.0)[..., None], y_train, epochs, seed, verbose
    )
    features = keras.Model(model.inputs, [model.get_layer(layer).output, model.outputs[0]])
    n, dim = len(x_train) * copies, features.outputs[0].shape[-1]
    num_classes = features.outputs[1].shape[-1]
    start = time.perf_counter()
    with (
        _io.atomic_path(paths["keys"]) as keys_path,
        _io.atomic_path(paths["key_logits"]) as logits_path,
    ):
        keys = np.lib.format.open_memmap(keys_path, "w+", np.float32, (n, dim))
        logits = np.lib.format.open_memmap(logits_path, "w+", np.float32, (n, num_classes))
        done = 0
        for c, (images, _) in enumerate(augmented_batches(copies, seed, batch_size=len(x_train))):
            emb, out = features.predict(_as_float(images), batch_size=1024, verbose=0)
            keys[done : done + len(emb)], logits[done : done + len(emb)] = emb, out
            done += len(emb)
            if verbose:
                print(f"embedded copy {c + 1}/{copies} ({time.perf_counter() - start:.0f} s)")
        keys.flush()
        logits.flush()
        del keys, logits  # close the maps before the files are renamed
    q_emb, q_out = features.predict(_as_float(x_test), batch_size=1024, verbose=0)
    small = {
        "key_labels": np.tile(y_train.astype(np.int32), copies),
        "queries": q_emb,
        "query_logits": q_out,
        "query_labels": y_test.astype(np.int32),
    }
    for name, array in small.items():
        with _io.atomic_path(paths[name]) as tmp:
            np.save(tmp, array, allow_pickle=False)


def _as_float(images):
    """uint8 `(n, 28, 28)` images as the network's float32 `(n, 28, 28, 1)` input."""
    return (images.astype("float32") / 255.0)[..., None]


def augmented_batches(copies, seed=0, batch_size=1024, count=None):
    """Yields `(images, labels)`: uint8 `(b, 28, 28)` and int32 `(b,)`, in key order.

    The first `count` (default all `60,000 * copies`) augmented training
    images, as `fashion_mnist_memory` embeds them; one copy is augmented at a
    time, so memory stays at one copy of the training set.
    """
    (x_train, y_train), _ = load_fashion_mnist()
    y_train = y_train.astype(np.int32)
    remaining = len(x_train) * copies if count is None else int(count)
    for dy, dx, flip in _augmentations(copies, seed):
        if remaining <= 0:
            return
        images = _shift(x_train, dy, dx, flip)
        end = min(len(images), remaining)
        for i in range(0, end, batch_size):
            yield images[i : min(i + batch_size, end)], y_train[i : min(i + batch_size, end)]
        remaining -= end


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

    model = _trained_model(cache, x_train, y_train, epochs, seed, verbose)
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
    return (*arrays, model)
