"""Untrusted files never crash the process; bad rows never poison a batch (issue 19)."""

import io
import json
import os
import subprocess
import sys
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resmem
from keras_resmem import search as search_lib

NUM_CLASSES = 4


def _base(head=None):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), name="features")
    h = keras.layers.Dense(8, activation="tanh", name="pre_logits")(inputs)
    logits = keras.layers.Dense(NUM_CLASSES, name="logits")(h)
    return keras.Model(inputs, head(logits) if head else logits)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, NUM_CLASSES, n)


def _rewrite(src, dst, edits, drop_digest=False):
    """Copies the `.keras` zip `src` to `dst`, `edits[suffix](bytes)` replacing members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if drop_digest and item.filename.endswith("memory_digest.json"):
                continue
            for suffix, edit in edits.items():
                if item.filename.endswith(suffix):
                    data = edit(data)
            zout.writestr(item, data)
    return dst


def _npy(edit):
    def apply(data):
        array = np.load(io.BytesIO(data), allow_pickle=False).copy()
        array = edit(array)
        out = io.BytesIO()
        np.save(out, array, allow_pickle=False)
        return out.getvalue()

    return apply


def _h5_var(name, edit, tmp_path):
    def apply(data):
        path = tmp_path / "weights.h5"
        path.write_bytes(data)
        with h5py.File(path, "r+") as f:
            dataset = f[f"layers/residual_memory/vars/{name}"]
            dataset[...] = edit(dataset[...])
        return path.read_bytes()

    return apply


_LOADER = """
import sys, keras, keras_resmem
for path in sys.argv[1:]:
    try:
        keras.saving.load_model(path, safe_mode=True)
        print(path, "LOADED", flush=True)
    except Exception as e:
        print(path, "ERROR", type(e).__name__, str(e).replace(chr(10), " "), flush=True)
"""


def _load_in_subprocess(paths):
    """`{path: line}` from loading each file in a new process; a signal fails the test."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, f"the loader died (code {result.returncode}): {result.stderr}"
    lines = [line for line in result.stdout.splitlines() if " LOADED" in line or " ERROR " in line]
    return {line.split(" ", 1)[0]: line for line in lines}


@pytest.mark.parametrize("scoring", ["exact", "int8"])
def test_tampered_scann_files_get_clear_errors_and_never_kill_the_process(tmp_path, scoring):
    x, y = _data(3000)
    model = keras_resmem.attach_memory(
        _base(), "pre_logits", (x, y), k=5, verbose=0,
        search=search_lib.ScaNN(num_leaves=16, brute_force=False, scoring=scoring),
    )  # fmt: skip
    good = tmp_path / "good.keras"
    model.save(good)

    def truncate(n):
        return lambda data: data[:n]

    tokens = "datapoint_to_token.npy"
    cases = {
        "token_too_big": {tokens: _npy(lambda a: np.where(np.arange(len(a)) == 7, 10**6, a))},
        "token_negative": {tokens: _npy(lambda a: np.where(np.arange(len(a)) == 7, -3, a))},
        "partitioner_empty": {"serialized_partitioner.bin": truncate(0)},
        "partitioner_truncated": {"serialized_partitioner.bin": truncate(700)},
        "config_truncated": {"scann_config.bin": truncate(40)},
    }
    if scoring == "int8":  # ScaNN is given no float keys, only codes
        cases["codes_short"] = {"int8_dataset.npy": _npy(lambda a: a[:-5])}
    paths = {"good": good}
    for name, edits in cases.items():
        # With the digest (corruption is caught by it) and without (an attacker drops it).
        paths[name] = _rewrite(good, tmp_path / f"{name}.keras", edits)
        paths[f"{name}_nodigest"] = _rewrite(
            good, tmp_path / f"{name}_nodigest.keras", edits, drop_digest=True
        )
    found = _load_in_subprocess(paths.values())
    assert "LOADED" in found[str(good)]
    for name in cases:
        assert "does not match the digest" in found[str(paths[name])], found[str(paths[name])]
        line = found[str(paths[f"{name}_nodigest"])]
        # Keras wraps a layer's error in its own ValueError, with the message.
        assert " ERROR ValueError " in line and "The saved ScaNN index is invalid" in line, line


