"""The files of a sharded memory: shard directories of `.npy` arrays, and a manifest.

A sharded memory is a directory:

    manifest.json                  what the shards are (written last)
    centroids.npy                  IVF only: the coarse centroids every shard shares
    shard-00000-of-00004/
        keys.npy                   (n, key_dim) float32
        memory_scores.npy          (n, num_outputs) float32: the network's outputs
          or residual_ids.npy      (n, m) int32     } `sparse_residuals=m`: the m
             residual_values.npy   (n, m) float16   } largest residual entries
        memory_targets.npy         (n,) int32 class ids, or (n, num_outputs) float32
        memory_ids.npy             (n,) int64 entry ids, ascending
        ivf_offsets.npy            IVF only: (P + 1,) int32 partition offsets
        ivf_ids.npy                IVF only: (n,) int32 shard positions by partition
        shard.json                 the files' dtypes, shapes and SHA-256 digests

The per-entry arrays are named as `ResidualMemory`'s variables. A shard's
entries are sorted by id, so a shard's bytes depend only on which entries
it holds: writing it twice (a retried Beam bundle) writes the same files,
atomically (`_io.atomic_directory`), and a reader never sees half a shard.

Every file is untrusted input. `read_manifest` and `read_shard` load arrays
with `allow_pickle=False`, compare each file's header (dtype, shape) with
`shard.json` before reading its data, check its SHA-256, and run the same
value checks as a loaded `.keras` memory (`_integrity.check_entries`):
nothing reaches a graph or native code unchecked.
"""

import dataclasses
import hashlib
import json
import os
import re

import numpy as np

from keras_resmem import _integrity, _io, _validation
from keras_resmem import residuals as residuals_lib

FORMAT = "keras_resmem.sharded_memory"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_INFO = "shard.json"
CENTROIDS = "centroids.npy"
INDEX_TYPES = ("exact", "ivf")

_SHARD_NAME = re.compile(r"shard-(\d{5})-of-(\d{5})")
_ENTRY_FILES = {
    "keys",
    "memory_scores",
    "residual_ids",
    "residual_values",
    "memory_targets",
    "memory_ids",
}
_IVF_FILES = {"ivf_offsets", "ivf_ids"}
_CHUNK = 1 << 24


class ShardedMemoryError(_integrity.CorruptMemoryError):
    """A sharded memory whose files fail a check; the message names the file and the problem."""


def _fail(where, problem):
    raise ShardedMemoryError(
        f"The sharded memory at {where} is invalid: {problem}. Its files are corrupt, "
        "incomplete or were modified; nothing was loaded."
    )


def shard_name(index, num_shards):
    """`shard-00002-of-00004`: the directory of shard `index` of `num_shards`."""
    return f"shard-{index:05d}-of-{num_shards:05d}"


