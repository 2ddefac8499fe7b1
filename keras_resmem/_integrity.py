"""Checks of a loaded memory, before any graph or native code reads it, and its content digest.

A `.keras` file can come from anywhere. Keras checks its zip and HDF5
structure; these check what the memory's arrays hold: shapes, dtypes,
ranges, finiteness, and a digest of the whole memory written when it was
saved. The digest catches corruption that keeps the zip's and HDF5's own
checksums valid. It is no signature: whoever can edit the file can write a
new digest, so it does not protect against a deliberate attacker; the value
checks do what can be done there.
"""

import hashlib
import json
import os

import numpy as np

DIGEST_FILE = "memory_digest.json"
_ALGORITHM = "sha256"
_CHUNK = 1 << 24


class CorruptMemoryError(ValueError):
    """A saved memory whose contents fail a check; the message names the part and the problem."""


def fail(layer_name, part, problem):
    raise CorruptMemoryError(
        f"The saved memory of layer {layer_name!r} is invalid: {part} {problem}. "
        "The file is corrupt or was modified; it was not loaded."
    )


def _finite(layer_name, part, array):
    """Per-entry float rows `(n, ...)` with no NaN or infinity."""
    if np.issubdtype(array.dtype, np.floating) and array.size:
        bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
        if bad.any():
            fail(
                layer_name,
                part,
                f"holds NaN or infinite values in {int(bad.sum())} rows (the first: "
                f"{int(np.argmax(bad))})",
            )


def _within(layer_name, part, array, low, high):
    """Integers in `[low, high)`."""
    if array.size and (array.min() < low or array.max() >= high):
        fail(
            layer_name,
            part,
            f"holds values from {array.min()} to {array.max()}, outside [{low}, {high})",
        )


def check_entries(layer_name, arrays, *, task, num_outputs, memory_size, key_dim):
    """Checks the per-entry arrays of a memory (by variable name, as NumPy arrays)."""
    shapes = {"keys": (memory_size, key_dim)}
    for name, array in arrays.items():
        if len(array) != memory_size:
            fail(layer_name, f"`{name}`", f"has {len(array)} rows, not memory_size={memory_size}")
    if tuple(arrays["keys"].shape) != shapes["keys"]:
        fail(layer_name, "`keys`", f"has shape {arrays['keys'].shape}, not {shapes['keys']}")
    _finite(layer_name, "`keys`", arrays["keys"])
    if "memory_scores" in arrays:
        _finite(layer_name, "`memory_scores`", arrays["memory_scores"])
    if "residual_ids" in arrays:
        _within(layer_name, "`residual_ids`", arrays["residual_ids"], 0, num_outputs)
        _finite(layer_name, "`residual_values`", arrays["residual_values"])
    targets = arrays["memory_targets"]
    if task == "classification":
        _within(layer_name, "`memory_targets` (class ids)", targets, 0, num_outputs)
    else:
        _finite(layer_name, "`memory_targets`", targets)
    if "memory_ids" in arrays:
        ids = np.sort(arrays["memory_ids"])
        if len(ids) > 1 and (ids[1:] == ids[:-1]).any():
            fail(layer_name, "`memory_ids`", "holds an id more than once")


def check_hparams(layer_name, values, memory_size):
    """Checks the hyperparameter variables' values, as the graph will read them (float32)."""
    k = int(values["k"])
    if not 1 <= k <= memory_size:
        fail(layer_name, "`k`", f"is {k}, outside [1, memory_size={memory_size}]")
    for name in ("sigma", "temperature"):
        as_float32 = np.float32(values[name])
        if not (np.isfinite(as_float32) and as_float32 > 0):
            fail(layer_name, f"`{name}`", f"is {values[name]!r}, not a positive float32")
    if "method" in values and not 0 <= int(values["method"]) < 3:
        fail(layer_name, "`method`", f"is {int(values['method'])}, outside [0, 3)")
    if "knn_weight" in values:
        weight = float(values["knn_weight"])
        if not 0.0 <= weight <= 1.0:  # also False for NaN
            fail(layer_name, "`knn_weight`", f"is {weight!r}, outside [0, 1]")


def digest(arrays, asset_dir=None, skip=()):
    """The hex digest of `arrays` (name -> array, hashed in name order) and the asset files."""
    h = hashlib.new(_ALGORITHM)
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        view = array.reshape(-1).view(np.uint8)
        for start in range(0, len(view), _CHUNK):
            h.update(view[start : start + _CHUNK])
    if asset_dir is not None:
        for name in sorted(os.listdir(asset_dir)):
            if name in skip or name == DIGEST_FILE:
                continue
            h.update(json.dumps(["asset", name]).encode())
            with open(os.path.join(asset_dir, name), "rb") as f:
                for block in iter(lambda: f.read(_CHUNK), b""):
                    h.update(block)
    return h.hexdigest()


def write_digest(asset_dir, arrays):
    value = {"algorithm": _ALGORITHM, "digest": digest(arrays, asset_dir)}
    with open(os.path.join(asset_dir, DIGEST_FILE), "w") as f:
        json.dump(value, f)


def check_digest(layer_name, asset_dir, arrays):
    """Compares the digest saved in `asset_dir` (if any: older files have none)."""
    path = os.path.join(asset_dir, DIGEST_FILE)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
        algorithm, expected = saved["algorithm"], saved["digest"]
    except (ValueError, KeyError, TypeError):
        fail(layer_name, "its digest file", "cannot be read")
    if algorithm != _ALGORITHM:
        fail(layer_name, "its digest", f"uses an unknown algorithm {algorithm!r}")
    if digest(arrays, asset_dir) != expected:
        fail(
            layer_name,
            "its content",
            "does not match the digest written when it was saved (corrupted in storage or "
            "transit, or edited)",
        )
