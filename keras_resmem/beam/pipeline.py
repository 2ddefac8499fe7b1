"""`BuildShardedMemory`: a Beam pipeline that builds a sharded ResMem memory.

The pipeline, for `N` shards:

1. `RunInference` runs the base model (`KeyAndOutputModelHandler`) over
   the examples, `batch_size` at a time: each example's key and output, as
   `attach_memory` computes them.
2. Each batch is split by shard, `shard_of(id, N)`, and grouped by shard
   (`GroupByKey`): one Beam element per batch and shard, never per example.
3. For `index="ivf"`: a sample of the keys, the same whatever the order or
   the bundling of the data (the keys of the entries whose ids hash
   smallest), trains k-means centroids once; they are written to
   `centroids.npy` and every shard writer gets them as a side input.
4. Each shard is built with `MemoryWriter` and written with `write_shard`
   (for IVF, each entry's partition under the shared centroids), on its own.
5. The shards' descriptions are gathered and `manifest.json` is written
   once, last. A shard that no id hashes to is written empty.

Retries. Every file written is a function of the examples alone (a shard's
entries are sorted by id; the sample is chosen by id), and every write is
atomic. A retried or duplicated bundle therefore writes the same bytes
again, and a failed job run again over the same output directory ends with
the same memory. The manifest, written last, is what makes the memory
readable: a run that fails leaves none. Beam's in-process runners differ:
the `BundleBasedDirectRunner` retries a failed bundle (up to 4 attempts);
the `FnApiRunner`, the engine `DirectRunner` runs batch pipelines on, fails
the job on the first error (`tests/test_beam.py` runs both cases).
"""

import json
import logging
import math
import os
import shutil
import tempfile

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import RunInference

import keras_resmem.beam.inference as inference_lib
import keras_resmem.beam.tfrecords as tfrecords
import keras_resmem.sharded.format as format_lib
from keras_resmem import _validation
from keras_resmem import residuals as residuals_lib
from keras_resmem.memory_writer import MemoryWriter

_LOG = logging.getLogger(__name__)

# The IVF training sample when neither `ivf_sample_size` nor `num_partitions`
# is given: the library's default sample (64 keys per partition) of memories
# up to ~1M entries.
DEFAULT_IVF_SAMPLE_SIZE = 262_144


def default_pipeline_options(**overrides):
    """The options `build_sharded_memory` runs with: the `FnApiRunner` in this process.

    The `FnApiRunner` is the engine `DirectRunner` runs batch pipelines on.
    It is named here because `DirectRunner` first tries to download and
    start the Prism runner. In this process (`in_memory`, one worker) the
    model is loaded once, and TensorFlow uses every core for inference:
    on 2 cores it was faster than `multi_processing`
    (`benchmarks/beam_pipeline.py`).
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    settings = {
        "runner": "FnApiRunner",
        "direct_running_mode": "in_memory",
        "direct_num_workers": 1,
        **overrides,
    }
    return PipelineOptions(flags=[], **settings)


def _priorities(ids, seed):
    """The sampling priority of each id: a seeded 64-bit hash (splitmix64), unique per id."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z ^ (np.uint64(0xD1B54A32D192ED03) * np.uint64(seed + 1))
    return format_lib.splitmix64(z.astype(np.int64))


