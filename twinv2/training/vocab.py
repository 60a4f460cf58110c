"""The vocabulary of a training run: id -> index maps of items, authors, categories (0 = padding, the last index
"unknown"), the item-inherent features of every item and the bucket edges of the cross features (completion,
play time, time gap, the extra numeric columns). Saved with the run (vocab.npz).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from twinv2.data.schema import OPTIONAL_BEHAVIOR_COLUMNS

DEFAULT_FEATURES = {
    "dur_edges_s": [5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600],
    "completion_edges": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2.0, 3.0],
    "play_edges_s": [1, 2, 3, 5, 8, 12, 20, 30, 45, 60, 90, 120, 180, 300, 600],
    "gap_log2_max": 30,          # time-gap bucket = floor(log2(1 + gap seconds)), clipped to [0, 30]
    "extra_buckets": 10,         # equal-width buckets over each extra cross column's observed range
    "pop_log2_max": 20,          # target popularity bucket = floor(log2(1 + views before ts)), clipped to [0, 20]
}


def _bucket(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bucket ids shifted by one: 1 + number of edges <= value (0 stays free for padding)."""
    return (np.digitize(np.asarray(values, dtype=np.float64), np.asarray(edges, dtype=np.float64)) + 1)


# ---------------------------------------------------------------- vocabularies


