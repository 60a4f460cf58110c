"""Duplicate impressions and NaN p_true are quarantined; a re-validation withdraws the previous result first."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.validation.conftest import assert_accounted, expect_counts, run_world
from tests.validation.corpus import read_quarantine, write_world
from twinv2.errors import DataError


def test_duplicate_impressions_are_quarantined(world, tmp_path, vparams):
    imps = world.impressions
    dup = imps.iloc[[3, 3, 70]].copy()
    dup.loc[:, "label"] = 1 - dup["label"]          # same (user, item, ts): a duplicate whatever the label
    world.impressions = pd.concat([imps, dup], ignore_index=True)
    report = run_world(world, tmp_path, vparams)
    expect_counts(report, "impressions", 3, no_duplicate=3)
    q = read_quarantine(tmp_path, "impressions")
    assert set(q["expectation"]) == {"no_duplicate"}
    assert q["reason"].str.contains(r"duplicate impression: same \(user_id, item_id, ts\)").all()
    assert report["tables"]["impressions"]["gx"]["agrees"]
    assert_accounted(tmp_path, {"items": world.items, "behaviors": world.behaviors,
                                "impressions": world.impressions}, report)


def test_nan_p_true_is_quarantined_null_is_not(world, tmp_path, vparams):
    write_world(world, tmp_path)
    imps = world.impressions
    p = imps["p_true"].to_numpy(np.float32).copy()
    p[3], p[5] = np.nan, np.inf
    valid = np.ones(len(p), dtype=bool)
    valid[4] = False                                 # null: the ground truth is unknown, allowed
    cols = {c: pa.array(imps[c].to_numpy()) for c in imps.columns if c != "p_true"}
    cols["p_true"] = pa.array(p, mask=~valid)        # pa.array from numpy keeps NaN a value, not a null
    table = pa.table(cols)
    assert table.column("p_true").null_count == 1
    pq.write_table(table, tmp_path / "raw" / "impressions.parquet")
    from pipelines import validate

    report = validate.run(tmp_path, vparams)
    expect_counts(report, "impressions", 2, p_true_not_nan=1, p_true_in_unit=1)
    q = read_quarantine(tmp_path, "impressions").sort_values("ts")
    by = dict(zip(q["expectation"], q["reason"]))
    assert "p_true is NaN" in by["p_true_not_nan"] and by["p_true_in_unit"] == "p_true outside [0, 1]"
    assert report["tables"]["impressions"]["gx"]["agrees"] and report["tables"]["impressions"]["gx"]["batches"] == 1
    v = pq.read_table(tmp_path / "validated" / "impressions.parquet").column("p_true")
    assert v.null_count == 1 and not np.isnan(v.drop_null().to_numpy()).any()


def _report(root):
    return json.loads((root / "reports" / "validation.json").read_text())


def test_a_failed_revalidation_withdraws_the_previous_result(world, tmp_path, vparams):
    run_world(world, tmp_path, vparams)
    assert (tmp_path / "validated" / "items.parquet").exists() and _report(tmp_path)["success"] is True
    (tmp_path / "raw" / "items.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(DataError, match="items.parquet"):
        from pipelines import validate

        validate.run(tmp_path, vparams)
    assert not (tmp_path / "validated").exists()
    rep = _report(tmp_path)
    assert rep["success"] is False and rep["status"] == "error" and "items.parquet" in rep["error"]
    assert not (tmp_path / "reports" / "gx" / "validation_results.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".validated")]


def test_a_killed_revalidation_leaves_no_valid_looking_result(world, tmp_path, vparams, monkeypatch):
    run_world(world, tmp_path, vparams)
    from twinv2.validation import runner

    def killed(paths, vp):
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "_validate", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.validate_dataset(tmp_path, vparams)
    assert not (tmp_path / "validated").exists()
    rep = _report(tmp_path)
    assert rep["success"] is False and rep["status"] == "running"


def test_a_passing_report_says_passed(world, tmp_path, vparams):
    rep = run_world(world, tmp_path, vparams)
    assert rep["status"] == "passed" and _report(tmp_path)["status"] == "passed"


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_validate_outputs_honour_the_umask(world, tmp_path, vparams, mask):
    """Another user of the group (an Airflow worker) can read what validate wrote: modes follow the umask,
    not tempfile's 0600/0700."""
    import os
    import stat

    old = os.umask(mask)
    try:
        run_world(world, tmp_path, vparams)
    finally:
        os.umask(old)
    fmode, dmode = 0o666 & ~mask, 0o777 & ~mask
    for d in ("validated", "validated/behaviors", "quarantine", "reports"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == dmode, d
    for f in ("validated/items.parquet", "validated/impressions.parquet", "validated/meta.json",
              "quarantine/items.parquet", "quarantine/behaviors.parquet", "reports/validation.json",
              *(str(p.relative_to(tmp_path)) for p in (tmp_path / "validated" / "behaviors").iterdir())):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == fmode, f