class _SmallestPriorities(beam.CombineFn):
    """The keys of the `size` entries of smallest priority, and the number of entries.

    Inputs are batches `(priorities, keys)`. The result, `(count, keys)`
    with keys in priority order, depends on the entries alone, not on how
    they were batched, bundled or combined.
    """

    def __init__(self, size):
        self.size = size

    def create_accumulator(self):
        return 0, [], []

    def _compact(self, count, priorities, keys):
        rows = sum(len(p) for p in priorities)
        if len(priorities) > 1:
            priorities, keys = [np.concatenate(priorities)], [np.concatenate(keys)]
        if rows > self.size:
            keep = np.argpartition(priorities[0], self.size - 1)[: self.size]
            priorities, keys = [priorities[0][keep]], [keys[0][keep]]
        return count, priorities, keys

    def add_input(self, accumulator, element):
        count, priorities, keys = accumulator
        priorities.append(element[0])
        keys.append(element[1])
        count += len(element[0])
        if sum(len(p) for p in priorities) > 2 * self.size:
            return self._compact(count, priorities, keys)
        return count, priorities, keys

    def merge_accumulators(self, accumulators):
        count, priorities, keys = 0, [], []
        for c, p, k in accumulators:
            count += c
            priorities.extend(p)
            keys.extend(k)
        return self._compact(count, priorities, keys)

    def extract_output(self, accumulator):
        count, priorities, keys = self._compact(*accumulator)
        if not priorities:
            return count, None
        order = np.argsort(priorities[0], kind="stable")
        return count, keys[0][order]


def _empty_input_error():
    return ValueError("`examples` is empty: a memory needs at least one training example.")


def train_centroids(sample, output_dir, *, num_partitions, seed):
    """Trains the shared IVF centroids on `(count, sample_keys)` and writes `centroids.npy`.

    Returns:
        `{"centroids": (P, d) float32, "digest": their file's SHA-256}`.
    """
    from keras_resmem.search import ivf

    count, keys = sample
    if not count or keys is None:
        raise _empty_input_error()
    overrides = {"seed": int(seed)}
    if num_partitions is not None:
        overrides["num_partitions"] = num_partitions
    options = ivf.resolve_ivf_options(count, overrides)
    options["num_partitions"] = min(options["num_partitions"], len(keys))
    options["training_sample_size"] = len(keys)
    centroids, _, _ = ivf.train_ivf(keys, options)
    digest = format_lib.write_centroids(output_dir, centroids)
    _LOG.info("Trained %d IVF centroids on %d of %d keys", len(centroids), len(keys), count)
    return {"centroids": centroids, "digest": digest}


def _sample_input(result, seed):
    return _priorities(result.example["ids"], seed), result.inference["keys"]


def _checked_labels(ids, y, task, num_outputs):
    """Labels as the writer takes them; a class id out of range names its example's id."""
    from keras_resmem import attach

    if task != "classification":
        return np.asarray(y, dtype=np.float32).reshape(len(ids), -1)
    y = attach._class_ids(y, num_outputs, 0)
    return _validation.class_ids(y, num_outputs, ids=np.asarray(ids).tolist())


def split_by_shard(result, num_shards, task, num_outputs):
    """Yields `(shard, part)`: a `RunInference` batch's entries, one part per shard.

    A part is `{"ids", "keys", "outputs", "y"}`, the rows of one shard.
    """
    ids = result.example["ids"]
    keys, outputs = result.inference["keys"], result.inference["outputs"]
    y = _checked_labels(ids, result.example["y"], task, num_outputs)
    shards = format_lib.shard_of(ids, num_shards)
    order = np.argsort(shards, kind="stable")
    bounds = np.cumsum(np.bincount(shards, minlength=num_shards))
    start = 0
    for shard, end in enumerate(bounds.tolist()):
        if end > start:
            rows = order[start:end]
            yield (
                shard,
                {"ids": ids[rows], "keys": keys[rows], "outputs": outputs[rows], "y": y[rows]},
            )
        start = end


