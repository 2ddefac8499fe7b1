"""SavedModel export: stock-TF loading in a fresh process, op audit, ScaNN mode, threads."""

import json
import os
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resmem
from keras_resmem import export as export_lib
from keras_resmem import search as search_lib

# Loads a SavedModel the way TensorFlow Serving's C++ path does (the TF1 session
# loader, signature tensors by name), in a process that imports only TensorFlow
# (plus ScaNN's op library when asked), and saves every output as .npy.
TF1_LOADER = """
import sys
path, inputs, out_dir, load_scann = sys.argv[1:5]
# `import tensorflow` would import keras too; block it (and our package) to
# prove that loading needs neither. ScaNN only when asked.
blocked = ["keras", "keras_resmem", "tf_keras"] + ([] if load_scann == "1" else ["scann"])
for name in blocked:
    sys.modules[name] = None
import numpy as np
import tensorflow as tf
if load_scann == "1":
    from scann.scann_ops.py import scann_ops  # registers the Scann>... ops
x = np.load(inputs)
with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
    sig = meta.signature_def["serving_default"]
    (name,) = sig.inputs
    fetches = {key: info.name for key, info in sig.outputs.items()}
    out = sess.run(fetches, {sig.inputs[name].name: x})
for key, value in out.items():
    np.save(f"{out_dir}/{key}.npy", value)
loaded = {m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}
print("IMPORTED", ",".join(sorted(loaded & {"keras", "keras_resmem", "tf_keras", "scann"})))
"""

# Lists every op type in a SavedModel's graphs (and their functions), and the
# ones this TensorFlow does not register: custom ops. Imports only TensorFlow.
OP_AUDIT = """
import json, sys
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry
saved = saved_model_pb2.SavedModel()
with open(sys.argv[1] + "/saved_model.pb", "rb") as f:
    saved.ParseFromString(f.read())
ops, functions = set(), set()
for meta in saved.meta_graphs:
    graph = meta.graph_def
    functions |= {f.signature.name for f in graph.library.function}
    ops |= {node.op for node in graph.node}
    for f in graph.library.function:
        ops |= {node.op for node in f.node_def}
ops -= functions
custom = sorted(op for op in ops if op_def_registry.get(op) is None)
print(json.dumps({"ops": sorted(ops), "custom": custom}))
"""


def _run(script, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return result.stdout


def _resmem_model(rng, search, n=2000, **kwargs):
    inputs = keras.Input((8,), name="features")
    h = keras.layers.Dense(16, activation="relu", name="pre_logits")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(4, name="logits")(h), name="toy")
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + 2 * (x[:, 1] > 0).astype("int32")
    model = keras_resmem.attach_memory(
        base, "pre_logits", (x, y), k=10, sigma=0.5, search=search, verbose=0, **kwargs
    )
    return base, model


def _expected(base, model, x):
    memory = model.get_layer("residual_memory")
    embed = keras.Model(base.inputs, base.get_layer("pre_logits").output)
    ids, _, weights = memory.neighbors(embed.predict(x, verbose=0))
    scores = model.predict(x, verbose=0)
    return {
        "resmem_scores": scores,
        "deepnet_scores": base.predict(x, verbose=0),
        "class_ids": scores.argmax(-1),
        "neighbor_ids": ids.numpy(),
        "neighbor_weights": weights.numpy(),
    }


