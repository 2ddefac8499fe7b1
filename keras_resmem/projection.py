"""Key projections: a linear map applied to a memory's keys and queries before the search.

A memory keyed on a wide feature map (Fashion-MNIST's `pool2`: 1568
features) is large and slow to search exactly. `PCA` keeps the keys' top
principal components: the memory stores `(z - mean) @ components`, fewer
bytes per entry, and every search backend (exact, IVF, ScaNN) is built on
the projected keys. Queries are projected the same way in the graph, a
subtraction and a matmul of stock TensorFlow ops, so a portable SavedModel
stays portable.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_resmem import _validation
from keras_resmem.api_export import keras_resmem_export

# Rows of keys read at once while fitting and projecting: float64 chunks of
# 4096 x 1568 are 51 MB, so memory stays flat on millions of entries.
_CHUNK_ROWS = 4096

MEAN = "projection_mean"
COMPONENTS = "projection_components"


@keras_resmem_export("keras_resmem.projection.PCA")
class PCA:
    """Projects a memory's keys onto their top `dim` principal components.

    Given to `keras_resmem.ResidualMemory(key_projection=...)` or
    `keras_resmem.attach_memory(..., key_projection=...)`. The fit (the keys'
    mean and top `dim` eigenvectors of their covariance, accumulated in
    float64 over chunks of rows) is computed when the memory is filled
    (`memorize`, `attach_memory` with data) and stored with the layer as two
    non-trainable variables, so a `.keras` file and a SavedModel carry it.
    `add_examples` projects the new keys with the fit the memory holds, and
    does not refit: the memory then equals one filled with all its entries
    projected with that fit. `memorize` fits again. `forget` keeps the fit.

    Distances between projected keys are the L2 distances within the
    principal subspace: they never exceed the full distances, so `sigma`
    should be chosen again (on validation) for each `dim`.

    Args:
        dim: the number of components kept, at most the keys' dimension
            and the number of entries the memory is filled with.

    Example:

    >>> import numpy as np
    >>> import keras_resmem
    >>> rng = np.random.default_rng(0)
    >>> keys = rng.normal(size=(200, 64)).astype("float32")
    >>> memory = keras_resmem.ResidualMemory(
    ...     k=5, key_projection=keras_resmem.projection.PCA(8))
    >>> memory.memorize(keys, rng.normal(size=(200, 3)), rng.integers(0, 3, 200))
    >>> memory.stored_key_dim  # keys stored projected
    8
    >>> memory([keys[:2], np.zeros((2, 3))]).shape  # queries of 64 features
    TensorShape([2, 3])
    """

    def __init__(self, dim):
        self.dim = _validation.positive_int("dim", dim)
        self.mean = None
        self.components = None

    def __repr__(self):
        return f"PCA(dim={self.dim})"

    def get_config(self):
        return {"dim": self.dim}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def clone(self):
        """A new, unbuilt projection with the same settings."""
        return type(self).from_config(self.get_config())

    # The layer's side: variables, fit, projection.

    def build(self, key_dim, add_weight):
        """Creates the `(key_dim,)` mean and `(key_dim, dim)` components variables.

        Raises:
            ValueError: `dim` larger than `key_dim`.
        """
        if self.dim > key_dim:
            raise ValueError(
                f"`key_projection` keeps dim={self.dim} components, more than the keys' "
                f"{key_dim} features. Received: key_projection={self!r}"
            )
        self.key_dim = key_dim
        self.mean = add_weight(MEAN, (key_dim,))
        self.components = add_weight(COMPONENTS, (key_dim, self.dim))

    def check_fit(self, memory_size):
        """Raises if `memory_size` entries are too few to fit `dim` components."""
        if self.dim > memory_size:
            raise ValueError(
                f"`key_projection` keeps dim={self.dim} components, more than the "
                f"{memory_size} entries it would be fitted on. Received: key_projection={self!r}"
            )

    def fit(self, keys):
        """Fits the mean and components to `keys` `(n, key_dim)` and stores them."""
        mean, components = fit_pca(keys, self.dim)
        self.mean.assign(mean.astype(np.float32))
        self.components.assign(components.astype(np.float32))

    def project_array(self, keys, out=None):
        """`keys` `(n, key_dim)` projected in NumPy, float32, chunk by chunk (into `out`)."""
        mean = self.mean.numpy()
        components = self.components.numpy()
        if out is None:
            out = np.empty((len(keys), self.dim), np.float32)
        for start in range(0, len(keys), _CHUNK_ROWS):
            chunk = keys[start : start + _CHUNK_ROWS]
            np.matmul(chunk - mean, components, out=out[start : start + len(chunk)])
        return out

    def project(self, queries):
        """`queries` `(m, key_dim)` float32 tensor projected in the graph: `(m, dim)`."""
        mean = tf.convert_to_tensor(self.mean)
        return tf.matmul(queries - mean[None, :], tf.convert_to_tensor(self.components))

    def check_loaded(self, arrays, fail):
        """Checks loaded values: shapes that fit the keys, all finite."""
        shapes = {MEAN: (self.key_dim,), COMPONENTS: (self.key_dim, self.dim)}
        for name, shape in shapes.items():
            array = arrays[name]
            if tuple(array.shape) != shape:
                fail(f"`{name}`", f"has shape {tuple(array.shape)}, not {shape}")
            if not np.isfinite(array).all():
                fail(f"`{name}`", "holds NaN or infinite values")

    def storage_bytes(self):
        return 4 * self.key_dim * (self.dim + 1)


def fit_pca(keys, dim, chunk_rows=_CHUNK_ROWS):
    """The mean `(d,)` and top `dim` principal components `(d, dim)` of `keys` `(n, d)`.

    Two passes over the rows, `chunk_rows` at a time, in float64: the mean,
    then the centred `X^T X`; the components are its eigenvectors with the
    largest eigenvalues, largest first, each signed so that its entry of
    largest magnitude is positive.
    """
    keys = np.asarray(keys)
    n, d = keys.shape
    total = np.zeros(d)
    for start in range(0, n, chunk_rows):
        total += keys[start : start + chunk_rows].sum(axis=0, dtype=np.float64)
    mean = total / n
    scatter = np.zeros((d, d))
    for start in range(0, n, chunk_rows):
        chunk = keys[start : start + chunk_rows].astype(np.float64) - mean
        scatter += chunk.T @ chunk
    _, vectors = np.linalg.eigh(scatter)  # ascending eigenvalues
    components = vectors[:, ::-1][:, :dim]
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(dim)])
    return mean, components * np.where(signs == 0, 1.0, signs)


def get(value):
    """A new, unbuilt projection from `value`: None, a dim, a `PCA`, or its serialized config.

    Raises:
        ValueError: anything else, or a dim that is not a positive integer.
    """
    if isinstance(value, dict):
        value = keras.saving.deserialize_keras_object(value)
    if value is None:
        return None
    if isinstance(value, PCA):
        return value.clone()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(
                "`key_projection` must be None, a positive number of components, or a "
                f"`keras_resmem.projection.PCA`. Received: key_projection={value!r}"
            )
        return PCA(int(value))
    raise ValueError(
        "`key_projection` must be None, a positive number of components, or a "
        f"`keras_resmem.projection.PCA` such as `keras_resmem.projection.PCA(32)`. "
        f"Received: key_projection={value!r}"
    )


__all__ = ["PCA"]
