"""A small clean world built in code, and the helpers that break it (the bad-input corpus).

Items 1..60 exist; behaviours and impressions only use items 1..50, so a fault injected into items
51..60 quarantines that item row and nothing else. Every user has distinct behaviour timestamps.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

DAY = 86_400_000
START = 1_600_000_000_000
HIST_END = START + 30 * DAY
END = HIST_END + 10 * DAY
VALID_START = HIST_END + 6 * DAY
TEST_START = HIST_END + 8 * DAY
N_USERS, PER_USER, N_ITEMS, USED_ITEMS = 20, 15, 60, 50


@dataclass
class World:
    items: pd.DataFrame
    behaviors: pd.DataFrame
    impressions: pd.DataFrame
    meta: dict


def clean_world(seed: int = 0) -> World:
    rng = np.random.default_rng(seed)
    item_id = np.arange(1, N_ITEMS + 1, dtype=np.int64)
    items = pd.DataFrame({"item_id": item_id, "author_id": (item_id % 7 + 100).astype(np.int64),
                          "category": (item_id % 5).astype(np.int32),
                          "duration_ms": rng.integers(10_000, 60_000, N_ITEMS).astype(np.int32)})
    rows = []
    for u in range(1, N_USERS + 1):
        ts = np.sort(rng.choice(np.arange(START, END, 60_000), PER_USER, replace=False))
        it = rng.integers(1, USED_ITEMS + 1, PER_USER)
        dur = items["duration_ms"].to_numpy()[it - 1]
        play = (dur * rng.uniform(0, 2.0, PER_USER)).astype(np.int32)
        rows.append(pd.DataFrame({"user_id": np.int64(u), "item_id": it.astype(np.int64), "ts": ts.astype(np.int64),
                                  "play_ms": play, "duration_ms": dur.astype(np.int32),
                                  "liked": rng.integers(0, 2, PER_USER).astype(np.int8),
                                  "true_interest": rng.integers(0, 8, PER_USER).astype(np.int32)}))
    behaviors = pd.concat(rows, ignore_index=True)
    imp = []
    for split, lo, hi in (("train", HIST_END, VALID_START), ("valid", VALID_START, TEST_START),
                          ("test", TEST_START, END)):
        n = 40
        imp.append(pd.DataFrame({"user_id": rng.integers(1, N_USERS + 1, n).astype(np.int64),
                                 "item_id": rng.integers(1, USED_ITEMS + 1, n).astype(np.int64),
                                 "ts": rng.integers(lo, hi, n).astype(np.int64),
                                 "label": rng.integers(0, 2, n).astype(np.int8), "split": split,
                                 "p_true": rng.uniform(0, 1, n).astype(np.float32)}))
    impressions = pd.concat(imp, ignore_index=True)
    meta = {"source": "test:corpus", "history_start_ms": START, "history_end_ms": HIST_END, "end_ms": END}
    return World(items, behaviors, impressions, meta)


def write_world(w: World, root: Path, n_parts: int = 2) -> Path:
    """Write raw/ exactly as given (no conforming, no sorting): faults reach the validator untouched."""
    raw = root / "raw"
    (raw / "behaviors").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(w.items, preserve_index=False), raw / "items.parquet")
    pq.write_table(pa.Table.from_pandas(w.impressions, preserve_index=False), raw / "impressions.parquet")
    b = w.behaviors.reset_index(drop=True)
    # split by user into n_parts contiguous groups of users (in row order)
    users = pd.unique(b["user_id"].dropna())
    groups = np.array_split(users, n_parts) if len(users) else [users]
    start = 0
    for i, g in enumerate(groups):
        if i == len(groups) - 1:
            part = b.iloc[start:]
        else:
            last_user = g[-1] if len(g) else None
            pos = np.nonzero(b["user_id"].to_numpy() == last_user)[0]
            stop = int(pos.max()) + 1 if len(pos) else start
            part = b.iloc[start:stop]
            start = stop
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), raw / "behaviors" / f"part-{i:05d}.parquet")
    (raw / "meta.json").write_text(json.dumps(w.meta))
    return root


def read_quarantine(root: Path, table: str) -> pd.DataFrame:
    return pq.read_table(root / "quarantine" / f"{table}.parquet").to_pandas()


def read_validated(root: Path, table: str) -> pd.DataFrame:
    p = root / "validated" / ("behaviors" if table == "behaviors" else f"{table}.parquet")
    return pq.read_table(p).to_pandas() if p.is_file() else pa.concat_tables(
        [pq.read_table(f) for f in sorted(p.glob("*.parquet"))]).to_pandas()