def write_shard_parts(
    output_dir,
    index,
    num_shards,
    parts,
    *,
    task,
    from_logits,
    num_outputs,
    sparse_residuals=None,
    temperature=1.0,
    centroids=None,
):
    """Builds shard `index` from its parts (`split_by_shard`) and writes it; returns its info.

    The shard's bytes depend only on its entries (not on the parts' order):
    calling this twice for one shard, as a retried or duplicated bundle
    does, leaves one shard, the same.

    Raises:
        ValueError: an id given twice (named), non-finite keys or outputs.
    """
    parts = list(parts)
    size = sum(len(part["ids"]) for part in parts)
    writer = MemoryWriter(
        task=task,
        sparse_residuals=sparse_residuals,
        temperature=temperature,
        from_logits=from_logits,
        num_outputs=num_outputs,
        capacity=size,
    )
    name = format_lib.shard_name(index, num_shards)
    try:
        for part in parts:
            writer.write(part["keys"], part["outputs"], part["y"], part["ids"])
        entries = writer.finish()
    except ValueError as error:
        raise ValueError(f"Building {name}: {error}") from None
    partitions = num_partitions = None
    if centroids is not None:
        from keras_resmem.search.base import nearest_centroids

        partitions = nearest_centroids(entries.arrays["keys"], centroids)
        num_partitions = len(centroids)
    info = format_lib.write_shard(
        output_dir,
        index,
        num_shards,
        entries.arrays,
        partitions=partitions,
        num_partitions=num_partitions,
    )
    _LOG.info("Wrote %s: %d entries", name, info["size"])
    return info


def _empty_arrays(task, sparse_residuals, key_dim, num_outputs):
    """A shard's entry arrays with no rows, of the dtypes and widths `read_shard` expects."""
    manifest = format_lib.Manifest(
        directory="",
        task=task,
        from_logits=True,
        sparse_residuals=sparse_residuals,
        temperature=1.0,
        key_dim=key_dim,
        num_outputs=num_outputs,
        shards=(),
    )
    return {
        name: np.zeros(shape, dtype=dtype)
        for name, (dtype, shape) in manifest.entry_specs(0).items()
    }


class _WriteShards(beam.DoFn):
    """`(shard, parts)` -> the shard's info, once it is written.

    `from_logits` and `centroids` come as side inputs where the data decide
    them, else as the constructor's values.
    """

    def __init__(self, output_dir, num_shards, settings, from_logits):
        self._output_dir = output_dir
        self._num_shards = num_shards
        self._settings = settings
        self._from_logits = from_logits

    def process(self, element, from_logits=None, centroids=None):
        index, parts = element
        info = write_shard_parts(
            self._output_dir,
            index,
            self._num_shards,
            parts,
            from_logits=self._from_logits if from_logits is None else from_logits,
            centroids=None if centroids is None else centroids["centroids"],
            **self._settings,
        )
        yield index, info


def write_manifest_last(
    infos,
    *,
    from_logits,
    centroids,
    output_dir,
    num_shards,
    task,
    key_dim,
    num_outputs,
    sparse_residuals,
    temperature,
    index,
    settings,
):
    """Writes the shards no id hashed to (empty), then the manifest; returns its path."""
    written = dict(infos)
    if not written:
        raise _empty_input_error()
    for shard in range(num_shards):
        if shard not in written:
            _LOG.info("No entry hashes to shard %d of %d: writing it empty", shard, num_shards)
            written[shard] = format_lib.write_shard(
                output_dir,
                shard,
                num_shards,
                _empty_arrays(task, sparse_residuals, key_dim, num_outputs),
                partitions=None if centroids is None else np.zeros(0, np.int32),
                num_partitions=None if centroids is None else len(centroids["centroids"]),
            )
    path = format_lib.write_manifest(
        output_dir,
        [written[shard] for shard in range(num_shards)],
        task=task,
        from_logits=from_logits,
        key_dim=key_dim,
        num_outputs=num_outputs,
        sparse_residuals=sparse_residuals,
        temperature=temperature,
        index=index,
        centroids_digest=None if centroids is None else centroids["digest"],
        settings=settings,
    )
    total = sum(info["size"] for info in written.values())
    _LOG.info("Wrote %s: %d entries in %d shards", path, total, num_shards)
    return path


def _not_all_probabilities(looks_like_probabilities):
    return not looks_like_probabilities


