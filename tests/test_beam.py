"""`keras_resmem.beam`: a Beam pipeline builds the entries `attach_memory` builds, in shards.

Runner behaviour, as these tests find it in apache-beam 2.77: the
`FnApiRunner` (what `DirectRunner` runs batch pipelines on, and
`build_sharded_memory`'s default) does not retry a failed bundle: the job
fails, and running it again over the same directory is the retry. The
`BundleBasedDirectRunner` retries a failed bundle (up to 4 attempts).
Both are tested: a retried bundle, and a failed job run again.
"""

import glob
import hashlib
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest

apache_beam = pytest.importorskip("apache_beam")

import keras  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

import keras_resmem  # noqa: E402
from keras_resmem import beam as resmem_beam  # noqa: E402
from keras_resmem.beam import pipeline as pipeline_lib  # noqa: E402
from keras_resmem.sharded import format as format_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, C = 1200, 5
ENTRY_NAMES = ("keys", "memory_scores", "memory_targets")


def _tiny_cnn(num_classes=C, softmax=False, input_shape=(6, 6, 1)):
    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(8, activation="tanh", name="pre_logits")(h)
    outputs = keras.layers.Dense(num_classes, activation="softmax" if softmax else None)(h)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny CNN, data with unordered, negative and large ids, attach_memory's entries."""
    root = tmp_path_factory.mktemp("beam")
    keras.utils.set_random_seed(0)
    base = _tiny_cnn()
    model_path = str(root / "base.keras")
    base.save(model_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6, 6, 1)).astype("float32")
    y = rng.integers(0, C, N)
    ids = rng.choice(np.arange(-(10**6), 10**6), N, replace=False).astype(np.int64)
    ids[:3] = [2**62, -(2**62), 0]
    resmem = keras_resmem.attach_memory(base, "pre_logits", (x, y), ids=ids, search="exact")
    memory = resmem.get_layer("residual_memory")
    order = np.argsort(memory.memory_ids.numpy())
    reference = {name: getattr(memory, name).numpy()[order] for name in ENTRY_NAMES}
    reference["memory_ids"] = memory.memory_ids.numpy()[order]
    return {
        "root": root,
        "base": base,
        "model_path": model_path,
        "x": x,
        "y": y,
        "ids": ids,
        "reference": reference,
        "resmem": resmem,
    }


def _entries(manifest_path):
    """Every shard's entries, read and checked, concatenated and sorted by id."""
    manifest = format_lib.read_manifest(manifest_path)
    shards = [format_lib.read_shard(manifest, i) for i in range(manifest.num_shards)]
    entries = {name: np.concatenate([s[name] for s in shards]) for name in manifest.entry_names()}
    order = np.argsort(entries["memory_ids"])
    return manifest, {name: a[order] for name, a in entries.items()}


def _assert_same_entries(manifest_path, reference, exact=True):
    manifest, entries = _entries(manifest_path)
    np.testing.assert_array_equal(entries["memory_ids"], reference["memory_ids"])
    for name in ENTRY_NAMES:
        if exact:
            np.testing.assert_array_equal(entries[name], reference[name], err_msg=name)
        else:
            np.testing.assert_allclose(
                entries[name], reference[name], rtol=1e-6, atol=1e-6, err_msg=name
            )
    return manifest, entries


