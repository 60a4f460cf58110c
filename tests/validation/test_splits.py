"""Issue 32: validate refuses what ingest refuses: an empty train / valid / test split (table-level
`splits_not_empty`, exit 1) and a dataset spanning zero time (unreadable meta.json, exit 2)."""
from __future__ import annotations

import pytest

from tests.validation.conftest import run_world
from twinv2.errors import DataError, ValidationFailed


@pytest.mark.parametrize("split", ["train", "valid"])
def test_an_empty_split_fails_validation(world, tmp_path, vparams, split):
    world.impressions = world.impressions[world.impressions["split"] != split].reset_index(drop=True)
    vparams["validate"]["gx_confirm"] = False
    with pytest.raises(ValidationFailed) as e:
        run_world(world, tmp_path, vparams)
    check = e.value.report["tables"]["impressions"]["table_level"]["splits_not_empty"]
    assert not check["success"] and check["by_split"][split] == 0
    assert f"{split} has no accepted impression" in check["detail"]
    assert not (tmp_path / "validated").exists()


def test_a_split_empty_by_design_is_accepted(world, tmp_path, vparams):
    """Ingest writes which splits must hold impressions (meta.json require_splits, e.g. per-user valid: 0)."""
    world.impressions = world.impressions[world.impressions["split"] != "valid"].reset_index(drop=True)
    world.meta["require_splits"] = ["train", "test"]
    vparams["validate"]["gx_confirm"] = False
    r = run_world(world, tmp_path, vparams)
    assert r["tables"]["impressions"]["table_level"]["splits_not_empty"]["success"]


def test_a_dataset_spanning_zero_time_is_refused(world, tmp_path, vparams):
    t = world.meta["history_start_ms"]
    world.meta.update(history_end_ms=t, end_ms=t)
    with pytest.raises(DataError, match="spans zero time"):
        run_world(world, tmp_path, vparams)