class BuildShardedMemory(beam.PTransform):
    """Builds a sharded ResMem memory from a `PCollection` of examples.

    Runs the base model over the examples with `RunInference` (the model is
    loaded from `model_path` once per worker), and writes to `output_dir` the
    entries `keras_resmem.attach_memory(base, layer_name, data, ids=ids)`
    would hold, in `num_shards` shards (`keras_resmem.sharded.format`): entry
    `id` in shard `shard_of(id, num_shards)`, every shard written on its own,
    and `manifest.json` last. Its output is a `PCollection` of one element,
    the manifest's path.

    Examples are tuples `(id, x, y)`, or batches as `attach_memory`'s dict
    data, `{"ids": (b,), "x": (b, ...), "y": (b,) or (b, c)}` (what
    `ReadExamples` yields, and much faster: Beam's cost is per element).
    Ids are required and name the entries: int64, unique. An id that occurs
    twice, even in two identical examples, is an error that names it.

    Every file is a function of the examples alone and written atomically,
    so retried bundles and a failed job run again write the same memory
    (see `keras_resmem.beam.pipeline`).

    Args:
        model_path: the trained base model, a `.keras` file (functional or
            Sequential, one input and one output `(batch, num_outputs)`),
            readable by every worker.
        layer_name: the key layer, as `attach_memory`'s.
        output_dir: where the shards and the manifest go; a local or shared
            directory every worker can write.
        num_shards: the number of shards.
        task: `"classification"` or `"regression"`.
        from_logits: whether the model outputs logits. `None` detects it as
            `attach_memory` does: a model ending in a softmax outputs
            probabilities, and so does one whose every output row is
            non-negative and sums to 1.
        sparse_residuals: `None` to store the outputs, or `m` to store each
            residual's `m` largest-magnitude entries (with `temperature`).
        temperature: the softmax temperature sparse residuals are computed with.
        index: `"exact"`, or `"ivf"`: k-means centroids trained once on a
            sample of the keys, shared by every shard, each shard's entries
            listed by partition.
        num_partitions: IVF: the number of centroids; default
            `keras_resmem.search.ivf.default_ivf_options` for the memory's size.
        ivf_sample_size: IVF: the keys k-means trains on, chosen by a hash of
            their ids (the same sample on every run); default 64 per
            partition if `num_partitions` is given, else 262,144.
        seed: the seed of the sample and of k-means.
        batch_size: examples per model call.
        settings: the ResMem settings stored in the manifest (`k`, `sigma`,
            ...), the defaults of a model that serves the memory.
        overwrite: whether to replace a memory already at `output_dir` (its
            manifest is removed when the transform is applied).

    Raises:
        ValueError: an argument out of range, an unknown `layer_name` (the
            message lists the valid names), a model whose output the memory
            cannot take. At run time: a duplicate id (named), an example of
            the wrong shape, a label out of range, or no examples.
        FileExistsError: a memory at `output_dir` and `overwrite=False`.

    Example:

    ```python
    import apache_beam as beam
    from keras_resmem.beam import BuildShardedMemory

    with beam.Pipeline() as pipeline:
        examples = pipeline | beam.Create([(i, x_train[i], y_train[i]) for i in range(1000)])
        _ = examples | BuildShardedMemory("base.keras", "pre_logits", "memory/", num_shards=4)
    # memory/manifest.json, memory/shard-00000-of-00004/, ...
    ```
    """

    def __init__(
        self,
        model_path,
        layer_name,
        output_dir,
        *,
        num_shards,
        task="classification",
        from_logits=None,
        sparse_residuals=None,
        temperature=1.0,
        index="exact",
        num_partitions=None,
        ivf_sample_size=None,
        seed=0,
        batch_size=256,
        settings=None,
        overwrite=False,
    ):
        super().__init__()
        self.num_shards = _validation.positive_int("num_shards", num_shards)
        self.task = _validation.one_of("task", task, residuals_lib.TASKS)
        if from_logits is not None:
            from_logits = _validation.boolean("from_logits", from_logits)
        self.temperature = _validation.positive_float("temperature", temperature)
        self.index = _validation.one_of("index", index, format_lib.INDEX_TYPES)
        self.batch_size = _validation.positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"`seed` must be an integer >= 0. Received: seed={seed!r}")
        self.seed = int(seed)
        self.num_partitions = self.ivf_sample_size = None
        if index == "ivf":
            if num_partitions is not None:
                num_partitions = _validation.positive_int("num_partitions", num_partitions)
            if ivf_sample_size is None:
                ivf_sample_size = (
                    DEFAULT_IVF_SAMPLE_SIZE if num_partitions is None else 64 * num_partitions
                )
            ivf_sample_size = _validation.positive_int("ivf_sample_size", ivf_sample_size)
            if num_partitions is not None and num_partitions > ivf_sample_size:
                raise ValueError(
                    "`ivf_sample_size` must be at least `num_partitions` (k-means needs a "
                    f"key per centroid). Received: ivf_sample_size={ivf_sample_size}, "
                    f"num_partitions={num_partitions}"
                )
            self.num_partitions, self.ivf_sample_size = num_partitions, ivf_sample_size
        elif num_partitions is not None or ivf_sample_size is not None:
            raise ValueError(
                "`num_partitions` and `ivf_sample_size` set up an IVF index; pass "
                f"index='ivf' with them. Received: index={index!r}"
            )
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(
                f"`settings` must be a dict or None. Received: {type(settings).__name__}"
            )
        try:
            json.dumps(settings)
        except (TypeError, ValueError) as error:
            raise ValueError(f"`settings` must be JSON (numbers, strings): {error}") from None
        self.settings = dict(settings or {})
        self.overwrite = _validation.boolean("overwrite", overwrite)
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        manifest = os.path.join(self.output_dir, format_lib.MANIFEST)
        if os.path.exists(manifest) and not self.overwrite:
            raise FileExistsError(
                f"A sharded memory is already at {self.output_dir} ({format_lib.MANIFEST}). "
                "Pass overwrite=True to replace it."
            )
        self.model_path = os.fspath(model_path)
        if not (self.model_path.endswith(".keras") and os.path.isfile(self.model_path)):
            raise ValueError(
                "`model_path` must be a saved Keras model, a `.keras` file. Received: "
                f"{self.model_path!r}"
                + ("" if os.path.isfile(self.model_path) else ", which does not exist")
            )
        self.layer_name = layer_name
        self._inspect_model(from_logits, sparse_residuals)

    def _inspect_model(self, from_logits, sparse_residuals):
        """Loads the model once here, to check it and read the memory's shape."""
        from keras_resmem import attach

        _, key, output, _ = inference_lib.load_key_model(
            self.model_path, self.layer_name, compile_function=False
        )
        if len(output.shape) != 2 or output.shape[-1] is None:
            raise ValueError(
                "`keras_resmem.beam` builds memories of models whose output is (batch, "
                f"num_outputs), one entry per example. Received: output shape {output.shape}"
            )
        if None in key.shape[1:]:
            raise ValueError(
                f"The key layer {self.layer_name!r} must have a fixed output shape; it has "
                f"{key.shape}"
            )
        self.key_dim = math.prod(key.shape[1:])
        self.num_outputs = int(output.shape[-1])
        if self.task == "classification" and self.num_outputs < 2:
            raise ValueError(
                "Classification needs one output per class (at least 2); the model's output "
                f"has shape {output.shape}. For a single score use task='regression'."
            )
        if sparse_residuals is not None:
            sparse_residuals = _validation.positive_int("sparse_residuals", sparse_residuals)
            if sparse_residuals > self.num_outputs:
                raise ValueError(
                    "`sparse_residuals` must be at most the number of outputs "
                    f"({self.num_outputs}). Received: sparse_residuals={sparse_residuals}"
                )
        self.sparse_residuals = sparse_residuals
        # As `attach_memory`: regression ignores it; a softmax head means probabilities.
        if from_logits is None and self.task == "regression":
            from_logits = True
        if from_logits is None and attach._outputs_are_probabilities(output):
            from_logits = False
        self.from_logits = from_logits

    def expand(self, examples):
        if self.overwrite:
            manifest = os.path.join(self.output_dir, format_lib.MANIFEST)
            if os.path.exists(manifest):
                os.remove(manifest)
        handler = inference_lib.KeyAndOutputModelHandler(
            self.model_path, self.layer_name, batch_size=self.batch_size
        )
        results = examples | "Inference" >> RunInference(handler)

        # Side inputs only for what the data decide: each is a stage more.
        side_inputs = {}
        if self.from_logits is None:  # logits unless every batch's outputs are softmax rows
            side_inputs["from_logits"] = beam.pvalue.AsSingleton(
                results
                | "LooksLikeProbabilities" >> beam.Map(lambda r: r.inference["probabilities"])
                | "AllProbabilities" >> beam.CombineGlobally(all)
                | "FromLogits" >> beam.Map(_not_all_probabilities)
            )
        if self.index == "ivf":
            side_inputs["centroids"] = beam.pvalue.AsSingleton(
                results
                | "SampleInput" >> beam.Map(_sample_input, seed=self.seed)
                | "Sample" >> beam.CombineGlobally(_SmallestPriorities(self.ivf_sample_size))
                | "TrainCentroids"
                >> beam.Map(
                    train_centroids,
                    self.output_dir,
                    num_partitions=self.num_partitions,
                    seed=self.seed,
                )
            )
        shard_settings = {
            "task": self.task,
            "num_outputs": self.num_outputs,
            "sparse_residuals": self.sparse_residuals,
            "temperature": self.temperature,
        }
        infos = (
            results
            | "SplitByShard"
            >> beam.FlatMap(
                split_by_shard,
                num_shards=self.num_shards,
                task=self.task,
                num_outputs=self.num_outputs,
            )
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards"
            >> beam.ParDo(
                _WriteShards(self.output_dir, self.num_shards, shard_settings, self.from_logits),
                **side_inputs,
            )
        )
        return (
            infos
            | "Gather" >> beam.combiners.ToList()
            | "WriteManifest"
            >> beam.Map(
                write_manifest_last,
                **{"from_logits": self.from_logits, "centroids": None, **side_inputs},
                output_dir=self.output_dir,
                num_shards=self.num_shards,
                task=self.task,
                key_dim=self.key_dim,
                num_outputs=self.num_outputs,
                sparse_residuals=self.sparse_residuals,
                temperature=self.temperature,
                index=self.index,
                settings=self.settings,
            )
        )