def splitmix64(values):
    """SplitMix64's finalizer of each int64 in `values`, as uint64: a fixed, well-mixed hash."""
    z = np.asarray(values, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def shard_of(ids, num_shards):
    """The shard of each entry id: a fixed hash of the id (splitmix64), modulo `num_shards`.

    Depends on the id alone, never on the order or batching of the data, so
    every worker, and every retry, sends an entry to the same shard, and the
    shards are balanced for any ids (consecutive or not).
    """
    return (splitmix64(ids) % np.uint64(num_shards)).astype(np.int64)


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _shard_digest(files):
    """One digest of a shard: of its files' names, dtypes, shapes and digests."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A sharded memory's description, as `read_manifest` checked it.

    Attributes:
        directory: the directory holding the manifest and the shards.
        task, from_logits, sparse_residuals, temperature: as `ResidualMemory`'s
            (`temperature` is the one sparse residuals were computed with).
        key_dim, num_outputs: the entries' shape.
        shards: one dict per shard, in order: `name`, `size`, `digest`.
        index: `"exact"`, or `"ivf"` (shared centroids in `centroids.npy`).
        centroids_digest: the SHA-256 of `centroids.npy` (IVF), else None.
        settings: the ResMem settings the memory was built with (`k`,
            `sigma`, `temperature`, `method`, `knn_weight`), the defaults of
            a model that serves it.
    """

    directory: str
    task: str
    from_logits: bool
    sparse_residuals: object
    temperature: float
    key_dim: int
    num_outputs: int
    shards: tuple
    index: str = "exact"
    centroids_digest: object = None
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def num_shards(self):
        return len(self.shards)

    @property
    def memory_size(self):
        return sum(shard["size"] for shard in self.shards)

    @property
    def path(self):
        return os.path.join(self.directory, MANIFEST)

    def entry_names(self):
        """The per-entry array names a shard of this memory holds."""
        residual = (
            ["memory_scores"]
            if self.sparse_residuals is None
            else ["residual_ids", "residual_values"]
        )
        return ["keys", *residual, "memory_targets", "memory_ids"]

    def entry_specs(self, n):
        """`{name: (dtype, shape)}` of a shard of `n` entries."""
        c = self.num_outputs
        specs = {"keys": ("float32", (n, self.key_dim))}
        if self.sparse_residuals is None:
            specs["memory_scores"] = ("float32", (n, c))
        else:
            specs["residual_ids"] = ("int32", (n, self.sparse_residuals))
            specs["residual_values"] = ("float16", (n, self.sparse_residuals))
        if self.task == "classification":
            specs["memory_targets"] = ("int32", (n,))
        else:
            specs["memory_targets"] = ("float32", (n, c))
        specs["memory_ids"] = ("int64", (n,))
        return specs

    def to_json(self):
        return {
            "format": FORMAT,
            "version": VERSION,
            "task": self.task,
            "from_logits": self.from_logits,
            "sparse_residuals": self.sparse_residuals,
            "temperature": self.temperature,
            "key_dim": self.key_dim,
            "num_outputs": self.num_outputs,
            "index": self.index,
            "centroids_digest": self.centroids_digest,
            "settings": self.settings,
            "memory_size": self.memory_size,
            "shards": [dict(shard) for shard in self.shards],
        }


def ivf_lists(partitions, num_partitions):
    """`(offsets, ids)`: a shard's inverted lists from each entry's partition (`(n,)` ints)."""
    partitions = np.asarray(partitions)
    ids = np.argsort(partitions, kind="stable").astype(np.int32)
    offsets = np.zeros(num_partitions + 1, dtype=np.int32)
    np.cumsum(np.bincount(partitions, minlength=num_partitions), out=offsets[1:])
    return offsets, ids


def write_shard(directory, index, num_shards, arrays, *, partitions=None, num_partitions=None):
    """Writes one shard, atomically, and returns its manifest entry.

    Args:
        directory: the sharded memory's directory.
        index, num_shards: which shard this is.
        arrays: the entries by variable name (`MemoryWriter.finish().arrays`):
            `keys`, `memory_scores` (or `residual_ids` and `residual_values`),
            `memory_targets`, `memory_ids`. They are sorted by id here.
        partitions: IVF only: each entry's partition under the shared
            centroids, `(n,)`, and `num_partitions`, their count.

    Returns:
        `{"name", "size", "digest"}`. Writing the same entries again (in any
        order) writes the same bytes and returns the same digest; the shard
        directory is replaced in one step, never seen half written.
    """
    names = set(arrays)
    if not names <= _ENTRY_FILES or "keys" not in names or "memory_ids" not in names:
        raise ValueError(
            f"`arrays` must hold a memory's entry arrays {sorted(_ENTRY_FILES)}. "
            f"Received: {sorted(names)}"
        )
    order = np.argsort(np.asarray(arrays["memory_ids"]), kind="stable")
    arrays = {name: np.ascontiguousarray(np.asarray(a)[order]) for name, a in arrays.items()}
    if partitions is not None:
        offsets, ivf_ids = ivf_lists(np.asarray(partitions)[order], num_partitions)
        arrays.update(ivf_offsets=offsets, ivf_ids=ivf_ids)
    name = shard_name(index, num_shards)
    path = os.path.join(directory, name)
    files = {}
    with _io.atomic_directory(path, overwrite=True) as tmp:
        for array_name in sorted(arrays):
            file_path = os.path.join(tmp, array_name + ".npy")
            np.save(file_path, arrays[array_name], allow_pickle=False)
            files[array_name] = {
                "dtype": arrays[array_name].dtype.name,
                "shape": list(arrays[array_name].shape),
                "sha256": _sha256_file(file_path),
            }
        size = len(arrays["memory_ids"])
        info = {"index": index, "num_shards": num_shards, "size": size, "files": files}
        with open(os.path.join(tmp, SHARD_INFO), "w") as f:
            json.dump(info, f, sort_keys=True, indent=1)
    return {"name": name, "size": size, "digest": _shard_digest(files)}


def write_centroids(directory, centroids):
    """Writes the shared IVF centroids (atomically); returns their SHA-256."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    path = os.path.join(directory, CENTROIDS)
    with _io.atomic_path(path) as tmp:
        np.save(tmp, centroids, allow_pickle=False)
    return _sha256_file(path)


def write_manifest(
    directory,
    shards,
    *,
    task,
    from_logits,
    key_dim,
    num_outputs,
    sparse_residuals=None,
    temperature=1.0,
    index="exact",
    centroids_digest=None,
    settings=None,
):
    """Writes `manifest.json` last (atomically), once every shard is written.

    Args:
        shards: `write_shard`'s return values, one per shard, in any order.
        Others: see `Manifest`.

    Returns:
        The manifest's path.
    """
    shards = sorted((dict(s) for s in shards), key=lambda s: s["name"])
    num_shards = len(shards)
    expected = [shard_name(i, num_shards) for i in range(num_shards)]
    if [s["name"] for s in shards] != expected:
        raise ValueError(
            f"`shards` must be one of each shard {expected[:3]}...; received "
            f"{[s['name'] for s in shards][:6]}"
        )
    manifest = Manifest(
        directory=os.path.abspath(directory),
        task=task,
        from_logits=bool(from_logits),
        sparse_residuals=sparse_residuals,
        temperature=float(temperature),
        key_dim=int(key_dim),
        num_outputs=int(num_outputs),
        shards=tuple(shards),
        index=index,
        centroids_digest=centroids_digest,
        settings=dict(settings or {}),
    )
    text = json.dumps(manifest.to_json(), indent=1, sort_keys=True)
    _io.write_text(manifest.path, text)
    return manifest.path


def _field(data, name, kind, where):
    if name not in data:
        _fail(where, f"`{name}` is missing")
    value = data[name]
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        _fail(where, f"`{name}` is {value!r}, not a {getattr(kind, '__name__', kind)}")
    return value


def read_manifest(path):
    """Reads and checks a sharded memory's manifest (`manifest.json`, or its directory).

    Returns:
        A `Manifest`.

    Raises:
        FileNotFoundError: no manifest at `path`.
        ShardedMemoryError: a manifest that is not valid JSON, not this
            format, or whose fields are missing or out of range.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"`shards` must be a sharded memory's manifest.json (or its directory), as "
            f"`keras_resmem.beam.build_sharded_memory` writes. Received: {path!r}, not a file"
        )
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 24))
    except (ValueError, UnicodeDecodeError) as error:
        _fail(path, f"the manifest is not JSON ({error})")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        _fail(path, f"the manifest's `format` is not {FORMAT!r}")
    if data.get("version") != VERSION:
        _fail(path, f"manifest version {data.get('version')!r}; this library reads {VERSION}")
    task = _field(data, "task", str, path)
    if task not in residuals_lib.TASKS:
        _fail(path, f"`task` is {task!r}, not one of {residuals_lib.TASKS}")
    index = _field(data, "index", str, path)
    if index not in INDEX_TYPES:
        _fail(path, f"`index` is {index!r}, not one of {INDEX_TYPES}")
    sparse = data.get("sparse_residuals")
    if sparse is not None and not (isinstance(sparse, int) and sparse >= 1):
        _fail(path, f"`sparse_residuals` is {sparse!r}")
    key_dim = _field(data, "key_dim", int, path)
    num_outputs = _field(data, "num_outputs", int, path)
    if key_dim < 1 or num_outputs < 1 or (sparse is not None and sparse > num_outputs):
        _fail(path, "`key_dim`, `num_outputs` or `sparse_residuals` out of range")
    raw_shards = _field(data, "shards", list, path)
    if not raw_shards:
        _fail(path, "it lists no shards")
    shards = []
    for i, shard in enumerate(raw_shards):
        if not isinstance(shard, dict):
            _fail(path, f"shard {i} is not an object")
        name = _field(shard, "name", str, path)
        # A plain name inside the directory: never a path elsewhere.
        if name != shard_name(i, len(raw_shards)):
            _fail(path, f"shard {i} is named {name!r}, not {shard_name(i, len(raw_shards))!r}")
        size = _field(shard, "size", int, path)
        digest = _field(shard, "digest", str, path)
        shards.append({"name": name, "size": size, "digest": digest})
    if sum(s["size"] for s in shards) != data.get("memory_size"):
        _fail(path, "`memory_size` is not the sum of the shards' sizes")
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        _fail(path, "`settings` is not an object")
    centroids_digest = data.get("centroids_digest")
    if index == "ivf" and not isinstance(centroids_digest, str):
        _fail(path, "an IVF memory's `centroids_digest` is missing")
    temperature = _field(data, "temperature", float, path)
    try:
        temperature = _validation.positive_float("temperature", temperature)
    except ValueError as error:
        _fail(path, str(error))
    return Manifest(
        directory=os.path.dirname(path),
        task=task,
        from_logits=bool(_field(data, "from_logits", bool, path)),
        sparse_residuals=sparse,
        temperature=temperature,
        key_dim=key_dim,
        num_outputs=num_outputs,
        shards=tuple(shards),
        index=index,
        centroids_digest=centroids_digest,
        settings=settings,
    )


