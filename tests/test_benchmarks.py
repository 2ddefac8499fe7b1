"""The benchmark scripts' own arithmetic: ratios to FAISS, the index-only RSS build."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _build_rss  # noqa: E402
import scann_call_cost  # noqa: E402


def test_ratios_to_faiss_divide_by_the_faster_faiss_index_of_each_round():
    rows = [
        {"way": "scann pybind, batch 1", "batch": 1, "qps_rounds": [10.0, 20.0, 30.0]},
        {"way": "faiss IVF-Flat nprobe 5, batch 1", "batch": 1, "qps_rounds": [5.0, 40.0, 10.0]},
        {"way": "faiss HNSW ef 50, batch 1", "batch": 1, "qps_rounds": [20.0, 10.0, 15.0]},
        {"way": "tf.identity (any eager op), batch 1", "batch": 1, "qps_rounds": [1.0, 1.0, 1.0]},
        {"way": "scann TF op, batch 256", "batch": 256, "qps_rounds": [8.0]},
        {"way": "faiss HNSW ef 50, batch 256", "batch": 256, "qps_rounds": [4.0]},
    ]
    ratios = scann_call_cost.ratios_to_faiss(rows)
    # Round by round: 10/20, 20/40, 30/15.
    assert ratios[1] == {"scann pybind, batch 1": {"median": 0.5, "min": 0.5, "max": 2.0}}
    assert ratios[256] == {"scann TF op, batch 256": {"median": 2.0, "min": 2.0, "max": 2.0}}


@pytest.mark.parametrize("via", ["index", "index-pybind"])
def test_index_only_build_reports_scann_index_of_the_keys(via):
    keys = np.random.default_rng(1).normal(size=(25_000, 8)).astype(np.float32)
    result = _build_rss.index_build(keys, via)
    assert result["size"] == 25_000
    assert result["key_bytes"] == 25_000 * 8 * 4
    assert result["options"]["brute_force"] is False  # a tree: the memory's default at 25k
    # VmHWM, reset to the RSS before the build, bounds the RSS at and after it.
    assert result["build_peak_rss"] >= max(result["rss_after_build"], result["baseline_rss"])
    assert result["peak_growth_over_keys"] >= result["kept_over_keys"]