def _checked_arrays(examples):
    """`(x, y, ids)` of array examples `{"x", "y", "ids"}`, checked."""
    if set(examples) != {"x", "y", "ids"}:
        raise ValueError(
            "`examples` as arrays must be a dict with keys 'x', 'y' and 'ids' (ids are "
            f"required: they name the entries). Received: keys {sorted(examples)}"
        )
    x, y = np.asarray(examples["x"]), np.asarray(examples["y"])
    n = len(x)
    ids = _validation.entry_ids(examples["ids"], n)
    if len(y) != n:
        raise ValueError(
            f"`examples['y']` must have one row per example ({n}). Received: {len(y)} rows"
        )
    return x, y, ids


def _stage_arrays(arrays, directory):
    """Saves `(x, y, ids)` as `.npy` files in `directory`.

    The pipeline reads them back a batch at a time (memory-mapped): a
    `beam.Create` of the arrays themselves pickles and compresses them into
    the pipeline, which took 18x as long as the whole build on 50,000 images.
    """
    for name, array in zip(("x", "y", "ids"), arrays, strict=True):
        np.save(os.path.join(directory, name + ".npy"), array, allow_pickle=False)


class _ReadStaged(beam.DoFn):
    """`(start, stop)` -> the batch dict of those rows of the staged arrays."""

    def __init__(self, directory):
        self._directory = directory

    def setup(self):
        self._arrays = {
            name: np.load(os.path.join(self._directory, name + ".npy"), mmap_mode="r")
            for name in ("ids", "x", "y")
        }

    def process(self, bounds):
        start, stop = bounds
        yield {name: np.array(array[start:stop]) for name, array in self._arrays.items()}