def _file_digests(directory):
    """`{relative path: sha256}` of every file under `directory`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _arrays(setup):
    return {"x": setup["x"], "y": setup["y"], "ids": setup["ids"]}


def _assert_serves_the_same(served, whole, queries, base, reference, k):
    """The sharded memory served in one process predicts as the memory `attach_memory` built.

    Exact search over shards and over one memory rounds float32 distances
    differently, so a neighbour tied with the k-th (to ~1e-5) may be
    swapped for another: where the neighbour sets differ, the swapped ones
    must be tied with the k-th in float64.
    """
    got, want = served.predict(queries, verbose=0), whole.predict(queries, verbose=0)
    got_ids, got_weights = keras_resmem.diagnostics.neighbors_of(served, queries)
    want_ids, want_weights = keras_resmem.diagnostics.neighbors_of(whole, queries)
    same = np.array([set(a) == set(b) for a, b in zip(got_ids, want_ids, strict=True)])
    assert same.mean() >= 0.98, same.mean()
    np.testing.assert_allclose(got[same], want[same], atol=1e-5)
    by_id = np.argsort(got_ids[same], axis=1), np.argsort(want_ids[same], axis=1)
    np.testing.assert_allclose(
        np.take_along_axis(got_weights[same], by_id[0], axis=1),
        np.take_along_axis(want_weights[same], by_id[1], axis=1),
        atol=1e-5,
    )
    if same.all():
        return
    key_model = keras.Model(base.inputs, base.get_layer("pre_logits").output)
    keys = reference["keys"].astype(np.float64)
    for q, a, b in zip(
        key_model.predict(queries[~same], verbose=0).astype(np.float64),
        got_ids[~same],
        want_ids[~same],
        strict=True,
    ):
        distances = ((keys - q) ** 2).sum(axis=1)
        kth = np.sort(distances)[k - 1]
        swapped = np.searchsorted(reference["memory_ids"], sorted(set(a) ^ set(b)))
        np.testing.assert_allclose(distances[swapped], kth, rtol=1e-3)


def test_pipeline_from_arrays_writes_attach_memorys_entries_by_shard(setup):
    out = str(setup["root"] / "arrays")
    path = resmem_beam.build_sharded_memory(
        _arrays(setup),
        setup["model_path"],
        "pre_logits",
        out,
        num_shards=3,
        settings={"k": 5, "sigma": 0.5},
    )
    assert path == os.path.join(out, "manifest.json")
    # Same batches of the same rows as attach_memory: the keys are equal bit for bit.
    manifest, _ = _assert_same_entries(path, setup["reference"])
    assert manifest.memory_size == N and manifest.num_shards == 3
    assert (manifest.key_dim, manifest.num_outputs, manifest.from_logits) == (8, C, True)
    assert manifest.index == "exact" and manifest.settings == {"k": 5, "sigma": 0.5}
    # Balanced by the id hash; the staged arrays were removed.
    assert all(250 < s["size"] < 550 for s in manifest.shards)
    assert sorted(os.listdir(out)) == ["manifest.json"] + [
        format_lib.shard_name(i, 3) for i in range(3)
    ]

    if "shards" not in inspect.signature(keras_resmem.attach_memory).parameters:
        return  # the sharded loader is not there yet: the arrays were compared above
    served = keras_resmem.attach_memory(
        setup["base"], "pre_logits", shards=path, search="exact", k=7, verbose=0
    )
    whole = keras_resmem.attach_memory(
        setup["base"],
        "pre_logits",
        (setup["x"], setup["y"]),
        ids=setup["ids"],
        search="exact",
        k=7,
        verbose=0,
    )
    _assert_serves_the_same(
        served, whole, setup["x"][:64] + 0.05, setup["base"], setup["reference"], k=7
    )


def test_transform_in_a_users_pipeline_takes_id_x_y_tuples(setup):
    out = str(setup["root"] / "tuples")
    examples = list(zip(setup["ids"].tolist(), setup["x"], setup["y"].tolist(), strict=True))
    with apache_beam.Pipeline(options=pipeline_lib.default_pipeline_options()) as p:
        manifest = (
            p
            | apache_beam.Create(examples)
            | resmem_beam.BuildShardedMemory(
                setup["model_path"], "pre_logits", out, num_shards=4, batch_size=100
            )
        )
        assert_that(manifest, equal_to([os.path.join(out, "manifest.json")]))
    # Batches of 100 in Beam's order, not attach_memory's batches of 256: the
    # keys may differ in the last bits.
    _assert_same_entries(os.path.join(out, "manifest.json"), setup["reference"], exact=False)


def test_pipeline_from_tfrecord_files(setup):
    folder = setup["root"] / "tfrecords"
    folder.mkdir()
    x, y, ids = setup["x"], setup["y"], setup["ids"]
    for i in range(3):  # three files, the examples dealt out among them
        resmem_beam.write_examples_tfrecord(
            str(folder / f"train-{i:05d}-of-00003.tfrecord"), x[i::3], y[i::3], ids[i::3]
        )
    read = resmem_beam.ReadExamples(str(folder / "train-*.tfrecord"))
    assert [os.path.basename(f) for f in read.files()] == [
        f"train-{i:05d}-of-00003.tfrecord" for i in range(3)
    ]
    path = resmem_beam.build_sharded_memory(
        str(folder / "train-*.tfrecord"),
        setup["model_path"],
        "pre_logits",
        str(setup["root"] / "from_tfrecords"),
        num_shards=3,
    )
    _assert_same_entries(path, setup["reference"], exact=False)


def test_ivf_shards_share_centroids_trained_once_on_an_id_chosen_sample(setup):
    outs = [str(setup["root"] / f"ivf_{i}") for i in range(2)]
    for out, batch_size in zip(outs, (256, 100), strict=True):
        resmem_beam.build_sharded_memory(
            _arrays(setup),
            setup["model_path"],
            "pre_logits",
            out,
            num_shards=3,
            index="ivf",
            num_partitions=12,
            ivf_sample_size=600,
            batch_size=batch_size,
        )
    manifest, entries = _assert_same_entries(
        os.path.join(outs[0], "manifest.json"), setup["reference"]
    )
    assert manifest.index == "ivf"
    centroids = format_lib.read_centroids(manifest)
    assert centroids.shape == (12, 8)
    from keras_resmem.search.base import nearest_centroids

    for i in range(manifest.num_shards):
        shard = format_lib.read_shard(manifest, i)
        # Each shard lists its entries by their nearest shared centroid.
        offsets, listed = shard["ivf_offsets"], shard["ivf_ids"]
        assert offsets.shape == (13,)
        partition = np.repeat(np.arange(12), np.diff(offsets))
        np.testing.assert_array_equal(
            partition, nearest_centroids(shard["keys"], centroids)[listed]
        )
    # The sample is chosen by id, not by batching or order: another batch size
    # trains the same centroids (keys equal to 1e-6; k-means of them the same).
    other = format_lib.read_manifest(outs[1])
    np.testing.assert_allclose(format_lib.read_centroids(other), centroids, atol=1e-5)
    assert [s["size"] for s in other.shards] == [s["size"] for s in manifest.shards]


def test_softmax_model_and_sparse_residuals_as_attach_memory(setup, monkeypatch):
    keras.utils.set_random_seed(1)
    base = _tiny_cnn(softmax=True)
    model_path = str(setup["root"] / "softmax.keras")
    base.save(model_path)
    x, y, ids = setup["x"][:400], setup["y"][:400], setup["ids"][:400]
    resmem = keras_resmem.attach_memory(
        base, "pre_logits", (x, y), ids=ids, sparse_residuals=2, search="exact", verbose=0
    )
    memory = resmem.get_layer("residual_memory")
    assert memory.from_logits is False  # detected: a softmax head
    path = resmem_beam.build_sharded_memory(
        {"x": x, "y": y, "ids": ids},
        model_path,
        "pre_logits",
        str(setup["root"] / "sparse"),
        num_shards=2,
        sparse_residuals=2,
    )
    manifest, entries = _entries(path)
    assert manifest.from_logits is False and manifest.sparse_residuals == 2
    order = np.argsort(memory.memory_ids.numpy())
    for name in ("keys", "residual_ids", "residual_values", "memory_targets", "memory_ids"):
        np.testing.assert_array_equal(entries[name], getattr(memory, name).numpy()[order])

    # A head the graph check misses (as a `Lambda` softmax): the outputs tell.
    from keras_resmem import attach

    monkeypatch.setattr(attach, "_outputs_are_probabilities", lambda output: False)
    path = resmem_beam.build_sharded_memory(
        {"x": x, "y": y, "ids": ids},
        model_path,
        "pre_logits",
        str(setup["root"] / "sparse_detected"),
        num_shards=2,
        sparse_residuals=2,
    )
    manifest, detected = _entries(path)
    assert manifest.from_logits is False
    np.testing.assert_array_equal(detected["residual_values"], entries["residual_values"])


def test_regression_memory_as_attach_memory(setup):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(8, activation="tanh", name="pre_logits")(h)
    base = keras.Model(inputs, keras.layers.Dense(2)(h))
    model_path = str(setup["root"] / "regression.keras")
    base.save(model_path)
    x, ids = setup["x"][:300], setup["ids"][:300]
    targets = np.random.default_rng(4).normal(size=(300, 2)).astype("float32")
    memory = keras_resmem.attach_memory(
        base, "pre_logits", (x, targets), ids=ids, task="regression", search="exact", verbose=0
    ).get_layer("residual_memory")
    path = resmem_beam.build_sharded_memory(
        {"x": x, "y": targets, "ids": ids},
        model_path,
        "pre_logits",
        str(setup["root"] / "regression"),
        num_shards=2,
        task="regression",
    )
    manifest, entries = _entries(path)
    assert manifest.task == "regression" and manifest.from_logits is memory.from_logits
    order = np.argsort(memory.memory_ids.numpy())
    for name in (*ENTRY_NAMES, "memory_ids"):
        np.testing.assert_array_equal(entries[name], getattr(memory, name).numpy()[order])


def test_a_retried_bundle_rewrites_its_shard_the_same(setup, tmp_path, monkeypatch):
    """The BundleBasedDirectRunner retries a bundle whose shard write failed after writing."""
    marker = tmp_path / "failed_once"
    written = []
    original = pipeline_lib.write_shard_parts

    def write_then_fail_once(output_dir, index, num_shards, parts, **kwargs):
        info = original(output_dir, index, num_shards, parts, **kwargs)
        written.append((index, info, _file_digests(output_dir)))
        if index == 1 and not marker.exists():
            marker.touch()
            raise RuntimeError("injected failure after writing shard 1")
        return info

    monkeypatch.setattr(pipeline_lib, "write_shard_parts", write_then_fail_once)
    out = str(tmp_path / "memory")
    options = PipelineOptions(flags=[], runner="BundleBasedDirectRunner")
    path = resmem_beam.build_sharded_memory(
        _arrays(setup), setup["model_path"], "pre_logits", out, num_shards=3, options=options
    )
    assert marker.exists()  # it failed once, and the runner retried
    shard_1 = [(info, files) for index, info, files in written if index == 1]
    assert len(shard_1) == 2
    # The retry wrote the same bytes: the same digest and the same files.
    assert shard_1[0][0] == shard_1[1][0]
    name = format_lib.shard_name(1, 3)
    assert {k: v for k, v in shard_1[0][1].items() if k.startswith(name)} == {
        k: v for k, v in shard_1[1][1].items() if k.startswith(name)
    }
    # Every entry once, and no temporary directory left behind.
    _assert_same_entries(path, setup["reference"])
    assert sorted(os.listdir(out)) == ["manifest.json"] + [
        format_lib.shard_name(i, 3) for i in range(3)
    ]


def test_a_failed_job_run_again_ends_with_the_same_memory(setup, tmp_path, monkeypatch):
    """The FnApiRunner does not retry: the job fails, and is run again to completion."""
    marker = tmp_path / "failed_once"
    original = pipeline_lib.write_shard_parts
    calls = []

    def fail_on_second_shard_once(output_dir, index, num_shards, parts, **kwargs):
        calls.append(index)
        if len(calls) == 2 and not marker.exists():
            marker.touch()
            raise RuntimeError("injected failure")
        return original(output_dir, index, num_shards, parts, **kwargs)

    monkeypatch.setattr(pipeline_lib, "write_shard_parts", fail_on_second_shard_once)
    out = str(tmp_path / "memory")
    arguments = (_arrays(setup), setup["model_path"], "pre_logits", out)
    with pytest.raises(RuntimeError, match="injected failure"):
        resmem_beam.build_sharded_memory(*arguments, num_shards=4)
    # No manifest (it is written last), so no reader takes the partial memory.
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    before = _file_digests(out)
    assert before and all(p.startswith(format_lib.shard_name(calls[0], 4)) for p in before)

    path = resmem_beam.build_sharded_memory(*arguments, num_shards=4)
    after = _file_digests(out)
    # The shard written before the failure was written again, byte for byte.
    assert {p: after[p] for p in before} == before
    _assert_same_entries(path, setup["reference"])


def test_writing_a_shard_twice_leaves_one_identical_shard(setup, tmp_path):
    """A duplicated bundle: the same shard's entries written twice, in another order."""
    rng = np.random.default_rng(3)
    n = 50
    parts = [
        {
            "ids": setup["ids"][i : i + 10],
            "keys": rng.normal(size=(10, 8)).astype("float32"),
            "outputs": rng.normal(size=(10, C)).astype("float32"),
            "y": rng.integers(0, C, 10).astype(np.int32),
        }
        for i in range(0, n, 10)
    ]
    settings = {"task": "classification", "from_logits": True, "num_outputs": C}
    first = pipeline_lib.write_shard_parts(str(tmp_path), 0, 1, parts, **settings)
    files = _file_digests(str(tmp_path))
    second = pipeline_lib.write_shard_parts(str(tmp_path), 0, 1, parts[::-1], **settings)
    assert first == second and first["size"] == n
    assert _file_digests(str(tmp_path)) == files
    assert os.listdir(tmp_path) == [format_lib.shard_name(0, 1)]


