"""Bad input fuzzing with Hypothesis (issue 19).

Every case ends in a clear error or a correct result: never a crash, an error
from deep inside TensorFlow or ScaNN, or a silent wrong answer. The default run
is bounded to about a minute; `--run-large` tries many more examples. Each test
prints its count of examples and outcomes.
"""

import collections
import io
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import keras_resmem
from tests import numpy_reference as ref

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _examples(default):
    """More examples with `--run-large` (the environment variable the conftest sets)."""
    return default * 10 if os.environ.get("KERAS_RESMEM_LARGE") else default


# Errors a user can act on: they name the argument, what it received, what is valid.
CLEAR = (ValueError, TypeError)
_OUTCOMES = collections.Counter()


def _base(num_classes, dim):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((dim,))
    h = keras.layers.Dense(5, activation="tanh", name="pre_logits")(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(h))


_BASES = {}


def _cached_base(num_classes, dim):
    if (num_classes, dim) not in _BASES:
        _BASES[(num_classes, dim)] = _base(num_classes, dim)
    return _BASES[(num_classes, dim)]


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(-5, 300),
    st.sampled_from([None, "1", True, 1e-300, 1e-45, 3e38, 1e39]),
)


FIELDS = ("n", "x", "labels", "k", "sigma", "temperature", "search")


@st.composite
def attach_cases(draw):
    """A valid case with up to three of its fields made bad (often none)."""
    bad = draw(st.sets(st.sampled_from(FIELDS), max_size=3))
    scale = st.floats(0.05, 10.0)
    case = {
        "num_classes": draw(st.integers(2, 4)),
        "dim": draw(st.integers(1, 4)),
        "n": draw(st.integers(0, 7) if "n" in bad else st.integers(8, 30)),
        "x": draw(st.sampled_from(["nan", "inf", "int", "wrong_dim", "3d"]))
        if "x" in bad
        else "normal",
        "labels": draw(st.sampled_from(["float", "too_big", "negative", "short"]))
        if "labels" in bad
        else draw(st.sampled_from(["int", "onehot", "float_int"])),
        "k": draw(st.one_of(st.integers(-2, 40), numbers) if "k" in bad else st.integers(1, 8)),
        "sigma": draw(numbers if "sigma" in bad else scale),
        "temperature": draw(numbers if "temperature" in bad else scale),
        "search": draw(st.sampled_from(["faiss", 3, None]))
        if "search" in bad
        else draw(st.sampled_from(["exact", "ivf", "auto"])),
        "seed": draw(st.integers(0, 2**16)),
    }
    return case


def _make_data(case):
    rng = np.random.default_rng(case["seed"])
    n, dim, c = case["n"], case["dim"], case["num_classes"]
    x = rng.normal(size=(n, dim)).astype("float32")
    if case["x"] == "nan" and n:
        x[rng.integers(n), rng.integers(dim)] = np.nan
    elif case["x"] == "inf" and n:
        x[rng.integers(n), rng.integers(dim)] = -np.inf
    elif case["x"] == "int":
        x = rng.integers(-3, 3, size=(n, dim))
    elif case["x"] == "wrong_dim":
        x = rng.normal(size=(n, dim + 1)).astype("float32")
    elif case["x"] == "3d":
        x = rng.normal(size=(n, dim, 2)).astype("float32")
    y = rng.integers(0, c, n)
    form = case["labels"]
    if form == "onehot":
        y = np.eye(c)[y]
    elif form == "float_int":
        y = y.astype("float64")
    elif form == "float":
        y = y + 0.5
    elif form == "too_big" and n:
        y[0] = c
    elif form == "negative" and n:
        y[-1] = -1
    elif form == "short":
        y = y[: max(n - 1, 0)]
    return x, y


@settings(
    max_examples=_examples(40),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=attach_cases())
def test_attach_memory_inputs_give_a_clear_error_or_the_reference_result(case):
    base = _cached_base(case["num_classes"], case["dim"])
    x, y = _make_data(case)
    try:
        model = keras_resmem.attach_memory(
            base,
            "pre_logits",
            (x, y),
            k=case["k"],
            sigma=case["sigma"],
            temperature=case["temperature"],
            search=case["search"],
            batch_size=8,
            verbose=0,
        )
    except CLEAR as e:
        assert str(e), "an error with no message"
        _OUTCOMES["attach: clear error"] += 1
        return
    # It was accepted: the result must be ResMem's, computed independently.
    memory = model.get_layer("residual_memory")
    features = keras.Model(base.inputs, [base.get_layer("pre_logits").output, base.output])
    keys, logits = (np.asarray(a, np.float64) for a in features.predict(x, verbose=0))
    labels = np.asarray(y).argmax(1) if np.asarray(y).ndim == 2 else np.asarray(y, int)
    want = ref.resmem_classification(
        keys, logits, labels, keys, logits, memory.k, memory.sigma, memory.temperature
    )
    got = model.predict(x, verbose=0)
    approximate = memory.search_backend != "exact"
    if approximate:
        assert np.isfinite(got).all()
        _OUTCOMES["attach: accepted (approximate search)"] += 1
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        _OUTCOMES["attach: accepted, equal to the reference"] += 1


