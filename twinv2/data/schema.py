"""The canonical data model (see docs/data.md).

A dataset directory DIR holds raw/, validated/ (same layout, accepted rows only), quarantine/,
clusters/ and reports/. Each of raw/ and validated/ holds three tables:

    items.parquet        item_id, author_id, category, duration_ms [, extra columns]
    behaviors/           user_id, item_id, ts, play_ms, duration_ms [, cross features]
                         sharded part-*.parquet files, sorted by (user_id, ts), a user never split
                         across files: each user's life-cycle history, stored once
    impressions.parquet  user_id, item_id, ts, label, split [, p_true]
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.int64()),
    ("author_id", pa.int64()),
    ("category", pa.int32()),
    ("duration_ms", pa.int32()),
])

BEHAVIORS_SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("item_id", pa.int64()),
    ("ts", pa.int64()),          # ms since epoch
    ("play_ms", pa.int32()),
    ("duration_ms", pa.int32()),
])
# Optional user-item cross features a behaviour may carry (numeric; averaged inside clusters).
OPTIONAL_BEHAVIOR_COLUMNS = {"liked": pa.int8(), "rating": pa.float32()}

IMPRESSIONS_SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("item_id", pa.int64()),
    ("ts", pa.int64()),
    ("label", pa.int8()),
    ("split", pa.string()),
    ("p_true", pa.float32()),    # null where the ground truth is unknown (real logs)
])

SCHEMAS = {"items": ITEMS_SCHEMA, "behaviors": BEHAVIORS_SCHEMA, "impressions": IMPRESSIONS_SCHEMA}
SPLITS = ("train", "valid", "test")
TABLES = ("items", "behaviors", "impressions")

# The columns that make a behaviour one event: two rows with equal values in all of them are the same event
# logged twice. Ingest writes the key of its source into meta.json (`event_key`; Taobao adds its `action`: a pv
# and a buy of one item in one second are two events); ingest and validate both apply `repeated_events`.
EVENT_KEY = ("user_id", "item_id", "ts")


def event_key(meta: dict | None) -> tuple[str, ...]:
    """The behaviour event key of a dataset: meta.json `event_key`, else (user_id, item_id, ts)."""
    key = (meta or {}).get("event_key")
    return tuple(key) if key else EVENT_KEY


def repeated_events(df, key) -> "np.ndarray":
    """The one rule for "the same event twice", used by ingest and validate: (n,) bool, True for a row whose
    `key` columns all equal those of an earlier row (the first one stays). A row with a null in its key is
    never a repeat (the not-null rules decide about it)."""
    import numpy as np

    key = list(key)
    complete = df[key].notna().all(axis=1).to_numpy()
    rep = np.zeros(len(df), dtype=bool)
    rep[complete] = df.loc[complete, key].duplicated(keep="first").to_numpy()
    return rep


def conform(table: pa.Table, name: str) -> pa.Table:
    """Cast a table to the canonical dtypes of `name`, keeping extra columns after the canonical ones.

    Raises ValueError naming the missing columns."""
    schema = SCHEMAS[name]
    missing = [f.name for f in schema if f.name not in table.column_names]
    if name == "impressions" and missing == ["p_true"]:
        table = table.append_column("p_true", pa.nulls(len(table), pa.float32()))
        missing = []
    if missing:
        raise ValueError(f"table {name!r} lacks required columns {missing}; expected {schema.names}")
    cols, fields = [], []
    for f in schema:
        cols.append(table.column(f.name).cast(f.type))
        fields.append(f)
    for extra in table.column_names:
        if extra not in schema.names:
            col = table.column(extra)
            want = OPTIONAL_BEHAVIOR_COLUMNS.get(extra) if name == "behaviors" else None
            if want is not None:
                col = col.cast(want)
            cols.append(col)
            fields.append(pa.field(extra, col.type))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


@dataclass(frozen=True)
class DatasetPaths:
    """Where everything of one dataset directory lives."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    def stage(self, stage: str = "raw") -> Path:          # raw | validated
        return self.root / stage

    def items(self, stage: str = "raw") -> Path:
        return self.root / stage / "items.parquet"

    def behaviors(self, stage: str = "raw") -> Path:
        return self.root / stage / "behaviors"

    def impressions(self, stage: str = "raw") -> Path:
        return self.root / stage / "impressions.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def clusters(self) -> Path:
        return self.root / "clusters"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
