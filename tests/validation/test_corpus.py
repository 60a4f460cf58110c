"""The bad-input corpus: one world per kind of fault (and combinations), each with exact counts."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from tests.validation.conftest import assert_accounted, expect_counts, run_world
from tests.validation.corpus import END, HIST_END, START, TEST_START, read_quarantine, read_validated

DAY = 86_400_000


def raw_of(w):
    return {"items": w.items, "behaviors": w.behaviors, "impressions": w.impressions}


def test_clean_world_passes_untouched(world, tmp_path, vparams):
    r = run_world(world, tmp_path, vparams)
    assert r["success"] and r["failures"] == []
    for t in ("items", "behaviors", "impressions"):
        expect_counts(r, t, 0)
        assert r["tables"][t]["gx"]["agrees"] and r["tables"][t]["gx"]["batches"] >= 1
    assert_accounted(tmp_path, raw_of(world), r)
    v = read_validated(tmp_path, "behaviors")
    # extra non-canonical columns pass through untouched, in (user_id, ts) order
    assert v["true_interest"].tolist() == world.behaviors["true_interest"].tolist()
    assert v["liked"].tolist() == world.behaviors["liked"].tolist()
    assert (tmp_path / "validated" / "meta.json").read_text() == (tmp_path / "raw" / "meta.json").read_text()
    assert (tmp_path / "reports" / "gx" / "validation_results.json").is_file()
    assert r["tables"]["impressions"]["table_level"]["split_edges"]["source"].startswith("estimated")


# ------------------------------------------------------------------ row-level faults, one per kind
# each: (table, mutate(world), {table: (quarantined, {expectation: count})})

def _set(table, idx, col, value):
    def f(w):
        df = getattr(w, table)
        if value is None and pd.api.types.is_integer_dtype(df[col]):
            df[col] = df[col].astype(str(df[col].dtype).capitalize())   # nullable Int64 etc: stays integer
        df.loc[idx, col] = value
    return f


def _dup(table, idx):
    def f(w):
        df = getattr(w, table)
        setattr(w, table, pd.concat([df.iloc[: idx + 1], df.iloc[[idx]], df.iloc[idx + 1:]], ignore_index=True))
    return f


ROW_FAULTS = {
    "items_null_item_id": (_set("items", 55, "item_id", None), {"items": (1, {"item_id_not_null": 1})}),
    "items_null_author": (_set("items", 52, "author_id", None), {"items": (1, {"author_id_not_null": 1})}),
    "items_duration_zero": (_set("items", 53, "duration_ms", 0), {"items": (1, {"duration_positive": 1})}),
    "items_duration_negative": (_set("items", 54, "duration_ms", -5), {"items": (1, {"duration_positive": 1})}),
    "items_duplicate_id": (_dup("items", 56), {"items": (1, {"item_id_unique": 1})}),
    "beh_null_user": (_set("behaviors", 17, "user_id", None), {"behaviors": (1, {"user_id_not_null": 1})}),
    "beh_null_item": (_set("behaviors", 18, "item_id", None), {"behaviors": (1, {"item_id_not_null": 1})}),
    "beh_null_ts": (_set("behaviors", 19, "ts", None), {"behaviors": (1, {"ts_not_null": 1})}),
    "beh_null_play": (_set("behaviors", 20, "play_ms", None), {"behaviors": (1, {"play_ms_not_null": 1})}),
    "beh_duration_zero": (_set("behaviors", 21, "duration_ms", 0), {"behaviors": (1, {"duration_positive": 1})}),
    "beh_play_negative": (_set("behaviors", 22, "play_ms", -1), {"behaviors": (1, {"play_nonnegative": 1})}),
    "beh_completion_above_cap": (lambda w: w.behaviors.__setitem__("play_ms", np.where(
        w.behaviors.index == 23, w.behaviors["duration_ms"] * 6, w.behaviors["play_ms"]).astype(np.int32)),
        {"behaviors": (1, {"completion_capped": 1})}),
    "beh_ts_before_start": (_set("behaviors", 15, "ts", START - 1), {"behaviors": (1, {"ts_in_range": 1})}),
    "beh_ts_after_end": (_set("behaviors", 29, "ts", END + 1), {"behaviors": (1, {"ts_in_range": 1})}),
    "beh_duplicate": (_dup("behaviors", 30), {"behaviors": (1, {"no_duplicate": 1})}),
    "beh_unknown_item": (_set("behaviors", 31, "item_id", 999), {"behaviors": (1, {"known_item": 1})}),
    "imp_null_label": (_set("impressions", 3, "label", None), {"impressions": (1, {"label_not_null": 1})}),
    "imp_label_two": (_set("impressions", 4, "label", 2), {"impressions": (1, {"label_binary": 1})}),
    "imp_p_true_above_one": (_set("impressions", 5, "p_true", 1.5), {"impressions": (1, {"p_true_in_unit": 1})}),
    "imp_p_true_negative": (_set("impressions", 6, "p_true", -0.1), {"impressions": (1, {"p_true_in_unit": 1})}),
    "imp_unknown_split": (_set("impressions", 7, "split", "holdout"), {"impressions": (1, {"split_known": 1})}),
    "imp_train_in_test_period": (_set("impressions", 8, "ts", END - 1),
                                 {"impressions": (1, {"split_time_order": 1})}),
    "imp_ts_before_history_end": (_set("impressions", 9, "ts", HIST_END - 1),
                                  {"impressions": (1, {"ts_in_range": 1})}),
    "imp_unknown_item": (_set("impressions", 10, "item_id", 999), {"impressions": (1, {"known_item": 1})}),
}


@pytest.mark.parametrize("case", sorted(ROW_FAULTS))
def test_row_fault_quarantines_exactly_that_row(case, world, tmp_path, vparams):
    mutate, expected = ROW_FAULTS[case]
    mutate(world)
    r = run_world(world, tmp_path, vparams)
    assert r["success"], r["summary"]
    for table in ("items", "behaviors", "impressions"):
        n, by = expected.get(table, (0, {}))
        expect_counts(r, table, n, **by)
        if n:
            q = read_quarantine(tmp_path, table)
            assert q["expectation"].tolist() == list(by), q
            assert all(q["reason"].str.len() > 0)
    assert_accounted(tmp_path, raw_of(world), r)


def test_boundaries_are_accepted(world, tmp_path, vparams):
    """Completion exactly at the cap, ts exactly at history start and end, p_true null / 0 / 1."""
    b = world.behaviors
    b.loc[40, "play_ms"] = b.loc[40, "duration_ms"] * 5
    b.loc[0, "ts"] = START
    b.loc[len(b) - 1, "ts"] = END
    world.impressions.loc[0, "p_true"] = None
    world.impressions.loc[1, "p_true"] = 0.0
    world.impressions.loc[2, "p_true"] = 1.0
    r = run_world(world, tmp_path, vparams)
    for t in ("items", "behaviors", "impressions"):
        expect_counts(r, t, 0)
    assert_accounted(tmp_path, raw_of(world), r)


def test_future_ts_is_its_own_expectation(world, tmp_path, vparams):
    now = int(time.time() * 1000)
    world.meta["end_ms"] = now + 365 * DAY        # the dataset's range reaches into the future
    world.behaviors.loc[12, "ts"] = now + DAY
    r = run_world(world, tmp_path, vparams)
    expect_counts(r, "behaviors", 1, ts_not_future=1)
    assert read_quarantine(tmp_path, "behaviors")["expectation"].tolist() == ["ts_not_future"]


@pytest.mark.parametrize("names", [("valid_start_ms", "test_start_ms"), ("train_end_ms", "valid_end_ms")])
def test_split_edges_from_meta(world, tmp_path, vparams, names):
    """The edges generate and ingest write, and the older names generate wrote before 2026-11-29."""
    world.meta.update({names[0]: HIST_END + 6 * DAY, names[1]: TEST_START})
    world.impressions.loc[50, "ts"] = TEST_START + 1          # a valid row inside the test period
    r = run_world(world, tmp_path, vparams)
    expect_counts(r, "impressions", 1, split_time_order=1)
    assert r["tables"]["impressions"]["table_level"]["split_edges"]["source"] == f"meta.json {names[0]}/{names[1]}"


# ------------------------------------------------------------------ combinations


def test_one_row_many_faults_counts_each_and_names_the_first(world, tmp_path, vparams):
    for col, v in (("play_ms", -1), ("ts", START - 5), ("item_id", 999)):
        _set("behaviors", 22, col, v)(world)
    r = run_world(world, tmp_path, vparams)
    expect_counts(r, "behaviors", 1, play_nonnegative=1, ts_in_range=1, known_item=1)
    q = read_quarantine(tmp_path, "behaviors")
    assert q["expectation"].tolist() == ["play_nonnegative"]
    assert q["reason"].iloc[0].count(";") == 2
    assert_accounted(tmp_path, raw_of(world), r)


def test_quarantined_item_cascades_to_behaviours_and_impressions(world, tmp_path, vparams):
    vparams["validate"]["max_quarantine_share"] = 0.5
    _set("items", 4, "author_id", None)(world)        # item 5 is rejected ...
    n_beh = int((world.behaviors["item_id"] == 5).sum())
    n_imp = int((world.impressions["item_id"] == 5).sum())
    assert n_beh and n_imp
    r = run_world(world, tmp_path, vparams)          # ... so rows referring to it are unknown-item rows
    expect_counts(r, "items", 1, author_id_not_null=1)
    expect_counts(r, "behaviors", n_beh, known_item=n_beh)
    expect_counts(r, "impressions", n_imp, known_item=n_imp)
    assert_accounted(tmp_path, raw_of(world), r)


def test_faults_in_every_table_at_once(world, tmp_path, vparams):
    for case in ("items_duration_zero", "beh_play_negative", "beh_unknown_item", "beh_ts_after_end",
                 "imp_label_two", "imp_unknown_split"):
        ROW_FAULTS[case][0](world)
    _dup("behaviors", 100)(world)
    r = run_world(world, tmp_path, vparams)
    expect_counts(r, "items", 1, duration_positive=1)
    expect_counts(r, "behaviors", 4, play_nonnegative=1, known_item=1, ts_in_range=1, no_duplicate=1)
    expect_counts(r, "impressions", 2, label_binary=1, split_known=1)
    assert_accounted(tmp_path, raw_of(world), r)


# ------------------------------------------------------------------ table-level faults


def _fails(world, tmp_path, params, check: str, table: str):
    from twinv2.errors import ValidationFailed

    (tmp_path / "validated").mkdir(parents=True)             # stale output from an earlier run
    (tmp_path / "validated" / "items.parquet").write_text("stale")
    with pytest.raises(ValidationFailed) as ei:
        run_world(world, tmp_path, params)
    rep = ei.value.report
    assert not rep["success"]
    assert not rep["tables"][table]["table_level"][check]["success"]
    assert f"{table}.{check}" in str(ei.value)
    assert (tmp_path / "reports" / "validation.json").is_file()
    assert not (tmp_path / "validated").exists()             # nothing stale passes for validated
    return rep


def test_empty_items(world, tmp_path, vparams):
    world.items = world.items.iloc[:0]
    rep = _fails(world, tmp_path, vparams, "not_empty", "items")
    b = rep["tables"]["behaviors"]
    assert b["quarantined"] == b["rows_in"] == b["by_expectation"]["known_item"]   # nothing is a known item


def test_empty_impressions(world, tmp_path, vparams):
    world.impressions = world.impressions.iloc[:0]
    _fails(world, tmp_path, vparams, "not_empty", "impressions")


def test_empty_behaviours(world, tmp_path, vparams):
    world.behaviors = world.behaviors.iloc[:0]
    _fails(world, tmp_path, vparams, "not_empty", "behaviors")


def test_wrong_dtype_is_a_schema_failure(world, tmp_path, vparams):
    world.behaviors["ts"] = world.behaviors["ts"].astype(str)
    rep = _fails(world, tmp_path, vparams, "schema", "behaviors")
    b = rep["tables"]["behaviors"]
    assert b["unchecked"] == b["rows_in"] == len(world.behaviors) and b["accepted"] == b["quarantined"] == 0
    assert "string, expected int64" in b["table_level"]["schema"]["detail"]


def test_missing_column_is_a_schema_failure(world, tmp_path, vparams):
    world.impressions = world.impressions.drop(columns=["label"])
    rep = _fails(world, tmp_path, vparams, "schema", "impressions")
    assert "'label' is missing" in rep["tables"]["impressions"]["table_level"]["schema"]["detail"]


def test_missing_p_true_is_allowed(world, tmp_path, vparams):
    world.impressions = world.impressions.drop(columns=["p_true"])
    r = run_world(world, tmp_path, vparams)
    assert r["success"]
    assert read_validated(tmp_path, "impressions")["p_true"].isna().all()


def test_quarantine_share_above_threshold_stops(world, tmp_path, vparams):
    bad = np.arange(0, len(world.behaviors), 10)               # 10% of the rows
    world.behaviors.loc[bad, "play_ms"] = -1
    rep = _fails(world, tmp_path, vparams, "quarantine_share", "behaviors")
    expect_counts(rep, "behaviors", len(bad), play_nonnegative=len(bad))   # counts are exact anyway
    assert_accounted(tmp_path, raw_of(world), rep, validated=False)


def _swap_ts(world, i, j):
    b = world.behaviors
    b.loc[i, "ts"], b.loc[j, "ts"] = b.loc[j, "ts"], b.loc[i, "ts"]


def test_unsorted_user_is_sorted_and_reported(world, tmp_path, vparams):
    _swap_ts(world, 31, 33)                                   # user 3
    r = run_world(world, tmp_path, vparams)
    s = r["tables"]["behaviors"]["table_level"]["sorted_by_user_ts"]
    assert r["success"] and s["success"] and s["unsorted_users"] == 1 and s["examples"] == [3]
    v = read_validated(tmp_path, "behaviors")
    assert (v.groupby("user_id")["ts"].diff().dropna() > 0).all()
    assert_accounted(tmp_path, raw_of(world), r)


def test_unsorted_user_fails_under_policy_fail(world, tmp_path, vparams):
    vparams["validate"]["unsorted_policy"] = "fail"
    _swap_ts(world, 31, 33)
    rep = _fails(world, tmp_path, vparams, "sorted_by_user_ts", "behaviors")
    assert rep["tables"]["behaviors"]["table_level"]["sorted_by_user_ts"]["examples"] == [3]


def test_user_order_break_inside_a_file_is_sorted(world, tmp_path, vparams):
    b = world.behaviors
    world.behaviors = pd.concat([b[b.user_id != 2], b[b.user_id == 2]], ignore_index=True)   # user 2 last
    r = run_world(world, tmp_path, vparams, n_parts=1)
    assert r["success"]
    assert r["tables"]["behaviors"]["table_level"]["sorted_by_user_ts"]["unsorted_users"] >= 1
    v = read_validated(tmp_path, "behaviors")
    assert v["user_id"].is_monotonic_increasing
    assert_accounted(tmp_path, raw_of(world), r)


def test_user_split_across_files_fails(world, tmp_path, vparams):
    from tests.validation.corpus import write_world
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_world(world, tmp_path, n_parts=2)
    parts = sorted((tmp_path / "raw" / "behaviors").glob("*.parquet"))
    first = pq.read_table(parts[0]).to_pandas()
    second = pq.read_table(parts[1]).to_pandas()
    moved = first[first.user_id == first.user_id.iloc[0]].iloc[-1:]    # a row of the first user
    pq.write_table(pa.Table.from_pandas(pd.concat([moved, second]), preserve_index=False), parts[1])
    from pipelines import validate
    from twinv2.errors import ValidationFailed

    with pytest.raises(ValidationFailed, match="users_not_split_across_files"):
        validate.run(tmp_path, vparams)
    assert not (tmp_path / "validated").exists()
