"""bench/bench_oracle_gap.py (issue 30 item 4): the regenerated logit parts of a generated world reproduce its
stored p_true, the least-squares read-out gives the oracle 1.0 on every part, and a run's table has every
group with counts that add up to the test split."""
import shutil

import numpy as np
import pandas as pd
import pytest

from bench import bench_oracle_gap as og


def _parts_of_test(world) -> pd.DataFrame:
    from twinv2.training.world import load_world

    w = load_world(world, need_clusters=False)
    test = w.impressions[w.impressions["split"] == "test"][["user_id", "item_id", "ts", "label"]]
    return test.merge(og.world_parts(world), on=["user_id", "item_id", "ts"], validate="one_to_one")


def test_read_shares_of_the_oracle_are_one_and_noise_is_unread(clustered_ro):
    t = _parts_of_test(clustered_ro)
    assert len(t) > 100
    full = og.oracle_scores(t)
    r = og.read_shares(t, full["p_true"])
    for k in og.PARTS:
        assert r[k] == pytest.approx(1.0, abs=1e-6), (k, r)
    assert r["r2"] == pytest.approx(1.0, abs=1e-9)
    r = og.read_shares(t, full["no noise"] + 0.5 * t["interest"].to_numpy())    # reads 1.5x the interest, no noise
    assert r["noise"] == pytest.approx(0.0, abs=1e-6) and r["interest"] == pytest.approx(1.5, abs=1e-6)


def test_bench_oracle_gap_with_a_run(tmp_path, clustered_ro, small_params):
    from pipelines import train

    p = dict(small_params)
    p["train"] = {**small_params["train"], "epochs": 1}
    run = tmp_path / "run"
    train.run(clustered_ro, "twinv2", run, p)
    res = og.main(["--data", str(clustered_ro), "--run", f"twinv2={run}", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "bench_oracle_gap.json").exists()
    ladder = {x["score"]: x for x in res["ladder"]}
    assert set(ladder) == {"p_true", "no noise", "no interest", "no pop", "no quality", "no user_bias",
                           "no noise, recent interest only"}
    (m,) = res["models"]
    assert m["model"] == "twinv2" and m["seeds"] == 1 and 0 < m["auc"] < 1
    assert set(m["reads"]) == set(og.PARTS) | {"r2"}
    for by in ("kind", "quartile"):                     # every test row in exactly one group of each cut
        assert sum(g["n"] for g in res["groups"] if g["by"] == by) == res["test_rows"]
    assert "| twinv2 |" in og.table(res)


def test_a_world_edited_after_generation_is_refused(tmp_path, clustered_ro):
    from twinv2.data.schema import DatasetPaths
    from twinv2.data.store import read_table, write_table

    world = tmp_path / "world"
    shutil.copytree(clustered_ro, world)
    paths = DatasetPaths(world)
    imp = read_table(paths.impressions("validated"), "impressions").to_pandas()
    imp["p_true"] = np.float32(0.5)
    write_table(paths.impressions("validated"), imp, "impressions")
    with pytest.raises(SystemExit, match="do not reproduce the stored p_true"):
        og.main(["--data", str(world), "--out", str(tmp_path / "out")])