@dataclass
class Vocab:
    """Id -> index maps of the item-inherent features and the bucket edges of the cross features.

    Item index i (1..N) is item_ids[i-1]; N+1 is "unknown item"; likewise for authors and categories."""

    item_ids: np.ndarray            # (N,) int64 sorted
    item_author: np.ndarray         # (N+2,) int64 author index per item index
    item_category: np.ndarray       # (N+2,) int64
    item_duration_ms: np.ndarray    # (N+2,) float64
    author_ids: np.ndarray          # (A,) sorted
    categories: np.ndarray          # (C,) sorted
    extra_cols: list[str] = field(default_factory=list)
    extra_edges: dict[str, np.ndarray] = field(default_factory=dict)
    features: dict = field(default_factory=lambda: dict(DEFAULT_FEATURES))

    @classmethod
    def build(cls, items: pd.DataFrame, behaviors_extra: dict[str, np.ndarray] | None = None,
              features: dict | None = None) -> "Vocab":
        """From the items table (item_id, author_id, category, duration_ms) and the observed values of
        each extra numeric cross column (for their bucket ranges)."""
        feats = {**DEFAULT_FEATURES, **(features or {})}
        missing = [c for c in ("item_id", "author_id", "category", "duration_ms") if c not in items.columns]
        if missing:
            raise ValueError(f"items table lacks columns {missing}; expected item_id, author_id, category, duration_ms")
        items = items.drop_duplicates("item_id").sort_values("item_id", kind="stable")
        item_ids = items["item_id"].to_numpy(np.int64)
        author_ids = np.unique(items["author_id"].to_numpy(np.int64))
        categories = np.unique(items["category"].to_numpy(np.int64))
        n = len(item_ids)
        a = np.full(n + 2, 0, np.int64)
        c = np.full(n + 2, 0, np.int64)
        d = np.zeros(n + 2, np.float64)
        a[1:n + 1] = np.searchsorted(author_ids, items["author_id"].to_numpy(np.int64)) + 1
        c[1:n + 1] = np.searchsorted(categories, items["category"].to_numpy(np.int64)) + 1
        d[1:n + 1] = items["duration_ms"].to_numpy(np.float64)
        a[n + 1], c[n + 1] = len(author_ids) + 1, len(categories) + 1
        extra_cols, extra_edges = [], {}
        for col, vals in sorted((behaviors_extra or {}).items()):
            v = np.asarray(vals, dtype=np.float64)
            v = v[np.isfinite(v)]
            lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
            if hi <= lo:
                hi = lo + 1.0
            nb = int(feats["extra_buckets"])
            extra_cols.append(col)
            extra_edges[col] = np.linspace(lo, hi, nb + 1)[1:-1]
        return cls(item_ids, a, c, d, author_ids, categories, extra_cols, extra_edges, feats)

    # ---- sizes (the `vocab` argument of build_model)
    def sizes(self) -> dict:
        f = self.features
        cross = [len(f["completion_edges"]) + 2, len(f["play_edges_s"]) + 2, int(f["gap_log2_max"]) + 2]
        cross += [len(self.extra_edges[c]) + 2 for c in self.extra_cols]
        return {"item": len(self.item_ids) + 2, "author": len(self.author_ids) + 2,
                "category": len(self.categories) + 2, "dur_bucket": len(f["dur_edges_s"]) + 2,
                "cross": cross, "pop": int(f.get("pop_log2_max", 20)) + 2}

    # ---- lookups
    def item_index(self, ids: np.ndarray) -> np.ndarray:
        """Item index of raw item ids; unknown ids map to N+1."""
        ids = np.asarray(ids, dtype=np.int64)
        n = len(self.item_ids)
        if n == 0:
            return np.full(len(ids), 1, np.int64)
        i = np.clip(np.searchsorted(self.item_ids, ids), 0, n - 1)
        return np.where(self.item_ids[i] == ids, i + 1, n + 1).astype(np.int64)

    def id_index(self, ids: np.ndarray, table: str) -> np.ndarray:
        """Index of raw author ids / categories (copied onto virtual items); unknown -> last index."""
        ref = self.author_ids if table == "author" else self.categories
        ids = np.asarray(ids, dtype=np.int64)
        if len(ref) == 0:
            return np.full(len(ids), 1, np.int64)
        i = np.clip(np.searchsorted(ref, ids), 0, len(ref) - 1)
        return np.where(ref[i] == ids, i + 1, len(ref) + 1).astype(np.int64)

    def dur_bucket(self, duration_ms: np.ndarray) -> np.ndarray:
        return _bucket(np.asarray(duration_ms, np.float64) / 1000.0, self.features["dur_edges_s"])

    def static_cross(self, play_ms: np.ndarray, duration_ms: np.ndarray,
                     extras: dict[str, np.ndarray], completion: np.ndarray | None = None) -> np.ndarray:
        """(N, J-1) buckets of the cross features that do not depend on the target: completion, play
        time, extras (the time gap is inserted at batch time as column 2). `completion` defaults to
        play/duration (virtual items pass their averaged completion)."""
        play = np.asarray(play_ms, np.float64)
        dur = np.maximum(np.asarray(duration_ms, np.float64), 1.0)
        comp = play / dur if completion is None else np.asarray(completion, np.float64)
        cols = [_bucket(comp, self.features["completion_edges"]),
                _bucket(play / 1000.0, self.features["play_edges_s"])]
        for c in self.extra_cols:
            v = np.asarray(extras[c], np.float64) if c in extras else np.zeros(len(play))
            cols.append(_bucket(np.nan_to_num(v, nan=self.extra_edges[c][0] - 1), self.extra_edges[c]))
        return np.stack(cols, axis=1).astype(np.int32) if cols else np.zeros((len(play), 0), np.int32)

    def gap_bucket(self, gap_ms: np.ndarray) -> np.ndarray:
        g = np.maximum(np.asarray(gap_ms, np.float64), 0.0) / 1000.0
        return np.clip(np.floor(np.log2(1.0 + g)), 0, self.features["gap_log2_max"]).astype(np.int64) + 1

    # ---- persistence (a run directory keeps the exact vocabulary it was trained with)
    def save(self, path: str | Path) -> None:
        import json

        from twinv2.io import atomic_path

        arrays = {"item_ids": self.item_ids, "item_author": self.item_author, "item_category": self.item_category,
                  "item_duration_ms": self.item_duration_ms, "author_ids": self.author_ids,
                  "categories": self.categories,
                  "meta": np.array(json.dumps({"extra_cols": self.extra_cols, "features": self.features}))}
        for c in self.extra_cols:
            arrays[f"edges_{c}"] = self.extra_edges[c]
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        import json

        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        extra_cols = list(meta["extra_cols"])
        return cls(z["item_ids"], z["item_author"], z["item_category"], z["item_duration_ms"], z["author_ids"],
                   z["categories"], extra_cols, {c: z[f"edges_{c}"] for c in extra_cols}, meta["features"])


def extra_cross_columns(columns: Sequence[str]) -> list[str]:
    """The extra numeric cross features of a behaviours table (in schema order)."""
    return [c for c in OPTIONAL_BEHAVIOR_COLUMNS if c in columns]
