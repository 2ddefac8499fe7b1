import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--run-large", action="store_true", default=False, help="run the `large` tests too"
    )


def pytest_configure(config):
    if config.getoption("--run-large"):
        # Read by suites that scale their examples with it (tests/test_fuzz.py).
        os.environ["KERAS_RESMEM_LARGE"] = "1"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-large"):
        return
    skip = pytest.mark.skip(reason="large test: run with --run-large")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed_everything():
    keras.utils.set_random_seed(1337)
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(1337)
