"""The generated tiny world, the default world and the ml-100k ingest validate clean; random faults
injected into the tiny world quarantine exactly those rows (property test)."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import shared_path


def _read_raw(root):
    raw = root / "raw"
    beh = pa.concat_tables([pq.read_table(f) for f in sorted((raw / "behaviors").glob("*.parquet"))])
    return (pq.read_table(raw / "items.parquet").to_pandas(), beh.to_pandas(),
            pq.read_table(raw / "impressions.parquet").to_pandas())


def test_tiny_world_validates_clean(tiny_validated_ro):
    import json

    rep = json.loads((tiny_validated_ro / "reports" / "validation.json").read_text())
    assert rep["success"], rep["summary"]
    items, beh, imps = _read_raw(tiny_validated_ro)
    for t, df in (("items", items), ("behaviors", beh), ("impressions", imps)):
        r = rep["tables"][t]
        assert r["rows_in"] == r["accepted"] == len(df) and r["quarantined"] == 0 and r["gx"]["agrees"]
    v = pa.concat_tables([pq.read_table(f) for f in sorted((tiny_validated_ro / "validated" / "behaviors").glob("*.parquet"))])
    assert v.column("true_interest").to_pylist() == beh["true_interest"].tolist()   # passes through untouched
    assert rep["tables"]["impressions"]["table_level"]["split_edges"]["source"].startswith("meta.json")


# faults that touch only the row they are put in (no cascade): (table, column, value or callable)
FAULTS = [
    ("behaviors", "play_ms", -1), ("behaviors", "duration_ms", 0), ("behaviors", "item_id", -7),
    ("behaviors", "ts", "before_start"), ("behaviors", "play_ms", "replay_x9"),
    ("impressions", "label", 3), ("impressions", "p_true", 1.5), ("impressions", "split", "other"),
    ("impressions", "item_id", -7), ("impressions", "ts", "before_history_end"),
]


@pytest.fixture(scope="module")
def tiny_frames(tiny_world_ro):
    return _read_raw(tiny_world_ro)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_faults_quarantine_exactly_those_rows(data, tiny_world_ro, tiny_frames, tmp_path_factory, params):
    from pipelines import validate
    import json

    items, beh, imps = (df.copy() for df in tiny_frames)
    meta = json.loads((tiny_world_ro / "raw" / "meta.json").read_text())
    n = data.draw(st.integers(0, 12), label="n_faults")
    beh["_rid"] = np.arange(len(beh))
    imps["_rid"] = np.arange(len(imps))
    frames = {"behaviors": beh, "impressions": imps}
    chosen: dict[str, set] = {"behaviors": set(), "impressions": set()}
    for _ in range(n):
        table, col, val = data.draw(st.sampled_from(FAULTS))
        df = frames[table]
        row = data.draw(st.integers(0, len(df) - 1).filter(lambda r: r not in chosen[table]))
        chosen[table].add(row)
        if val == "before_start":
            val = meta["history_start_ms"] - 1
        elif val == "before_history_end":
            val = meta["history_end_ms"] - 1
        elif val == "replay_x9":
            val = int(df.at[row, "duration_ms"]) * 9
        df.loc[row, col] = np.asarray(val, dtype=df[col].dtype) if col != "split" else val
    root = tmp_path_factory.mktemp("prop")
    shutil.copytree(tiny_world_ro / "raw", root / "raw", ignore=shutil.ignore_patterns("behaviors"))
    (root / "raw" / "behaviors").mkdir()
    pq.write_table(pa.Table.from_pandas(beh, preserve_index=False), root / "raw" / "behaviors" / "part-00000.parquet")
    pq.write_table(pa.Table.from_pandas(imps, preserve_index=False), root / "raw" / "impressions.parquet")
    rep = validate.run(root, params)
    for table in ("behaviors", "impressions"):
        q = pq.read_table(root / "quarantine" / f"{table}.parquet").to_pandas()
        assert set(q["_rid"].tolist()) == chosen[table], table
        t = rep["tables"][table]
        assert t["quarantined"] == len(chosen[table]) and t["accepted"] + t["quarantined"] == t["rows_in"]
    assert rep["tables"]["items"]["quarantined"] == 0


def test_ml100k_ingest_validates_clean(tmp_path, params):
    from pipelines import ingest, validate

    src = shared_path("data", "ml-100k")
    ingest.run("movielens", src, tmp_path, params, progress=False)
    rep = validate.run(tmp_path, params)
    assert rep["success"], rep["summary"]
    for t in ("items", "behaviors", "impressions"):
        assert rep["tables"][t]["quarantined"] == 0, (t, rep["tables"][t]["by_expectation"])


@pytest.mark.slow
def test_default_world_validates_clean(tmp_path, params):
    from pipelines import generate, validate

    generate.run(preset="default", out=tmp_path, params=params)
    rep = validate.run(tmp_path, params)
    assert rep["success"], rep["summary"]
    assert all(rep["tables"][t]["quarantined"] == 0 for t in ("items", "behaviors", "impressions"))
