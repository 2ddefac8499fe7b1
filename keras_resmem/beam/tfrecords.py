"""Examples with their ids as TFRecord files of `tf.train.Example`: written here, read in Beam.

Each record is one example, with the features:

- `id`: int64, the example's id (it names the memory entry);
- `x`: float list, the example's input flattened (row-major);
- `x_shape`: int64 list, the input's shape (to restore `x`);
- `y`: int64, the class id (classification), or a float list, the target
  row (regression).
"""

import math
import os

import apache_beam as beam
import numpy as np

from keras_resmem import _io, _validation
from keras_resmem import residuals as residuals_lib

FEATURES = ("id", "x", "x_shape", "y")


def _float_feature(tf, values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _int_feature(tf, values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def write_examples_tfrecord(path, x, y, ids):
    """Writes examples and their ids to one TFRecord file, atomically.

    Args:
        path: the file to write (local), e.g. `"train-00000-of-00004.tfrecord"`.
            Write several files for a pipeline to read in parallel.
        x: the inputs, `(n, ...)` (stored as float32).
        y: integer class ids `(n,)`, or float targets `(n, c)` (regression).
        ids: the examples' int64 ids, `(n,)`, unique.

    Returns:
        `path`.

    Raises:
        ValueError: arrays of different lengths, ids that are not integers.

    Example:

    ```python
    import numpy as np
    from keras_resmem.beam import write_examples_tfrecord

    x = np.random.rand(100, 28, 28, 1).astype("float32")
    y = np.arange(100) % 10
    write_examples_tfrecord("train-00000-of-00001.tfrecord", x, y, ids=np.arange(100))
    ```
    """
    import tensorflow as tf

    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    n = len(x)
    ids = _validation.entry_ids(ids, n)
    if len(y) != n:
        raise ValueError(f"`y` must have one row per example of `x` ({n}). Received: {len(y)} rows")
    if np.issubdtype(y.dtype, np.floating):
        y = y.reshape(n, -1)
    elif not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise ValueError(
            "`y` must be integer class ids (n,) or float regression targets (n, c). "
            f"Received: y of dtype {y.dtype} and shape {y.shape}"
        )
    shape = _int_feature(tf, x.shape[1:])
    flat = x.reshape(n, -1)
    with _io.atomic_path(os.fspath(path)) as tmp, tf.io.TFRecordWriter(tmp) as writer:
        for i in range(n):
            target = _float_feature(tf, y[i]) if y.ndim == 2 else _int_feature(tf, [int(y[i])])
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "id": _int_feature(tf, [int(ids[i])]),
                        "x": _float_feature(tf, flat[i]),
                        "x_shape": shape,
                        "y": target,
                    }
                )
            )
            writer.write(example.SerializeToString())
    return path


def _first_example(tf, path):
    """The first record of `path` as a `tf.train.Example`, or None for an empty file."""
    for record in tf.data.TFRecordDataset(path).take(1):
        return tf.train.Example.FromString(record.numpy())
    return None


def _feature_values(example, name, path):
    feature = example.features.feature
    if name not in feature:
        raise ValueError(
            f"The records of {path} must have the feature `{name}` (as "
            f"`write_examples_tfrecord` writes). The first record has {sorted(feature)}"
        )
    kind = feature[name].WhichOneof("kind")
    return list(getattr(feature[name], kind).value) if kind else []


def read_tfrecord_batches(path, *, task, batch_size, x_shape=None):
    """Yields the examples of one TFRecord file as batch dicts `{"ids", "x", "y"}`.

    The first record gives the input's shape (its `x_shape`, unless
    `x_shape` is given) and the target's width; then records are parsed
    `batch_size` at a time with `tf.io.parse_example`, as fixed-length
    features (every record must have them).
    """
    import tensorflow as tf

    first = _first_example(tf, path)
    if first is None:
        return
    if x_shape is None:
        x_shape = tuple(int(d) for d in _feature_values(first, "x_shape", path))
    x_shape = tuple(x_shape)
    spec = {
        "id": tf.io.FixedLenFeature([], tf.int64),
        "x": tf.io.FixedLenFeature([math.prod(x_shape)], tf.float32),
    }
    if task == "classification":
        spec["y"] = tf.io.FixedLenFeature([], tf.int64)
    else:
        width = len(_feature_values(first, "y", path))
        spec["y"] = tf.io.FixedLenFeature([width], tf.float32)
    dataset = tf.data.TFRecordDataset(path).batch(batch_size)
    dataset = dataset.map(lambda records: tf.io.parse_example(records, spec)).prefetch(2)
    try:
        for batch in dataset:
            x = batch["x"].numpy()
            yield {
                "ids": batch["id"].numpy(),
                "x": x.reshape(len(x), *x_shape),
                "y": batch["y"].numpy(),
            }
    except tf.errors.InvalidArgumentError as error:
        kind = "an int64 class id" if task == "classification" else "a float list"
        raise ValueError(
            f"The records of {path} must all be examples as `write_examples_tfrecord` writes "
            f"them for task={task!r}: features `id`, `x` of {math.prod(x_shape)} floats "
            f"(`x_shape` {x_shape}), and `y` as {kind}. {error.message}"
        ) from None


class ReadExamples(beam.PTransform):
    """Reads TFRecord files of examples into a `PCollection` of batch dicts.

    Each element is a batch of up to `batch_size` examples of one file,
    `{"ids": (b,) int64, "x": (b, *x_shape) float32, "y": (b,) int64 or (b, c)
    float32}`, the form `BuildShardedMemory` takes. The files are matched
    when the transform is applied and read in parallel, one file per
    element: write several.

    Args:
        file_pattern: a file, or a glob such as `"data/train-*.tfrecord"`.
        task: `"classification"` (`y` is an int64 class id) or
            `"regression"` (`y` is a float list).
        batch_size: the examples per element.
        x_shape: the shape of one input; default: as the records say
            (`x_shape`, written by `write_examples_tfrecord`).

    Raises:
        ValueError: no file matches `file_pattern`; at run time, records
            without the features above.

    Example:

    ```python
    import apache_beam as beam
    from keras_resmem.beam import BuildShardedMemory, ReadExamples

    with beam.Pipeline() as pipeline:
        _ = (
            pipeline
            | ReadExamples("data/train-*.tfrecord")
            | BuildShardedMemory("base.keras", "pre_logits", "memory/", num_shards=4)
        )
    ```
    """

    def __init__(self, file_pattern, *, task="classification", batch_size=256, x_shape=None):
        super().__init__()
        self._pattern = os.fspath(file_pattern)
        self._task = _validation.one_of("task", task, residuals_lib.TASKS)
        self._batch_size = _validation.positive_int("batch_size", batch_size)
        if x_shape is not None:
            x_shape = tuple(_validation.positive_int("x_shape", d) for d in x_shape)
        self._x_shape = x_shape

    def files(self):
        """The files `file_pattern` matches, sorted."""
        from apache_beam.io.filesystems import FileSystems

        matched = FileSystems.match([self._pattern])[0].metadata_list
        paths = sorted(m.path for m in matched)
        if not paths:
            raise ValueError(
                f"`file_pattern` must match TFRecord files of examples. Received: "
                f"{self._pattern!r}, which matches no file"
            )
        return paths

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> beam.Create(self.files())
            | "Spread" >> beam.Reshuffle()
            | "Parse"
            >> beam.FlatMap(
                read_tfrecord_batches,
                task=self._task,
                batch_size=self._batch_size,
                x_shape=self._x_shape,
            )
        )