def _load_checked(path, dtype, shape, sha256, where):
    """Loads one `.npy` file after checking its header and its bytes' digest."""
    if not os.path.isfile(path) or os.path.islink(path):
        _fail(where, f"{os.path.basename(path)} is missing (or not a plain file)")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            header = read_header(f, max_header_size=10000)
    except (ValueError, OSError, SyntaxError) as error:
        _fail(where, f"{os.path.basename(path)} is not a .npy file ({error})")
    file_shape, fortran, file_dtype = header
    if file_dtype.hasobject or fortran:
        _fail(where, f"{os.path.basename(path)} holds objects or is not C-ordered")
    if file_dtype != np.dtype(dtype) or tuple(file_shape) != tuple(shape):
        _fail(
            where,
            f"{os.path.basename(path)} holds {file_dtype} {tuple(file_shape)}, "
            f"not {dtype} {tuple(shape)}",
        )
    if _sha256_file(path) != sha256:
        _fail(where, f"{os.path.basename(path)} does not match its SHA-256 digest")
    return np.load(path, allow_pickle=False)


def read_centroids(manifest):
    """The shared IVF centroids, `(P, key_dim)` float32, checked against the manifest."""
    path = os.path.join(manifest.directory, CENTROIDS)
    if not os.path.isfile(path) or _sha256_file(path) != manifest.centroids_digest:
        _fail(manifest.directory, f"{CENTROIDS} is missing or does not match its digest")
    centroids = np.load(path, allow_pickle=False)
    if (
        centroids.dtype != np.float32
        or centroids.ndim != 2
        or centroids.shape[1] != manifest.key_dim
        or not len(centroids)
        or not np.isfinite(centroids).all()
    ):
        _fail(manifest.directory, f"{CENTROIDS} is not finite float32 (P, {manifest.key_dim})")
    return centroids


