"""Sharded memories: built across machines (`keras_resmem.beam`), served in one process or many.

- `format`: the files: one directory of `.npy` arrays per shard, and a manifest.
- `memory`: every shard read into one `ResidualMemory`
  (`keras_resmem.attach_memory(base, layer, shards="manifest.json")`).
- `serving`: one SavedModel per shard, a front SavedModel (the network and the merge of the
  shards' answers), and `ShardedClient`, which fans a request out over TensorFlow Serving's
  REST API. `tf_server.py` beside it is a TensorFlow-only stand-in for
  `tensorflow_model_server`, run by its path.
"""

from keras_resmem.sharded import format, memory, serving
from keras_resmem.sharded.format import ShardedMemoryError, read_manifest
from keras_resmem.sharded.serving import (
    RestModel,
    ServingError,
    ShardedClient,
    export_front_saved_model,
    export_shard_saved_model,
)

__all__ = [
    "RestModel",
    "ServingError",
    "ShardedClient",
    "ShardedMemoryError",
    "export_front_saved_model",
    "export_shard_saved_model",
    "format",
    "memory",
    "read_manifest",
    "serving",
]
