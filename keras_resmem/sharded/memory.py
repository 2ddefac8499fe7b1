"""A sharded memory in one process: every shard read (checked) into one `ResidualMemory`."""

import keras
import numpy as np

import keras_resmem.sharded.format as format_lib
from keras_resmem import memory_writer as writer_lib
from keras_resmem import search as search_lib


def default_search(manifest, centroids=None):
    """The search a sharded memory is served with by default.

    Exact manifests: `Sharded` (each shard searched exactly, the top-k merged).
    IVF manifests: `IVF` over the shards' own lists and their shared
    centroids; a query probes the same partitions in every shard, so this is
    the merge of the shards' IVF answers.
    """
    if manifest.index == "ivf":
        num_probes = manifest.settings.get("num_probes")
        if centroids is None:
            centroids = format_lib.read_centroids(manifest)
        return search_lib.IVF(
            num_partitions=len(centroids),
            num_probes=num_probes if isinstance(num_probes, int) and num_probes > 0 else None,
        )
    return search_lib.Sharded([shard["size"] for shard in manifest.shards])


def load_entries(manifest, verbose=1):
    """Reads every shard of `manifest` into one memory, shard after shard.

    Each shard is checked (`format.read_shard`) before its rows are copied,
    and freed after: the memory is held once, plus one shard.

    Returns:
        `(entries, index)`: a `MemoryEntries` for `ResidualMemory._fill`, and
        for an IVF manifest the `IVF.adopt_index` arguments (the shared
        centroids and the shards' lists joined), else None.
    """
    n = manifest.memory_size
    arrays, bases = {}, {}
    for name, (dtype, shape) in manifest.entry_specs(n).items():
        arrays[name], bases[name] = writer_lib.with_spare_rows(n, shape[1:], dtype)
    ivf = manifest.index == "ivf"
    centroids = format_lib.read_centroids(manifest) if ivf else None
    owners, members = [], []
    progbar = keras.utils.Progbar(manifest.num_shards, verbose=verbose, unit_name="shard")
    start = 0
    for i, entry in enumerate(manifest.shards):
        shard = format_lib.read_shard(manifest, i, None if centroids is None else len(centroids))
        size = entry["size"]
        for name in arrays:
            arrays[name][start : start + size] = shard[name]
        if ivf:
            offsets = shard["ivf_offsets"]
            owners.append(np.repeat(np.arange(len(offsets) - 1, dtype=np.int32), np.diff(offsets)))
            members.append(shard["ivf_ids"].astype(np.int64) + start)
        start += size
        del shard
        progbar.update(i + 1)
    entries = writer_lib.MemoryEntries(arrays, n, manifest.key_dim, manifest.num_outputs, bases)
    if not ivf:
        return entries, None
    owner, member = np.concatenate(owners), np.concatenate(members)
    order = np.argsort(owner, kind="stable")
    offsets = np.zeros(len(centroids) + 1, np.int32)
    np.cumsum(np.bincount(owner, minlength=len(centroids)), out=offsets[1:])
    index = {"centroids": centroids, "offsets": offsets, "ids": member[order].astype(np.int32)}
    return entries, index