def read_shard(manifest, index, num_partitions=None):
    """Reads shard `index` of `manifest`, checked; returns its arrays by name.

    The per-entry arrays are named as `ResidualMemory`'s variables; an IVF
    shard adds `ivf_offsets` and `ivf_ids`. `num_partitions`: the number of
    shared centroids, where the caller has read them (`read_centroids`) already.

    Raises:
        ShardedMemoryError: a missing file, a file whose dtype, shape or
            digest differs from what was written, or values a memory cannot
            hold (non-finite keys, class ids out of range, repeated ids).
    """
    entry = manifest.shards[index]
    where = os.path.join(manifest.directory, entry["name"])
    info_path = os.path.join(where, SHARD_INFO)
    try:
        with open(info_path, "rb") as f:
            info = json.loads(f.read(1 << 20))
        files = info["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        _fail(where, f"its {SHARD_INFO} cannot be read ({error})")
    if not isinstance(files, dict) or _shard_digest(files) != entry["digest"]:
        _fail(where, f"its {SHARD_INFO} does not match the manifest's digest")
    n = entry["size"]
    specs = manifest.entry_specs(n)
    if manifest.index == "ivf":
        p = len(read_centroids(manifest)) if num_partitions is None else num_partitions
        specs.update(ivf_offsets=("int32", (p + 1,)), ivf_ids=("int32", (n,)))
    if set(files) != set(specs):
        _fail(where, f"it holds {sorted(files)}, not {sorted(specs)}")
    arrays = {}
    for name, (dtype, shape) in specs.items():
        sha = files[name].get("sha256") if isinstance(files[name], dict) else None
        arrays[name] = _load_checked(os.path.join(where, name + ".npy"), dtype, shape, sha, where)
    try:
        _integrity.check_entries(
            entry["name"],
            {name: arrays[name] for name in manifest.entry_names()},
            task=manifest.task,
            num_outputs=manifest.num_outputs,
            memory_size=n,
            key_dim=manifest.key_dim,
        )
    except _integrity.CorruptMemoryError as error:
        # The same checks as a loaded `.keras` memory, named by the shard's path.
        _fail(where, str(error).split(" is invalid: ", 1)[-1].split(". The file", 1)[0])
    ids = arrays["memory_ids"]
    if n > 1 and (np.diff(ids) <= 0).any():
        _fail(where, "its `memory_ids` are not strictly ascending")
    # Each id in the one shard its hash names: no entry is in two shards.
    wrong = shard_of(ids, manifest.num_shards) != index
    if wrong.any():
        _fail(where, f"{int(wrong.sum())} of its ids belong to other shards (`shard_of`)")
    if manifest.index == "ivf":
        offsets, ivf_ids = arrays["ivf_offsets"], arrays["ivf_ids"]
        if offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
            _fail(where, f"its `ivf_offsets` must rise from 0 to its {n} entries")
        if not np.array_equal(np.sort(ivf_ids), np.arange(n)):
            _fail(where, f"its `ivf_ids` must list every entry 0..{n - 1} once")
    return arrays
