"""Loaders for the real data sets that arrive inside packages (see DATA.md)."""

import gzip
import os

import numpy as np

from keras_resmem.api_export import keras_resmem_export

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path, header_bytes, shape_tail):
    with gzip.open(path, "rb") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8, offset=header_bytes)
    return data.reshape((-1,) + shape_tail)


@keras_resmem_export("keras_resmem.datasets.load_fashion_mnist")
def load_fashion_mnist(data_dir=None):
    """Loads Fashion-MNIST: 60,000 train and 10,000 test 28x28 images, 10 classes.

    Reads the original IDX files of the Debian package `dataset-fashion-mnist`
    (`apt-get install dataset-fashion-mnist`) from `data_dir`; where they are
    absent, falls back to `keras.datasets.fashion_mnist` (which downloads).

    Args:
        data_dir: folder of the four `.gz` IDX files; default
            `/usr/share/datasets/fashion-mnist`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 images `(n, 28, 28)`
        and uint8 labels `(n,)`, as `keras.datasets.fashion_mnist.load_data()`.

    Raises:
        FileNotFoundError: neither the local files nor a download are available;
            the message says which package to install.

    Example:

    >>> from keras_resmem.datasets import load_fashion_mnist
    >>> (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    >>> x_train.shape, x_test.shape
    ((60000, 28, 28), (10000, 28, 28))
    """
    data_dir = FASHION_MNIST_DIR if data_dir is None else os.fspath(data_dir)
    paths = {s: [os.path.join(data_dir, f) for f in files] for s, files in _FILES.items()}
    if all(os.path.exists(p) for pair in paths.values() for p in pair):
        return tuple(
            (_read_idx(images, 16, (28, 28)), _read_idx(labels, 8, ()))
            for images, labels in (paths["train"], paths["test"])
        )
    import keras

    try:
        return keras.datasets.fashion_mnist.load_data()
    except Exception as e:
        # Only a failed download becomes "not found"; any other error is a
        # real one and propagates as it is.
        if not (isinstance(e, OSError) or "URL fetch failure" in str(e)):
            raise
        raise FileNotFoundError(
            f"Fashion-MNIST was not found in {data_dir} and could not be downloaded ({e}). "
            "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
            "give `data_dir` the folder of the four IDX .gz files."
        ) from None
