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


def test_auto_crossover_fits_what_it_measured_and_refits_the_same(tmp_path):
    import json

    import auto_crossover

    model = auto_crossover.main(
        ["--dims", "4,16", "--sizes", "3000,6000", "--rounds", "1", "--output-dir", str(tmp_path)]
    )
    results = json.loads((tmp_path / "auto_crossover.json").read_text())
    assert len(results["rows"]) == 4 and results["fit"] == model
    assert auto_crossover.main(["--refit", str(tmp_path / "auto_crossover.json")]) == model
    # The least-squares fit, by the normal equations.
    rows = results["rows"]
    design = np.array([[np.log(r["n"]), np.log(r["d"]), 1.0] for r in rows])
    target = np.log([r["ivf_speedup"] for r in rows])
    want = np.linalg.solve(design.T @ design, design.T @ target)
    np.testing.assert_allclose([model["a"], model["b"], model["c"]], want, atol=1e-3)
    # `crossover` inverts the model: its prediction there is the speed-up asked for.
    n = auto_crossover.crossover(model, 16, 2.0)
    assert np.exp(model["a"] * np.log(n) + model["b"] * np.log(16) + model["c"]) == pytest.approx(2)


@pytest.mark.large
def test_soak_of_every_savedmodel_mode_finds_no_difference(tmp_path):
    import soak

    results = soak.main(["--seconds", "20", "--output-dir", str(tmp_path)])
    for name, row in results["exports"].items():
        assert row["calls"] > 100, name
        assert row["different"] == 0 and row["errors"] == 0, (name, row)
    assert (tmp_path / "soak.md").exists()


def test_serving_against_faiss_reports_the_memorys_added_time_and_its_ratios(tmp_path):
    import json

    import serving_vs_faiss

    serving_vs_faiss.main(
        ["--keys", "clustered", "--size", "4000", "--dim", "8", "--recall-queries", "100",
         "--rounds", "2", "--repeats-1", "2", "--repeats-256", "1", "--output-dir", str(tmp_path)]
    )  # fmt: skip
    results = json.loads((tmp_path / "serving_vs_faiss_clustered.json").read_text())
    assert results["ivf"]["recall"] >= 0.95 or (
        results["ivf"]["num_probes"] == results["ivf"]["num_partitions"]
    )
    # FAISS's knobs reach at least the SavedModel's recall, or their largest setting.
    assert results["faiss_ivfflat"]["recall"] >= results["ivf"]["recall"] - 1e-9 or (
        results["faiss_ivfflat"]["nprobe"] == 128
    )
    median, added = results["median_ms"], results["added_ms"]
    assert set(median) == {"network", "resmem", "faiss_ivfflat", "faiss_hnsw"}
    assert results["ratios"]["added_256_over_faiss_ivfflat"] == pytest.approx(
        added["256"] / median["faiss_ivfflat"]["256"]
    )
    assert all(v > 0 for by in median.values() for v in by.values())


def test_serving_profile_attributes_the_ops_to_the_parts_of_the_graph(tmp_path):
    import json

    import serving_profile

    serving_profile.main(
        ["--keys", "clustered", "--size", "4000", "--dim", "8", "--num-probes", "4",
         "--scoring", "bfloat16", "--requests", "2", "--output-dir", str(tmp_path)]
    )  # fmt: skip
    results = json.loads((tmp_path / "serving_profile.json").read_text())
    parts = results["traced"]["resmem"]["256"]["parts_ms"]
    # The search's name scopes are found in the served graph.
    searched = (
        "search: score candidates (gathers, matmul)",
        "search: top-k",
        "search: re-score the bfloat16 shortlist",
        "search: choose partitions",
    )
    for part in searched:
        assert parts[part] > 0, part
    assert results["traced"]["network"]["256"]["parts_ms"]["search: top-k"] == 0