def test_shards_no_id_hashes_to_are_written_empty(setup, tmp_path):
    ids = np.array([5, 17, 123456789], dtype=np.int64)
    assert len(set(format_lib.shard_of(ids, 8).tolist())) < 8
    path = resmem_beam.build_sharded_memory(
        [(int(i), setup["x"][j], int(setup["y"][j])) for j, i in enumerate(ids)],
        setup["model_path"],
        "pre_logits",
        str(tmp_path),
        num_shards=8,
        index="ivf",
    )
    manifest, entries = _entries(path)
    assert manifest.memory_size == 3 and manifest.num_shards == 8
    assert sorted(s["size"] for s in manifest.shards).count(0) >= 5
    np.testing.assert_array_equal(entries["memory_ids"], ids)


def test_bad_arguments_are_named_before_the_pipeline_runs(setup, tmp_path):
    args = (setup["model_path"], "pre_logits", str(tmp_path / "m"))
    with pytest.raises(ValueError, match="`num_shards` must be a positive integer"):
        resmem_beam.BuildShardedMemory(*args, num_shards=0)
    with pytest.raises(ValueError, match="`layer_name` must name a layer.*Valid names"):
        resmem_beam.BuildShardedMemory(setup["model_path"], "nope", "m", num_shards=2)
    with pytest.raises(ValueError, match="`model_path`.*does not exist"):
        resmem_beam.BuildShardedMemory("missing.keras", "pre_logits", "m", num_shards=2)
    with pytest.raises(ValueError, match="`index` must be one of"):
        resmem_beam.BuildShardedMemory(*args, num_shards=2, index="scann")
    with pytest.raises(ValueError, match="pass index='ivf'"):
        resmem_beam.BuildShardedMemory(*args, num_shards=2, num_partitions=4)
    with pytest.raises(ValueError, match="`ivf_sample_size` must be at least `num_partitions`"):
        resmem_beam.BuildShardedMemory(
            *args, num_shards=2, index="ivf", num_partitions=64, ivf_sample_size=10
        )
    with pytest.raises(ValueError, match="`sparse_residuals` must be at most"):
        resmem_beam.BuildShardedMemory(*args, num_shards=2, sparse_residuals=6)
    with pytest.raises(ValueError, match="`settings` must be JSON"):
        resmem_beam.BuildShardedMemory(*args, num_shards=2, settings={"k": object()})
    with pytest.raises(ValueError, match="ids are required"):
        resmem_beam.build_sharded_memory({"x": setup["x"], "y": setup["y"]}, *args, num_shards=2)
    with pytest.raises(ValueError, match="matches no file"):
        resmem_beam.build_sharded_memory(str(tmp_path / "*.tfrecord"), *args, num_shards=2)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        resmem_beam.BuildShardedMemory(*args, num_shards=2)


