from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.validation.corpus import World, clean_world, read_quarantine, read_validated, write_world

KEYS = {"items": ["item_id"], "behaviors": ["user_id", "ts", "item_id"], "impressions": ["user_id", "ts", "item_id"]}


@pytest.fixture()
def vparams(params):
    """The repository params, with a copy of the validate section tests may change."""
    p = copy.deepcopy(params)
    p.setdefault("validate", {})
    return p


@pytest.fixture()
def world() -> World:
    w = clean_world()
    return World(w.items.copy(), w.behaviors.copy(), w.impressions.copy(), dict(w.meta))


def run_world(w: World, root: Path, params: dict, n_parts: int = 2) -> dict:
    from pipelines import validate

    write_world(w, root, n_parts=n_parts)
    return validate.run(root, params)


def _canon(df: pd.DataFrame, table: str) -> pd.DataFrame:
    cols = sorted(c for c in df.columns if c not in ("reason", "expectation"))
    out = df[cols].copy()
    for c in out.columns:
        if pd.api.types.is_numeric_dtype(out[c]):
            out[c] = out[c].astype("float64")
        else:
            out[c] = out[c].astype(object)
    return out.sort_values(list(out.columns)).reset_index(drop=True)


def assert_accounted(root: Path, raw: dict[str, pd.DataFrame], report: dict, validated: bool = True) -> None:
    """Rows in = accepted + quarantined, and validated + quarantine hold exactly the raw rows, unchanged."""
    for table, df in raw.items():
        t = report["tables"][table]
        assert t["accepted"] + t["quarantined"] + t["unchecked"] == t["rows_in"] == len(df)
        q = read_quarantine(root, table)
        assert len(q) == t["quarantined"]
        if not validated:
            continue
        v = read_validated(root, table)
        assert len(v) == t["accepted"]
        both = pd.concat([_canon(v, table), _canon(q, table)], ignore_index=True)
        pd.testing.assert_frame_equal(_canon(both, table), _canon(df, table), check_dtype=False)


def expect_counts(report: dict, table: str, quarantined: int, **by: int) -> None:
    t = report["tables"][table]
    assert t["quarantined"] == quarantined, (table, t)
    nonzero = {k: v for k, v in t["by_expectation"].items() if v}
    assert nonzero == by, (table, nonzero)