def _assert_outputs_equal(got, want):
    assert sorted(got) == sorted(want)
    np.testing.assert_array_equal(got["class_ids"], want["class_ids"])
    np.testing.assert_array_equal(got["neighbor_ids"], want["neighbor_ids"])
    for key in ("resmem_scores", "deepnet_scores", "neighbor_weights"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


def _load_in_fresh_process(path, x, tmp_path, load_scann=False):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    np.save(tmp_path / "x.npy", x)
    stdout = _run(TF1_LOADER, path, tmp_path / "x.npy", out, "1" if load_scann else "0")
    got = {p.stem: np.load(p) for p in out.glob("*.npy")}
    return got, stdout.split("IMPORTED")[-1].strip()


@pytest.mark.parametrize(
    "search,options",
    [
        ("exact", {}),
        ("ivf", {"ivf_options": {"num_partitions": 40, "num_probes": 6}}),
        (search_lib.IVF(num_partitions=40, num_probes=6, scoring="bfloat16"), {}),
    ],
    ids=["exact", "ivf", "ivf_bfloat16"],
)
def test_portable_savedmodel_loads_with_the_tf1_loader_and_only_stock_ops(
    rng, tmp_path, search, options
):
    base, model = _resmem_model(rng, search, **options)
    path = keras_resmem.export_saved_model(model, tmp_path / "resmem" / "1")
    x = rng.normal(size=(64, 8)).astype("float32")
    got, imported = _load_in_fresh_process(path, x, tmp_path)
    assert imported == "", f"the loader process imported {imported}"
    _assert_outputs_equal(got, _expected(base, model, x))

    audit = json.loads(_run(OP_AUDIT, path))
    assert audit["custom"] == [], audit["custom"]
    assert "MatMul" in audit["ops"]  # the audit does see the graph's ops


def test_scann_savedmodel_loads_once_scann_is_imported(rng, tmp_path):
    base, model = _resmem_model(rng, "scann", n=25000)
    memory = model.get_layer("residual_memory")
    assert memory.search._resolved["brute_force"] is False  # a real tree index
    path = keras_resmem.export_saved_model(model, tmp_path / "resmem" / "1", mode="scann")
    x = rng.normal(size=(64, 8)).astype("float32")
    got, imported = _load_in_fresh_process(path, x, tmp_path, load_scann=True)
    assert imported == "scann"
    _assert_outputs_equal(got, _expected(base, model, x))
    # The audit flags ScaNN's ops: this SavedModel needs a ScaNN-enabled server.
    custom = json.loads(_run(OP_AUDIT, path))["custom"]
    assert custom and all(op.startswith("Scann>") for op in custom), custom


def test_portable_mode_refuses_a_scann_memory(rng, tmp_path):
    _, model = _resmem_model(rng, "scann", n=500)
    with pytest.raises(ValueError, match="Rebuild the memory with search='ivf'"):
        keras_resmem.export_saved_model(model, tmp_path / "m")
    _, exact = _resmem_model(rng, "exact", n=500)
    with pytest.raises(ValueError, match="mode='scann' exports a ScaNN searcher"):
        keras_resmem.export_saved_model(exact, tmp_path / "m", mode="scann")
    with pytest.raises(ValueError, match="`mode` must be one of"):
        keras_resmem.export_saved_model(exact, tmp_path / "m", mode="onnx")
    with pytest.raises(ValueError, match="exactly one ResidualMemory layer"):
        keras_resmem.export_saved_model(keras.Sequential([keras.Input((2,))]), tmp_path / "m")
    with pytest.raises(TypeError, match="must be a Keras model"):
        keras_resmem.export_saved_model("model.keras", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_export_never_clobbers_or_half_writes(rng, tmp_path, monkeypatch):
    base, model = _resmem_model(rng, "exact", n=500)
    path = tmp_path / "resmem"
    keras_resmem.export_saved_model(model, path, include_neighbors=False)
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        keras_resmem.export_saved_model(model, path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(keras.export.ExportArchive, "write_out", fail, raising=False)
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", fail, raising=False)
    with pytest.raises(OSError, match="disk full"):
        keras_resmem.export_saved_model(model, path, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["resmem"]  # no temporary left behind
    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    assert "neighbor_ids" not in sig.structured_outputs

    keras_resmem.export_saved_model(model, path, overwrite=True)
    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    assert "neighbor_ids" in sig.structured_outputs


def test_export_of_a_reloaded_keras_file(rng, tmp_path):
    base, model = _resmem_model(rng, "ivf", n=3000)
    model.save(tmp_path / "resmem.keras")
    restored = keras.models.load_model(tmp_path / "resmem.keras")
    path = keras_resmem.export_saved_model(restored, tmp_path / "saved")
    x = rng.normal(size=(32, 8)).astype("float32")
    out = tf.saved_model.load(path).signatures["serving_default"](features=tf.constant(x))
    _assert_outputs_equal({k: v.numpy() for k, v in out.items()}, _expected(base, model, x))


def test_eight_threads_get_the_single_threaded_answers(rng, tmp_path):
    _, model = _resmem_model(rng, "ivf", n=5000)
    path = keras_resmem.export_saved_model(model, tmp_path / "resmem")
    serve = tf.saved_model.load(path).signatures["serving_default"]
    requests = [
        tf.constant(rng.normal(size=(int(rng.integers(1, 9)), 8)).astype("float32"))
        for _ in range(500)
    ]
    want = [{k: v.numpy() for k, v in serve(features=r).items()} for r in requests]
    mismatches, errors = [], []

    def client(thread):
        try:
            order = np.random.default_rng(thread).permutation(len(requests))
            for i in order:
                got = serve(features=requests[i])
                for key, value in got.items():
                    if not np.array_equal(value.numpy(), want[i][key]):
                        mismatches.append((thread, i, key))
        except Exception as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not mismatches, mismatches[:5]


def test_find_memory_names_the_model(rng):
    base, model = _resmem_model(rng, "exact", n=300)
    assert export_lib.find_memory(model) is model.get_layer("residual_memory")
    with pytest.raises(ValueError, match="model 'toy' with 0"):
        export_lib.find_memory(base)


def test_unnamed_input_is_called_inputs(rng, tmp_path):
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, name="h")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(2)(h))
    x = rng.normal(size=(50, 3)).astype("float32")
    model = keras_resmem.attach_memory(base, "h", (x, np.arange(50) % 2), k=3, verbose=0)
    path = keras_resmem.export_saved_model(model, tmp_path / "m")
    sig = tf.saved_model.load(path).signatures["serving_default"]
    assert list(sig.structured_input_signature[1]) == ["inputs"]
    np.testing.assert_allclose(
        sig(inputs=tf.constant(x[:4]))["resmem_scores"].numpy(),
        model.predict(x[:4], verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_regression_and_two_input_models_export(rng, tmp_path):
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dense(6, activation="relu", name="h")(keras.layers.Concatenate()([a, b]))
    base = keras.Model([a, b], keras.layers.Dense(1)(h))
    xa = rng.normal(size=(200, 3)).astype("float32")
    xb = rng.normal(size=(200, 2)).astype("float32")
    y = xa[:, :1] * 2.0
    model = keras_resmem.attach_memory(
        base, "h", ((xa, xb), y), task="regression", k=4, sigma=0.3, verbose=0
    )
    path = keras_resmem.export_saved_model(model, tmp_path / "m")
    sig = tf.saved_model.load(path).signatures["serving_default"]
    assert sorted(sig.structured_input_signature[1]) == ["a", "b"]
    out = sig(a=tf.constant(xa[:5]), b=tf.constant(xb[:5]))
    assert "class_ids" not in out  # regression
    np.testing.assert_allclose(
        out["resmem_scores"].numpy(), model.predict([xa[:5], xb[:5]], verbose=0), rtol=1e-5
    )
    np.testing.assert_allclose(
        out["deepnet_scores"].numpy(), base.predict([xa[:5], xb[:5]], verbose=0), rtol=1e-5
    )


def test_input_names_survive_a_keras_round_trip(rng, tmp_path):
    x = rng.normal(size=(200, 4)).astype("float32")
    y = rng.integers(0, 3, 200)
    for input_name, served in ((None, "inputs"), ("features", "features")):
        inputs = keras.Input((4,), name=input_name)
        h = keras.layers.Dense(8, activation="relu", name="pre_logits")(inputs)
        base = keras.Model(inputs, keras.layers.Dense(3)(h))
        model = keras_resmem.attach_memory(base, "pre_logits", (x, y), search="exact", verbose=0)
        path = str(tmp_path / f"{served}.keras")
        model.save(path)
        for i, m in enumerate((model, keras.saving.load_model(path))):
            out = keras_resmem.export_saved_model(m, str(tmp_path / f"{served}_{i}"))
            signature = tf.saved_model.load(out).signatures["serving_default"]
            assert list(signature.structured_input_signature[1]) == [served]