def test_bad_examples_fail_the_pipeline_naming_the_example(setup, tmp_path):
    args = (setup["model_path"], "pre_logits")
    x, y, ids = setup["x"][:300], setup["y"][:300], setup["ids"][:300].copy()
    ids[250] = ids[7]
    with pytest.raises(ValueError, match=rf"occur more than once, e.g. \[{ids[7]}\]"):
        resmem_beam.build_sharded_memory(
            {"x": x, "y": y, "ids": ids}, *args, str(tmp_path / "a"), num_shards=2
        )
    assert not os.path.exists(tmp_path / "a" / "manifest.json")
    bad = y.copy()
    bad[5] = C
    with pytest.raises(ValueError, match=rf"label {C} for the example of id {setup['ids'][5]}"):
        resmem_beam.build_sharded_memory(
            {"x": x, "y": bad, "ids": setup["ids"][:300]}, *args, str(tmp_path / "b"), num_shards=2
        )
    with pytest.raises(ValueError, match=r"the model's input shape \(6, 6, 1\).*\(id 9\)"):
        resmem_beam.build_sharded_memory(
            [(9, np.zeros((5, 5, 1), "float32"), 1)], *args, str(tmp_path / "c"), num_shards=1
        )
    nan = x[:3].copy()
    nan[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=rf"NaN or infinite.*id {setup['ids'][1]}"):
        resmem_beam.build_sharded_memory(
            {"x": nan, "y": y[:3], "ids": setup["ids"][:3]},
            *args,
            str(tmp_path / "d"),
            num_shards=1,
        )
    with pytest.raises(ValueError, match="`examples` is empty"):
        resmem_beam.build_sharded_memory([], *args, str(tmp_path / "e"), num_shards=2)