def build_sharded_memory(
    examples,
    model_path,
    layer_name,
    output_dir,
    *,
    num_shards,
    task="classification",
    from_logits=None,
    sparse_residuals=None,
    temperature=1.0,
    index="exact",
    num_partitions=None,
    ivf_sample_size=None,
    seed=0,
    batch_size=256,
    settings=None,
    overwrite=False,
    options=None,
):
    """Runs a Beam pipeline that builds a sharded ResMem memory; returns the manifest's path.

    The memory holds, for every example, the entry `keras_resmem.attach_memory(
    base, layer_name, data, ids=ids)` would hold, in `num_shards` shards
    (see `BuildShardedMemory`, which does the work inside your own pipeline).

    Args:
        examples: the training examples with their ids: a TFRecord file
            pattern (`write_examples_tfrecord`'s files, read by
            `ReadExamples`); a dict of arrays `{"x": (n, ...), "y": (n,) or
            (n, c), "ids": (n,)}`; or a list of `BuildShardedMemory`'s
            elements (`(id, x, y)` tuples or batch dicts).
        model_path, layer_name, output_dir, num_shards, task, from_logits,
            sparse_residuals, temperature, index, num_partitions,
            ivf_sample_size, seed, batch_size, settings, overwrite: see
            `BuildShardedMemory`.
        options: the `PipelineOptions` to run with; default
            `default_pipeline_options()` (the `FnApiRunner`, in this process).

    Returns:
        The path of the memory's `manifest.json`.

    Raises:
        ValueError: see `BuildShardedMemory`; a run-time error is raised
            as the pipeline raises it, naming the transform.

    Example:

    ```python
    import keras_resmem.beam
    from keras_resmem.sharded import format

    base.save("base.keras")
    manifest = keras_resmem.beam.build_sharded_memory(
        {"x": x_train, "y": y_train, "ids": np.arange(len(x_train))},
        "base.keras", "pre_logits", "memory/", num_shards=4,
    )
    format.read_manifest(manifest).memory_size  # len(x_train)
    ```
    """
    transform = BuildShardedMemory(
        model_path,
        layer_name,
        output_dir,
        num_shards=num_shards,
        task=task,
        from_logits=from_logits,
        sparse_residuals=sparse_residuals,
        temperature=temperature,
        index=index,
        num_partitions=num_partitions,
        ivf_sample_size=ivf_sample_size,
        seed=seed,
        batch_size=batch_size,
        settings=settings,
        overwrite=overwrite,
    )
    staging = arrays = None
    if isinstance(examples, (str, os.PathLike)):
        source = tfrecords.ReadExamples(examples, task=task, batch_size=transform.batch_size)
    elif isinstance(examples, dict):
        arrays = _checked_arrays(examples)
    elif isinstance(examples, (list, tuple)):
        source = beam.Create(list(examples), reshuffle=False)
    else:
        raise ValueError(
            "`examples` must be a TFRecord file pattern, a dict of arrays {'x', 'y', 'ids'}, "
            f"or a list of (id, x, y) tuples or batch dicts. Received: {type(examples).__name__}"
        )
    try:
        if arrays is not None:
            os.makedirs(transform.output_dir, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".examples-", dir=transform.output_dir)
            _stage_arrays(arrays, staging)
            n, size = len(arrays[0]), transform.batch_size
            bounds = [(i, min(i + size, n)) for i in range(0, n, size)]
            source = beam.Create(bounds, reshuffle=False) | beam.ParDo(_ReadStaged(staging))
        with beam.Pipeline(options=options or default_pipeline_options()) as pipeline:
            _ = pipeline | "Examples" >> source | "BuildShardedMemory" >> transform
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    path = os.path.join(transform.output_dir, format_lib.MANIFEST)
    if not os.path.isfile(path):  # pragma: no cover - the pipeline raises first
        raise RuntimeError(f"The pipeline finished without writing {path}")
    return path