def teardown_module():
    print("\nHypothesis outcomes:", dict(_OUTCOMES))


# Tampering: random byte and value edits to every array and file of a `.keras` file.

_LOAD_AND_COMPARE = """
import sys, numpy as np, keras, keras_resmem
queries, want = np.load(sys.argv[1]), np.load(sys.argv[2])
for path in sys.argv[3:]:
    try:
        model = keras.saving.load_model(path)
        got = model.predict(queries, verbose=0)
    except Exception as e:
        print(path, "ERROR", type(e).__name__, flush=True)
        continue
    same = np.allclose(got, want, atol=1e-6, equal_nan=True)
    print(path, "SAME" if same else "DIFFERENT", flush=True)
"""


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 3)).astype("float32"), rng.integers(0, 3, 600)
    queries = rng.normal(size=(16, 3)).astype("float32")
    np.save(root / "queries.npy", queries)
    out = {}
    for search in ("exact", "ivf", "scann"):
        backend = (
            keras_resmem.search.ScaNN(num_leaves=8, brute_force=False)
            if search == "scann"
            else search
        )
        model = keras_resmem.attach_memory(
            _base(3, 3), "pre_logits", (x, y), k=5, search=backend, verbose=0
        )
        path = root / f"{search}.keras"
        model.save(path)
        np.save(root / f"{search}_want.npy", model.predict(queries, verbose=0))
        out[search] = path
    return root, out


@st.composite
def edits(draw, members):
    member = draw(st.sampled_from(members))
    kind = draw(st.sampled_from(["byte", "value"]))
    return member, kind, draw(st.integers(0, 2**31)), draw(st.integers(0, 255))


def _tamper(src, dst, member, kind, where, value):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == member and data:
                if kind == "value" and member.endswith(".npy"):
                    array = np.load(io.BytesIO(data), allow_pickle=False).copy()
                    if array.size:
                        flat = array.reshape(-1)
                        flat[where % flat.size] = flat.dtype.type(value % 128)
                        buffer = io.BytesIO()
                        np.save(buffer, array, allow_pickle=False)
                        data = buffer.getvalue()
                else:
                    position = where % len(data)
                    data = data[:position] + bytes([value]) + data[position + 1 :]
            zout.writestr(item, data)


@pytest.mark.parametrize("search", ["exact", "ivf", "scann"])
def test_tampered_files_give_an_error_or_the_same_answer_and_never_a_crash(
    saved_models, search, tmp_path
):
    root, paths = saved_models
    with zipfile.ZipFile(paths[search]) as archive:
        members = [m for m in archive.namelist() if m not in ("metadata.json",)]
    batches = []

    @settings(max_examples=_examples(3), deadline=None, derandomize=True)
    @given(st.lists(edits(members), min_size=15, max_size=15))
    def collect(batch):
        batches.append(batch)

    collect()
    files = []
    for b, batch in enumerate(batches):
        for e, (member, kind, where, value) in enumerate(batch):
            path = tmp_path / f"t{b}_{e}.keras"
            _tamper(paths[search], path, member, kind, where, value)
            files.append(path)
    result = subprocess.run(
        [
            sys.executable, "-c", _LOAD_AND_COMPARE, str(root / "queries.npy"),
            str(root / f"{search}_want.npy"), *map(str, files),
        ],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert result.returncode == 0, f"the loader died (code {result.returncode}): {result.stderr}"
    outcomes = collections.Counter(
        line.split(" ", 2)[1] for line in result.stdout.splitlines() if " " in line
    )
    print(f"\n{search}: {len(files)} tampered files: {dict(outcomes)}")
    assert sum(outcomes.values()) == len(files)
    # The digest covers every array and index file: an edit that changes what a
    # prediction reads is refused. (An edit in the zip's or HDF5's own
    # metadata may leave the values as they were: "SAME" is a correct answer.)
    assert outcomes["DIFFERENT"] == 0, result.stdout
