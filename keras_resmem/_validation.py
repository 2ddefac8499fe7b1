"""Argument checks shared by the layer, the writer, attach and tuning: one place per rule.

Each raises `ValueError` (or `TypeError`) naming the argument, what it
received and what is valid.
"""

import math

import numpy as np

# The smallest positive float32: a scale below it is 0 in the graph's float32.
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def positive_int(name, value):
    """`value` as an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def positive_float(name, value):
    """`value` as a finite float, positive also in float32 (the graph's precision)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"`{name}` must be a positive number. Received: {name}={value!r}")
    value = float(value)
    if not (math.isfinite(value) and _FLOAT32_TINY <= value <= _FLOAT32_MAX):
        raise ValueError(
            f"`{name}` must be a positive, finite number that float32 can hold "
            f"(from {_FLOAT32_TINY:.3g} to {_FLOAT32_MAX:.3g}). "
            f"Received: {name}={value!r}"
        )
    return value


def unit_float(name, value):
    """`value` as a float in [0, 1]."""
    is_number = isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(value, (bool, np.bool_)) or not is_number or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1]. Received: {name}={value!r}")
    return float(value)


def boolean(name, value):
    """`value` if it is True or False (not a string or a number)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)


def one_of(name, value, valid):
    """`value` if it is one of `valid`."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"`{name}` must be one of {tuple(valid)}. Received: {name}={value!r}")
    return value


def k_within(k, memory_size, name="k"):
    """`k` as an int in [1, memory_size]."""
    k = positive_int(name, k)
    if memory_size is not None and k > memory_size:
        raise ValueError(
            f"`{name}` must be at most the memory size ({memory_size} entries). "
            f"Received: {name}={k}"
        )
    return k


def finite_rows(name, values, first_entry=0):
    """Raises if a row of `values` `(n, ...)` holds NaN or infinity, naming the first."""
    if len(values) == 0:
        return
    bad = ~np.isfinite(np.reshape(values, (len(values), -1))).all(axis=1)
    if bad.any():
        raise ValueError(
            f"`{name}` contains NaN or infinite values, in {int(bad.sum())} of {len(values)} "
            f"rows (the first at entry {first_entry + int(np.argmax(bad))}). A memory cannot "
            "be built from them; check the model's weights and the input data."
        )


def class_ids(targets, num_classes, first_entry=0, ids=None):
    """Classification targets `(n,)` as int32 class ids in `[0, num_classes)`.

    A bad label is named by its entry number, or by its example's id when
    `ids` (one per target) are given.
    """
    targets = np.asarray(targets)
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(
            "Classification targets must be integer class ids of shape (n,). "
            f"Received: dtype={targets.dtype}, shape={targets.shape}"
        )
    bad = (targets < 0) | (targets >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"Class ids must lie in [0, {num_classes}) for a model with {num_classes} outputs. "
            f"Received: label {targets[i]} "
            + (f"at entry {first_entry + i}" if ids is None else f"for the example of id {ids[i]}")
        )
    return targets.astype(np.int32)


def regression_targets(targets, n, num_outputs, first_entry=0):
    """Regression targets as finite float32 `(n, num_outputs)`."""
    targets = np.asarray(targets, dtype=np.float32)
    if targets.size != n * num_outputs:
        raise ValueError(
            f"Regression targets must have the width of the scores ({num_outputs}), one row "
            f"per entry ({n}). Received: targets.shape={targets.shape}"
        )
    targets = targets.reshape(n, num_outputs)
    finite_rows("targets", targets, first_entry)
    return targets


def entry_ids(ids, n, first_entry=0):
    """Memory entry ids as an int64 array `(n,)`."""
    array = np.asarray(ids)
    if array.size == n and array.ndim > 1:
        array = array.reshape(n)
    if array.ndim != 1 or len(array) != n:
        raise ValueError(
            f"`ids` must hold one id per memory entry ({n} here, from entry {first_entry}). "
            f"Received: ids of shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            "`ids` must be integers (they are stored as int64). "
            f"Received: ids of dtype {array.dtype}"
        )
    if array.dtype == np.uint64 and n and array.max() > np.iinfo(np.int64).max:
        raise ValueError("`ids` must fit in int64. Received: an id above 2**63 - 1")
    return array.astype(np.int64)


def unique_ids(ids, name="ids"):
    """Raises if an id occurs twice in `ids`, naming a few."""
    ids = np.asarray(ids)
    if len(ids) < 2:
        return
    ordered = np.sort(ids)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(repeated):
        shown = np.unique(repeated)[:5].tolist()
        raise ValueError(
            f"`{name}` must be unique, but {len(np.unique(repeated))} id(s) occur more than "
            f"once, e.g. {shown}."
        )
