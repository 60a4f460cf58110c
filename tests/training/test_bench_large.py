"""bench/bench_large.py on the tiny preset: every stage runs as a real child process of the CLI (generate,
validate, cluster as shard processes two at a time, train, evaluate, the incremental daily step), each with its
own wall time, CPU time and peak RSS; the projection to 10^8 users is the formulas of its docstring applied
to the measured rates."""
import json
import sys

import pytest

from bench import bench_large

pytestmark = pytest.mark.slow      # every stage as a child process of the CLI: the full tier (make test)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("large")
    argv = sys.argv
    sys.argv = ["bench_large", "--out", str(out), "--preset", "tiny", "--shards", "3", "--workers", "2",
                "--models", "twinv2"]
    try:
        bench_large.main()
    finally:
        sys.argv = argv
    return out, json.loads((out / "bench_large.json").read_text())


def test_every_stage_measured(result):
    out, res = result
    stages = [s for s in res["stages"] if "wall_s" in s]
    assert [s["stage"] for s in stages] == ["generate", "validate", "cluster (3 shards, 2 at a time)", "train twinv2",
                                            "evaluate twinv2", "cluster incremental"]
    for s in stages:
        assert s["exit"] == 0 and s["wall_s"] > 0 and s["cpu_s"] > 0 and s["peak_rss_mb"] > 50, s
    cl = stages[2]
    assert len(cl["shards"]) == 3 and cl["processes"] == 3
    assert cl["peak_rss_mb"] == max(x["peak_rss_mb"] for x in cl["shards"])
    assert cl["concurrent_peak_rss_mb"] >= cl["peak_rss_mb"]
    assert cl["cpu_s"] == pytest.approx(sum(x["cpu_s"] for x in cl["shards"]))
    # the sharded build published one version; the incremental step made the next one from it
    full = next(s["version"] for s in res["stages"] if s["stage"] == "cluster_version_full")
    manifest = json.loads((out / "world" / "clusters" / full / "manifest.json").read_text())
    assert manifest["n_shards"] == 3
    m = res["measured"]
    assert m["current_version"] != full and m["incremental"]["version"] == m["current_version"]
    assert m["incremental"]["new_behaviours"] > 0
    assert 0.0 <= res["metrics"]["twinv2"]["auc"] <= 1.0 and res["metrics"]["twinv2"]["n_test"] > 0
    g = res["goals"]
    assert g["max_stage_rss_mb"] == max(s["peak_rss_mb"] for s in stages)
    assert g["rss_met"] == (g["max_stage_rss_mb"] < 8 * 1024) and g["total_met"] == (g["total_wall_s"] < 3600)


def test_projection_is_the_documented_formula(result):
    _, res = result
    m, p = res["measured"], res["projection_1e8x1e4"]
    B = 1e8 * 1e4
    assert p["behaviours"] == B
    assert p["full_rebuild_core_hours"] == pytest.approx(B / m["cluster_behaviours_per_cpu_s"] / 3600)
    inc_cpu = next(s["cpu_s"] for s in res["stages"] if s["stage"] == "cluster incremental")
    assert p["daily_step_core_hours"] == pytest.approx(B * inc_cpu / m["n_behaviours_before_w"] / 3600)
    assert p["cluster_tables_tb"] * 1e12 == pytest.approx(
        B * m["members_bytes_per_behaviour"] + B / m["compression"] * m["clusters_bytes_per_cluster"])
    assert p["train_core_hours_per_epoch"]["twinv2"] == pytest.approx(
        1e8 * m["impressions_per_user"] / m["train_samples_per_cpu_s"]["twinv2"] / 3600)
