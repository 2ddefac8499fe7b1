"""`MemoryWriter`: validates memory entries as they stream in and returns finished arrays.

The one way in for entries: `ResidualMemory.memorize` and `attach_memory`
both feed a writer, and hand what `finish` returns to the layer. The writer
knows nothing of the layer; it is given the memory's settings.
"""

import dataclasses
import math

import numpy as np

from keras_resmem import _validation
from keras_resmem import residuals as residuals_lib


@dataclasses.dataclass
class MemoryEntries:
    """A finished memory: per-entry arrays by variable name, and the memory's shape.

    The arrays are C-contiguous and 64-byte aligned, so the layer's variables
    can take them over without a copy; nothing else may write to them.
    """

    arrays: dict
    memory_size: int
    key_dim: int
    num_outputs: int
    # The arrays' buffers, with spare rows after them (`spare_rows`): by name.
    bases: dict = dataclasses.field(default_factory=dict)


def spare_rows(n):
    """The unwritten rows kept after `n` entries, so that `add_examples` can append in place.

    They are allocated but never written until used, so they take address
    space and no RAM.
    """
    return max(n // 4, 1024)


def with_spare_rows(n, row_shape, dtype):
    """`(rows, base)`: `n` aligned rows, and the buffer they start (`spare_rows` longer)."""
    base = aligned_empty((n + spare_rows(n), *row_shape), dtype)
    return base[:n], base


def aligned_empty(shape, dtype, align=64):
    """An uninitialized C-contiguous array whose data starts on an `align`-byte boundary.

    TensorFlow shares, rather than copies, the memory of an array this aligned
    (DLPack). Its pages take RAM only as they are written.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class _BlockBuffer:
    """Rows appended into blocks of about 64 MB.

    Blocks that large are mapped from the OS on their own and given back when
    freed; a list of small per-batch arrays would stay in the allocator's
    heap after it is freed, and the process would hold the memory twice.
    """

    BLOCK_BYTES = 64 * 2**20

    def __init__(self, row_shape, dtype):
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        row_bytes = max(1, math.prod(self.row_shape) * self.dtype.itemsize)
        self.block_rows = max(1, self.BLOCK_BYTES // row_bytes)
        self.blocks, self.filled = [], 0

    def append(self, rows):
        while len(rows):
            if not self.blocks or self.filled == self.block_rows:
                self.blocks.append(np.empty((self.block_rows, *self.row_shape), self.dtype))
                self.filled = 0
            take = min(len(rows), self.block_rows - self.filled)
            self.blocks[-1][self.filled : self.filled + take] = rows[:take]
            self.filled += take
            rows = rows[take:]

    def pop_blocks(self):
        """Yields the filled rows block by block, dropping each block."""
        self.blocks.reverse()
        while self.blocks:
            block = self.blocks.pop()
            yield block if self.blocks else block[: self.filled]


class MemoryWriter:
    """Streams entries in, a batch at a time, and returns the finished memory.

    With `capacity` (the number of entries) known in advance, each batch is
    written straight into arrays of the memory's full size: only the memory
    itself and one batch are ever held. Without it, batches are kept in
    blocks as they come and copied into those arrays at the end, each block
    freed once copied; the arrays' pages take RAM only as they are written,
    so the memory is never held twice there either.

    Args:
        task: `"classification"` or `"regression"`.
        sparse_residuals: `None` (store the outputs) or `m` (store each
            residual's `m` largest-magnitude entries).
        temperature, from_logits: how sparse residuals are computed.
        num_outputs: the width of the outputs, if known (else from the first batch).
        capacity: the number of entries, if known.
        first_id: the id of the first entry written without ids; the
            following ones count up from it.
    """

    def __init__(
        self,
        *,
        task,
        sparse_residuals=None,
        temperature=1.0,
        from_logits=True,
        num_outputs=None,
        capacity=None,
        first_id=0,
    ):
        self.task = task
        self.first_id = int(first_id)
        self.sparse_residuals = sparse_residuals
        self.temperature = temperature
        self.from_logits = from_logits
        self.num_outputs = num_outputs
        self.capacity = capacity
        self.count = 0
        self.key_dim = None
        self._buffers = None
        self._arrays = None
        self._bases = None

    def write(self, keys, scores, targets, ids=None):
        """Adds entries: `keys (b, ...)`, `scores (b, c)`, `targets` (class ids or values).

        `ids` are the entries' int64 ids, `(b,)`; by default they count up
        from `first_id`, one per entry written.

        Raises:
            ValueError: shapes that disagree, non-finite keys, scores or
                regression targets, class ids outside `[0, c)`, ids that are
                not integers, or more entries than `capacity`.
        """
        keys = np.asarray(keys, dtype=np.float32)
        scores = np.asarray(scores, dtype=np.float32)
        b = len(keys)
        if b == 0:
            return
        keys = keys.reshape(b, -1)
        if scores.ndim != 2 or len(scores) != b:
            raise ValueError(
                f"`scores` must have shape (n, num_outputs) with n={b} (the number of "
                f"embeddings). Received: scores.shape={scores.shape}"
            )
        if len(targets) != b:
            raise ValueError(
                f"`targets` must have one row per embedding ({b}). Received: {len(targets)} rows"
            )
        self._check_shape(keys.shape[1], scores.shape[1])
        _validation.finite_rows("embeddings", keys, self.count)
        _validation.finite_rows("scores", scores, self.count)
        if self.task == "regression":
            targets = _validation.regression_targets(targets, b, self.num_outputs, self.count)
        else:
            targets = _validation.class_ids(targets, self.num_outputs, self.count)
        if self.capacity is not None and self.count + b > self.capacity:
            raise ValueError(
                f"The data gave more memory entries than the {self.capacity} expected."
            )
        if ids is None:
            ids = np.arange(self.first_id + self.count, self.first_id + self.count + b)
        ids = _validation.entry_ids(ids, b, self.count)
        arrays = {"keys": keys, **self._entry_arrays(scores, targets), "memory_ids": ids}
        if self._arrays is None and self._buffers is None:
            specs = {name: (a.shape[1:], a.dtype) for name, a in arrays.items()}
            if self.capacity is not None:
                self._bases = {}
                self._arrays = {}
                for name, (shape, dtype) in specs.items():
                    self._arrays[name], self._bases[name] = with_spare_rows(
                        self.capacity, shape, dtype
                    )
            else:
                self._buffers = {name: _BlockBuffer(*spec) for name, spec in specs.items()}
        for name, values in arrays.items():
            if self._arrays is not None:
                self._arrays[name][self.count : self.count + b] = values
            else:
                self._buffers[name].append(values)
        self.count += b

    def _check_shape(self, key_dim, num_outputs):
        if self.num_outputs is None:
            self.num_outputs = num_outputs
        if self.key_dim is None:
            self.key_dim = key_dim
        if (key_dim, num_outputs) != (self.key_dim, self.num_outputs):
            raise ValueError(
                f"Every batch must have {self.key_dim} key features and {self.num_outputs} "
                f"outputs. Received: {key_dim} and {num_outputs} at entry {self.count}"
            )
        if self.sparse_residuals is not None and self.sparse_residuals > num_outputs:
            raise ValueError(
                f"`sparse_residuals` must be at most the number of outputs ({num_outputs}). "
                f"Received: sparse_residuals={self.sparse_residuals}"
            )

    def _entry_arrays(self, scores, targets):
        """What the memory stores per entry, by variable name."""
        if self.sparse_residuals is None:
            return {"memory_scores": scores, "memory_targets": targets}
        ids, values = residuals_lib.sparse_residuals(
            scores,
            targets,
            self.sparse_residuals,
            temperature=self.temperature,
            from_logits=self.from_logits,
        )
        return {
            "residual_ids": ids.numpy(),
            "residual_values": values.numpy(),
            "memory_targets": targets,
        }

    def _last_ids(self):
        buffer = self._buffers["memory_ids"]
        return buffer.blocks[-1][: buffer.filled]

    def finish(self):
        """The finished memory, a `MemoryEntries`; the writer is spent.

        Raises:
            ValueError: no entries, fewer than `capacity`, or an id given twice.
        """
        if self.count == 0:
            raise ValueError("No memory entries: a memory needs at least one training example.")
        if self._arrays is not None:
            _validation.unique_ids(self._arrays["memory_ids"][: self.count])
        else:
            _validation.unique_ids(
                np.concatenate([*self._buffers["memory_ids"].blocks[:-1], self._last_ids()])
            )
        if self.capacity is not None and self.count != self.capacity:
            raise ValueError(
                f"The data gave {self.count} memory entries, not the {self.capacity} expected."
            )
        if self._buffers is not None:
            self._arrays, self._bases = {}, {}
            for name, buffer in self._buffers.items():
                out, self._bases[name] = with_spare_rows(self.count, buffer.row_shape, buffer.dtype)
                start = 0
                for block in buffer.pop_blocks():
                    out[start : start + len(block)] = block
                    start += len(block)
                    del block
                self._arrays[name] = out
            self._buffers = None
        arrays, self._arrays = self._arrays, None
        bases, self._bases = self._bases, None
        return MemoryEntries(arrays, self.count, self.key_dim, self.num_outputs, bases)