def test_beam_is_an_optional_extra_with_an_install_hint():
    code = (
        "import sys; sys.modules['apache_beam'] = None\n"
        "import keras_resmem\n"
        "assert 'keras_resmem.beam' not in sys.modules\n"
        "try:\n"
        "    import keras_resmem.beam\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert 'pip install "keras-resmem[beam]"' in result.stdout


def test_benchmark_smoke_run(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import beam_pipeline

    keras.utils.set_random_seed(0)
    model_path = str(tmp_path / "cnn.keras")
    _tiny_cnn(num_classes=10, input_shape=(28, 28, 1)).save(model_path)
    results = beam_pipeline.main(
        [
            "--size",
            "1500",
            "--rounds",
            "1",
            "--queries",
            "200",
            "--model",
            model_path,
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert results["size"] == 1500 and results["shards"] == 4
    assert results["attach_s"] and results["pipeline_s"] and results["ratio"] > 0
    assert (tmp_path / "beam_pipeline.json").exists() and (tmp_path / "beam_pipeline.md").exists()
    served = results["served_against_attach"]["auto"]
    assert served["queries"] == 200 and served["search"] == "sharded"
    assert served["rows_same_neighbor_ids_in_order"] >= 198


@pytest.mark.large
def test_fashion_mnist_50k_into_4_shards_equals_attach_memory(tmp_path):
    from keras_resmem.datasets import load_fashion_mnist

    (x, y), _ = load_fashion_mnist()
    x = (x[:50_000].astype("float32") / 255.0)[..., None]
    y = y[:50_000].astype(np.int64)
    ids = np.random.default_rng(0).permutation(10**7)[:50_000].astype(np.int64)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 3, activation="relu", padding="same")(inputs)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(32, 3, activation="relu", padding="same")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(32, activation="relu", name="pre_logits")(h)
    base = keras.Model(inputs, keras.layers.Dense(10)(h))
    base.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    base.fit(x, y, batch_size=128, epochs=1, verbose=0)
    model_path = str(tmp_path / "cnn.keras")
    base.save(model_path)

    whole = keras_resmem.attach_memory(
        base, "pre_logits", (x, y), ids=ids, search="exact", k=25, verbose=0
    )
    memory = whole.get_layer("residual_memory")
    order = np.argsort(memory.memory_ids.numpy())
    reference = {name: getattr(memory, name).numpy()[order] for name in ENTRY_NAMES}
    reference["memory_ids"] = memory.memory_ids.numpy()[order]
    path = resmem_beam.build_sharded_memory(
        {"x": x, "y": y, "ids": ids}, model_path, "pre_logits", str(tmp_path / "m"), num_shards=4
    )
    manifest, _ = _assert_same_entries(path, reference, exact=False)
    assert manifest.memory_size == 50_000
    assert all(11_000 < s["size"] < 14_000 for s in manifest.shards)

    (_, _), (x_test, _) = load_fashion_mnist()
    queries = (x_test[:500].astype("float32") / 255.0)[..., None]
    for search in ("auto", "exact"):  # each shard searched and merged, or one exact search
        served = keras_resmem.attach_memory(
            base, "pre_logits", shards=path, search=search, k=25, verbose=0
        )
        assert served.get_layer("residual_memory").search_backend == (
            "sharded" if search == "auto" else "exact"
        )
        _assert_serves_the_same(served, whole, queries, base, reference, k=25)
        # Bit for bit wherever the neighbours are the same (all but float32 near-ties).
        got, want = served.predict(queries, verbose=0), whole.predict(queries, verbose=0)
        got_ids, got_w = keras_resmem.diagnostics.neighbors_of(served, queries)
        want_ids, want_w = keras_resmem.diagnostics.neighbors_of(whole, queries)
        same = (got_ids == want_ids).all(axis=1)
        assert same.mean() >= 0.99, same.mean()
        np.testing.assert_array_equal(got[same], want[same])
        np.testing.assert_array_equal(got_w[same], want_w[same])
