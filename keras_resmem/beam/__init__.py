"""Apache Beam: build a sharded ResMem memory, too big for one machine, in a pipeline.

`build_sharded_memory` runs the base model over the training examples
(`RunInference`), sends every entry to the shard its id hashes to
(`keras_resmem.sharded.format.shard_of`), writes each shard on its own and
the manifest last. `BuildShardedMemory` is the same work as a `PTransform`
inside your own pipeline. `write_examples_tfrecord` and `ReadExamples` store
and read examples with their ids as TFRecord files of `tf.train.Example`.

Needs Apache Beam, an optional extra: `pip install "keras-resmem[beam]"`.
`import keras_resmem` never imports this package.
"""

try:
    import apache_beam  # noqa: F401
except ImportError as error:  # pragma: no cover - tested in a subprocess
    raise ImportError(
        'keras_resmem.beam needs Apache Beam, an optional extra: pip install "keras-resmem[beam]"'
    ) from error

from keras_resmem.beam.pipeline import BuildShardedMemory, build_sharded_memory  # noqa: E402
from keras_resmem.beam.tfrecords import ReadExamples, write_examples_tfrecord  # noqa: E402

__all__ = [
    "BuildShardedMemory",
    "ReadExamples",
    "build_sharded_memory",
    "write_examples_tfrecord",
]
