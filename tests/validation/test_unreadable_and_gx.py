"""Unreadable input ends in one clear paragraph; GX and the vectorised masks agree row by row."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.validation.conftest import run_world
from tests.validation.corpus import END, START, write_world
from twinv2.errors import DataError, ValidationFailed


def _validate(root, params):
    from pipelines import validate

    return validate.run(root, params)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("fault, names", [
    ("truncated_items", "items.parquet"),
    ("truncated_behaviour_part", "part-00001.parquet"),
    ("missing_impressions", "impressions.parquet"),
    ("csv_as_items", "items.parquet"),
    ("missing_meta", "meta.json"),
    ("meta_without_end", "meta.json"),
    ("empty_behaviours_dir", "behaviors"),
])
def test_unreadable_input_is_a_data_error_naming_the_file(fault, names, world, tmp_path, vparams):
    write_world(world, tmp_path)
    raw = tmp_path / "raw"
    if fault == "truncated_items":
        _truncate(raw / "items.parquet")
    elif fault == "truncated_behaviour_part":
        _truncate(raw / "behaviors" / "part-00001.parquet")
    elif fault == "missing_impressions":
        (raw / "impressions.parquet").unlink()
    elif fault == "csv_as_items":
        world.items.to_csv(raw / "items.parquet", index=False)
    elif fault == "missing_meta":
        (raw / "meta.json").unlink()
    elif fault == "meta_without_end":
        (raw / "meta.json").write_text(json.dumps({"history_start_ms": START, "history_end_ms": START}))
    elif fault == "empty_behaviours_dir":
        for f in (raw / "behaviors").iterdir():
            f.unlink()
    with pytest.raises(DataError) as ei:
        _validate(tmp_path, vparams)
    msg = str(ei.value)
    assert names in msg and "expected" in msg.lower() and "\n" not in msg
    assert not (tmp_path / "validated").exists()


def test_cli_exit_codes_and_one_paragraph(world, tmp_path, capsys):
    from pipelines.cli import main

    write_world(world, tmp_path / "ok")
    assert main(["validate", "--data", str(tmp_path / "ok")]) == 0
    assert "validation PASSED" in capsys.readouterr().out
    world.impressions = world.impressions.iloc[:0]
    write_world(world, tmp_path / "bad")
    assert main(["validate", "--data", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "impressions.not_empty" in err and "Traceback" not in err
    (tmp_path / "bad" / "raw" / "items.parquet").write_text("item_id,author_id\n1,2\n")
    assert main(["validate", "--data", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "items.parquet" in err and "Traceback" not in err


def _faulty(world):
    b, i = world.behaviors, world.impressions
    b.loc[[3, 40], "play_ms"] = -1
    b.loc[[5, 6], "ts"] = np.array([START - 1, END + 10], dtype=np.int64)
    b.loc[7, "item_id"] = 999
    b.loc[9, "play_ms"] = b.loc[9, "duration_ms"] * 7
    b = pd.concat([b, b.iloc[[10, 10, 11]]]).sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    world.behaviors = b
    i.loc[[1, 2], "label"] = np.array([2, 5], dtype=np.int8)
    i.loc[3, "p_true"] = 1.2
    i.loc[4, "split"] = "x"
    i.loc[5, "ts"] = END - 1            # a train row in the test period
    i.loc[6, "p_true"] = np.nan         # NaN, not null (kept so by _arrow below)
    world.impressions = pd.concat([i, i.iloc[[10]]], ignore_index=True)   # a duplicate impression
    return world


def _arrow(df):
    """The Arrow batch of df with NaN kept a value (pa.Table.from_pandas would make it null)."""
    import pyarrow as pa

    return pa.table({c: pa.array(df[c].to_numpy()) for c in df.columns})


def test_gx_unexpected_rows_are_the_masked_rows(world):
    """Row by row, on one batch: GX's unexpected index lists equal the vectorised masks."""
    from twinv2.validation.rules import Bounds, active_rules, estimate_split_edges, prepare_batch, row_masks
    from twinv2.validation.suites import GXChecker

    w = _faulty(world)
    edges = estimate_split_edges(w.impressions["ts"].to_numpy(), w.impressions["split"].to_numpy())
    b = Bounds(START, w.meta["history_end_ms"], END, now_ms=END * 2, max_completion=5.0,
               known_items=np.arange(1, 61), split_edges=edges)
    for table, df in (("behaviors", w.behaviors), ("impressions", w.impressions), ("items", w.items)):
        df = df.reset_index(drop=True)
        df = prepare_batch(df, table, _arrow(df))
        masks = row_masks(df, table, b)
        by_rule, _ = GXChecker(table, b, whole_table=True, result_format="COMPLETE").run(df)
        assert sum(m.sum() for m in masks.values()) > 0 or table == "items"
        for r in active_rules(table, b):
            got = sorted(int(x) for x in by_rule[r.name].get("unexpected_index_list", []))
            if r.name == "no_duplicate":      # GX flags every member of a duplicated group
                want = np.nonzero(df[["user_id", "item_id", "ts"]].duplicated(keep=False).to_numpy())[0]
                if table == "behaviors":
                    assert masks[r.name].sum() == 3 and len(want) == 5   # row 10 thrice, row 11 twice
                else:
                    assert masks[r.name].sum() == 1 and len(want) == 2   # row 10 twice
            else:
                want = np.nonzero(masks[r.name])[0]
                if r.name == "p_true_not_nan":
                    assert want.tolist() == [6]
            assert got == want.tolist(), (table, r.name)


def test_a_wrong_mask_is_caught_by_gx(world, tmp_path, vparams, monkeypatch):
    """The agreement check can fail: sabotage one rule's mask and the stage stops."""
    import dataclasses

    from twinv2.validation import rules

    world.behaviors.loc[3, "play_ms"] = -1
    beh = rules.RULES["behaviors"]
    k = next(i for i, r in enumerate(beh) if r.name == "play_nonnegative")
    broken = dataclasses.replace(beh[k], mask=lambda df, b: np.zeros(len(df), dtype=bool))
    monkeypatch.setitem(rules.RULES, "behaviors", beh[:k] + [broken] + beh[k + 1:])
    with pytest.raises(ValidationFailed, match="gx_agrees") as ei:
        run_world(world, tmp_path, vparams)
    mm = ei.value.report["tables"]["behaviors"]["gx"]["mismatches"]
    assert mm[0]["rule"] == "play_nonnegative" and mm[0]["gx"] == 1 and mm[0]["vectorised"] == 0
