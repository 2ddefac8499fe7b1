"""Serving with no Python in the process: a C program loads the SavedModel (issue 19).

It is compiled against the TensorFlow wheel's own C API headers and
`libtensorflow_cc`, and loads the export through `TF_LoadSessionFromSavedModel`,
the C++ SavedModel loader that TensorFlow Serving is built on: the closest check
of the real server that runs here.
"""

import os
import shutil
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import keras_resmem
from keras_resmem import search as search_lib

SOURCE = os.path.join(os.path.dirname(__file__), "c", "serve_savedmodel.c")


@pytest.fixture(scope="module")
def serve_binary(tmp_path_factory):
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler")
    tf_dir = os.path.dirname(tf.__file__)
    binary = str(tmp_path_factory.mktemp("c") / "serve_savedmodel")
    subprocess.run(
        [
            compiler, SOURCE, "-O1", "-o", binary,
            "-I", os.path.join(tf_dir, "include"),
            "-L", tf_dir, "-l:libtensorflow_cc.so.2", "-l:libtensorflow_framework.so.2",
            f"-Wl,-rpath,{tf_dir}",
        ],
        check=True,
    )  # fmt: skip
    return binary


def _tensor_names(export_dir, output):
    """The graph names of the serving signature's one input and of `output`."""
    meta = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        meta.ParseFromString(f.read())
    signature = meta.meta_graphs[0].signature_def["serving_default"]
    (input_info,) = signature.inputs.values()
    return input_info.name, signature.outputs[output].name


def _export(tmp_path, search, mode):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), name="features")
    h = keras.layers.Dense(8, activation="tanh", name="pre_logits")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(4)(h))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3000, 6)).astype("float32"), rng.integers(0, 4, 3000)
    model = keras_resmem.attach_memory(base, "pre_logits", (x, y), k=8, search=search, verbose=0)
    path = str(tmp_path / "export")
    keras_resmem.export_saved_model(model, path, mode=mode)
    return model, path


def _serve(binary, export_dir, queries, tmp_path, output="resmem_scores"):
    input_name, output_name = _tensor_names(export_dir, output)
    queries.astype("float32").tofile(tmp_path / "in.bin")
    result = subprocess.run(
        [
            binary, export_dir, input_name, str(len(queries)), str(queries.shape[1]),
            str(tmp_path / "in.bin"), output_name, str(tmp_path / "out.bin"),
        ],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    return result


@pytest.mark.parametrize(
    "search",
    [
        "exact",
        search_lib.IVF(num_partitions=16, num_probes=4),
        search_lib.IVF(num_partitions=16, num_probes=4, scoring="bfloat16"),
    ],
    ids=["exact", "ivf", "ivf_bfloat16"],
)
def test_the_c_loader_serves_a_portable_export_as_keras_predicts(serve_binary, tmp_path, search):
    model, path = _export(tmp_path, search, "portable")
    queries = np.random.default_rng(1).normal(size=(32, 6)).astype("float32")
    result = _serve(serve_binary, path, queries, tmp_path)
    assert result.returncode == 0, result.stderr
    served = np.fromfile(tmp_path / "out.bin", dtype=np.float32).reshape(32, 4)
    np.testing.assert_allclose(served, model.predict(queries, verbose=0), atol=1e-5)


def test_the_c_loader_names_the_missing_op_of_a_scann_export(serve_binary, tmp_path):
    _, path = _export(tmp_path, search_lib.ScaNN(brute_force=True), "scann")
    queries = np.zeros((2, 6), "float32")
    result = _serve(serve_binary, path, queries, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "LOAD FAILED" in result.stderr and "Scann>" in result.stderr, result.stderr