_SERVER = """
import sys, numpy as np, tensorflow as tf
import scann  # ScaNN's ops, as a ScaNN-enabled server links them

def find(obj, name, seen):
    for child in obj._trackable_children().values():
        if id(child) not in seen:
            seen.add(id(child))
            if isinstance(child, tf.Variable) and child.name.startswith(name + ":"):
                return child
            found = find(child, name, seen)
            if found is not None:
                return found

x = np.load(sys.argv[2])
for edit in sys.argv[3:]:
    loaded = tf.saved_model.load(sys.argv[1])
    tokens = find(loaded, "datapoint_to_token", set())
    value = tokens.numpy()
    if edit == "out_of_range":
        value[7] = 10**6
    elif edit == "shuffled":
        value = np.random.default_rng(0).permutation(value)
    tokens.assign(value)
    serve = loaded.signatures["serving_default"]
    try:
        ids = serve(features=tf.constant(x))["class_ids"].numpy()
        print(edit, "SERVED", " ".join(map(str, ids)), flush=True)
    except tf.errors.InvalidArgumentError as e:
        print(edit, "ERROR", e.message.replace(chr(10), " "), flush=True)
"""


def test_a_tampered_scann_savedmodel_fails_its_request_not_the_server(tmp_path):
    # The variables of a `mode="scann"` export edited after TensorFlow's checks
    # (as a server would read a file whose checksums were made again): the
    # request fails with a clear error; before, an out-of-range token aborted
    # the process and a shuffled index served wrong answers.
    x, y = _data(3000)
    model = keras_resmem.attach_memory(
        _base(), "pre_logits", (x, y), k=5, verbose=0,
        search=search_lib.ScaNN(num_leaves=16, brute_force=False),
    )  # fmt: skip
    path = keras_resmem.export_saved_model(model, tmp_path / "m" / "1", mode="scann")
    np.save(tmp_path / "x.npy", x[:32])
    result = subprocess.run(
        [sys.executable, "-c", _SERVER, path, str(tmp_path / "x.npy"),
         "out_of_range", "shuffled", "none"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert result.returncode == 0, f"the server died (code {result.returncode}): {result.stderr}"
    lines = {line.split(" ", 1)[0]: line for line in result.stdout.splitlines()}
    for edit in ("out_of_range", "shuffled"):
        assert "ERROR" in lines[edit] and "not the one it was exported with" in lines[edit]
    expected = np.argmax(model.predict(x[:32], verbose=0), axis=-1)
    assert lines["none"].split()[2:] == [str(i) for i in expected]


@pytest.mark.parametrize(
    "name,edit,message",
    [
        ("memory_targets", lambda a: np.where(np.arange(len(a)) == 3, 99, a), "class ids"),
        ("memory_targets", lambda a: np.where(np.arange(len(a)) == 3, -5, a), "class ids"),
        ("k", lambda a: np.zeros_like(a), "`k` is 0"),
        ("sigma", lambda a: np.full_like(a, -1.0), "`sigma`"),
        ("sigma", lambda a: np.zeros_like(a), "`sigma`"),
        ("sigma", lambda a: np.full_like(a, 1e-300), "`sigma`"),
        ("temperature", lambda a: np.full_like(a, np.nan), "`temperature`"),
        ("keys", lambda a: np.where(np.arange(len(a))[:, None] == 5, np.nan, a), "`keys`"),
        ("memory_ids", lambda a: np.where(np.arange(len(a)) == 1, a[0], a), "more than once"),
        ("knn_weight", lambda a: np.full_like(a, 2.0), "`knn_weight`"),
        ("ivf_offsets", lambda a: a[::-1].copy(), "`ivf_offsets`"),
        ("ivf_ids", lambda a: np.where(np.arange(len(a)) == 0, 10**6, a), "`ivf_ids`"),
        ("num_probes", lambda a: np.zeros_like(a), "`num_probes`"),
    ],
)
def test_tampered_values_are_refused_at_load(tmp_path, name, edit, message):
    x, y = _data(400)
    model = keras_resmem.attach_memory(_base(), "pre_logits", (x, y), k=3, search="ivf", verbose=0)
    good = tmp_path / "good.keras"
    model.save(good)
    edits = {"model.weights.h5": _h5_var(name, edit, tmp_path)}
    for drop_digest, expected in ((False, "does not match the digest"), (True, message)):
        bad = _rewrite(good, tmp_path / "bad.keras", edits, drop_digest=drop_digest)
        with pytest.raises(ValueError, match="is invalid") as error:
            keras.saving.load_model(bad)
        assert expected in str(error.value)


def test_the_digest_is_written_and_old_files_without_one_load(tmp_path):
    x, y = _data(100)
    model = keras_resmem.attach_memory(_base(), "pre_logits", (x, y), k=3, verbose=0)
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        name = next(n for n in archive.namelist() if n.endswith("memory_digest.json"))
        saved = json.loads(archive.read(name))
    assert saved["algorithm"] == "sha256" and len(saved["digest"]) == 64
    old = _rewrite(tmp_path / "m.keras", tmp_path / "old.keras", {}, drop_digest=True)
    restored = keras.saving.load_model(old)
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("backend", ["exact", "ivf", "scann"])
def test_a_non_finite_query_row_gets_nan_and_leaves_the_others_alone(backend, tmp_path):
    x, y = _data(300)
    search = search_lib.ScaNN(brute_force=True) if backend == "scann" else backend
    model = keras_resmem.attach_memory(_base(), "pre_logits", (x, y), k=5, search=search, verbose=0)
    queries = _data(6, seed=1)[0]
    want = model.predict(queries, verbose=0)
    bad = queries.copy()
    bad[2, 0], bad[4, 3] = np.inf, np.nan
    got = model.predict(bad, verbose=0)
    assert np.isnan(got[[2, 4]]).all()
    np.testing.assert_allclose(got[[0, 1, 3, 5]], want[[0, 1, 3, 5]], rtol=1e-6)
    mode = "scann" if backend == "scann" else "portable"
    keras_resmem.export_saved_model(model, tmp_path / "sm", mode=mode)
    served = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"]
    out = served(features=tf.constant(bad))
    assert out["class_ids"].numpy().tolist() == [
        *want[:2].argmax(-1).tolist(),
        -1,
        int(want[3].argmax()),
        -1,
        int(want[5].argmax()),
    ]


def test_non_finite_inputs_and_sample_weights_are_refused_at_build():
    x, y = _data(50)
    bad = x.copy()
    bad[37, 2] = np.nan
    with pytest.raises(ValueError, match="example 37 of the data"):
        keras_resmem.attach_memory(_base(), "pre_logits", (bad, y), k=3, batch_size=16, verbose=0)
    weights = np.ones(50, "float32")
    weights[20] = np.nan
    with pytest.raises(ValueError, match="Sample weights must be finite"):
        keras_resmem.attach_memory(_base(), "pre_logits", (x, y, weights), k=3, verbose=0)
    weights[20] = -1.0
    with pytest.raises(ValueError, match="not negative"):
        keras_resmem.attach_memory(_base(), "pre_logits", (x, y, weights), k=3, verbose=0)


@pytest.mark.parametrize(
    "head",
    [
        keras.ops.softmax,
        keras.activations.softmax,
        keras.layers.Lambda(lambda t: keras.ops.softmax(t)),
        lambda t: keras.layers.Identity()(keras.layers.Softmax()(t)),
        lambda t: keras.layers.Activation("linear")(keras.layers.Softmax()(t)),
    ],
    ids=["ops", "activations", "lambda", "softmax_identity", "softmax_linear"],
)
def test_probability_heads_are_recognised(head):
    x, y = _data(200)
    base = _base(head)
    detected = keras_resmem.attach_memory(base, "pre_logits", (x, y), k=5, verbose=0)
    told = keras_resmem.attach_memory(base, "pre_logits", (x, y), k=5, from_logits=False, verbose=0)
    assert detected.get_layer("residual_memory").from_logits is False
    np.testing.assert_allclose(
        detected.predict(x[:20], verbose=0), told.predict(x[:20], verbose=0), atol=1e-7
    )


def test_probabilities_declared_as_logits_warn():
    x, y = _data(100)
    with pytest.warns(UserWarning, match="look like probabilities"):
        keras_resmem.attach_memory(
            _base(keras.layers.Softmax()), "pre_logits", (x, y), k=3, from_logits=True,
            verbose=0,
        )  # fmt: skip


def test_an_empty_batch_through_scann_gives_k_wide_ids():
    memory = keras_resmem.ResidualMemory(k=4, search=search_lib.ScaNN(brute_force=True))
    memory.memorize(*_data(100)[:1], np.zeros((100, NUM_CLASSES)), _data(100)[1])
    _, ids, weights = memory(
        [np.zeros((0, 6), "float32"), np.zeros((0, NUM_CLASSES), "float32")],
        return_neighbors=True,
    )
    assert ids.shape == (0, 4) and weights.shape == (0, 4)


@pytest.mark.parametrize("name", ["k", "sigma", "temperature", "method", "knn_weight"])
def test_none_hyperparameters_are_refused_when_the_layer_is_created(name):
    # Found by tests/test_fuzz.py: `sigma=None` skipped its check (TensorFlow's
    # attribute tracking skips `self.sigma = None` while `self.sigma` reads None).
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        keras_resmem.ResidualMemory(**{name: None})
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        keras_resmem.attach_memory(_base(), "pre_logits", _data(20), verbose=0, **{name: None})
