"""Samples: the batch dict of docs/architecture.md, built on the fly from the stored histories.

A sample is one impression (user, item, ts, label). Its history is addressed, never copied: (user index,
position) into the CSR behaviour store, position = number of the user's behaviours with ts strictly
before the sample's ts (the leakage rule). A batch gathers, with one vectorised numpy index per field:

    target  item/author/category/dur_bucket                            (B,)
    long    the most recent L raw behaviours before ts (long_source "raw"), or the user's clusters as of
            the watermark W (long_source "clusters", the L most recent by mean ts), left-aligned,
            padded at the end                                            (B, L), cross (B, L, J)
    short   the last S raw behaviours before ts                          (B, S), cross (B, S, J)

Vocabularies are shifted by one (0 = padding); the last index of item/author/category is "unknown".
Cross features, in order: completion-ratio bucket, play-time bucket, log2 time-gap-to-target bucket,
then one bucket per extra numeric cross column (schema.OPTIONAL_BEHAVIOR_COLUMNS present in the data).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from twinv2.data.schema import OPTIONAL_BEHAVIOR_COLUMNS
from twinv2.data.store import UserHistories
from twinv2.training.fastbatch import fast_batch

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


# ---------------------------------------------------------------- per-row feature stores (CSR by user)


@dataclass
class RowFeatures:
    """Per-row features of a CSR store (raw behaviours or clusters), precomputed once.

    Rows of user u are offsets[u]:offsets[u+1], in time order."""

    user_ids: np.ndarray     # (U,) sorted
    offsets: np.ndarray      # (U+1,)
    item: np.ndarray         # (N,) int64 indices
    author: np.ndarray
    category: np.ndarray
    dur_bucket: np.ndarray
    cross: np.ndarray        # (N, J-1) int32: completion, play, extras (no gap)
    ts: np.ndarray           # (N,) float64 ms (cluster ts is a mean)
    log_n: np.ndarray        # (N,) float32
    comp: np.ndarray | None = None   # (N,) float32 completion play/duration (cluster: the members' mean)
    cluster_id: np.ndarray | None = None   # (N,) int64 cluster id of each row (cluster stores only)
    # virtual-item mixes (cluster stores, `attach_mix`): field -> (ids (N, J) int64, n (N, J) float32 member
    # counts, c (N, J) float32 summed member completion), the J most frequent ids among each cluster's members
    mix: dict | None = None

    def index_of(self, user_ids: np.ndarray) -> np.ndarray:
        u = np.asarray(user_ids, dtype=np.int64)
        if len(self.user_ids) == 0:
            return np.full(len(u), -1, np.int64)
        i = np.clip(np.searchsorted(self.user_ids, u), 0, len(self.user_ids) - 1)
        return np.where(self.user_ids[i] == u, i, -1)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def by_size(self) -> "RowFeatures":
        """A copy with each user's rows ordered by size (ascending ln n, ties oldest first) instead of time, so
        the last L rows are the user's L largest clusters (model.cluster_order: size). The same rows and users;
        only the order within each user changes (no time order any more: never use it for `positions_before`)."""
        urow = np.repeat(np.arange(len(self.user_ids), dtype=np.int64), np.diff(self.offsets))
        order = np.lexsort((self.ts, self.log_n, urow))                  # primary: user, then ln n, then ts

        def take(a):
            return None if a is None else a[order]

        mix = None if self.mix is None else {f: tuple(a[order] for a in v) for f, v in self.mix.items()}
        return RowFeatures(user_ids=self.user_ids, offsets=self.offsets, item=self.item[order],
                           author=self.author[order], category=self.category[order], dur_bucket=self.dur_bucket[order],
                           cross=self.cross[order], ts=self.ts[order], log_n=self.log_n[order], comp=take(self.comp),
                           cluster_id=take(self.cluster_id), mix=mix)

    def positions_before(self, t: int) -> np.ndarray:
        """(U,) number of rows of each user with ts < t (rows are in time order within a user)."""
        before = (self.ts < t).astype(np.int64)
        c = np.concatenate([[0], np.cumsum(before)])
        return c[self.offsets[1:]] - c[self.offsets[:-1]]

    def item_counts_before(self, item: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Number of rows (over all users) of item index item[i] with ts strictly before ts[i] -> (M,) int64."""
        return self.counts_before("item", item, ts)[0]

    def counts_before(self, field: str, ids: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Over all users' rows whose `field` (item / author / category index) is ids[i] and whose ts is strictly
        before ts[i]: (number of rows (M,) int64, sum of their completion min(comp, 1) (M,) float64).

        One sorted key per store and field, built on first use: key = id * R + rank(ts) over the R distinct row
        times, so a query is two binary searches (rows of the id, and of those the ones before ts)."""
        cache = self.__dict__.setdefault("_before", {})
        if field not in cache:
            uts = np.unique(self.ts)
            key = getattr(self, field).astype(np.int64) * (len(uts) + 1) + np.searchsorted(uts, self.ts)
            order = np.argsort(key, kind="stable")
            w = np.minimum(self.comp, 1.0) if self.comp is not None else np.ones(len(key))
            cache[field] = (uts, key[order], np.concatenate([[0.0], np.cumsum(w[order], dtype=np.float64)]))
        uts, key, csum = cache[field]
        ids = np.asarray(ids, np.int64)
        if len(uts) and len(ids) and float(np.min(ts)) > uts[-1]:    # after every stored row (serving): the
            if field + "/total" not in cache:                         # id's totals, one gather (same numbers)
                vals = getattr(self, field).astype(np.int64)
                w = np.minimum(self.comp, 1.0) if self.comp is not None else np.ones(len(vals))
                cache[field + "/total"] = (np.bincount(vals).astype(np.int64),
                                           np.bincount(vals, weights=w.astype(np.float64)))
            n, c = cache[field + "/total"]
            ok = (ids >= 0) & (ids < len(n))
            at = np.where(ok, ids, 0)
            return np.where(ok, n[at], 0), np.where(ok, c[at], 0.0)
        base = ids * (len(uts) + 1)
        before = np.searchsorted(uts, np.asarray(ts, np.float64), side="left")    # distinct times < ts
        hi = np.searchsorted(key, base + before, side="left")
        lo = np.searchsorted(key, base, side="left")
        return hi - lo, csum[hi] - csum[lo]


def completion(play_ms: np.ndarray, duration_ms: np.ndarray) -> np.ndarray:
    """play / duration as float32 (a duration below 1 ms counts as 1 ms)."""
    return (np.asarray(play_ms, np.float64) / np.maximum(np.asarray(duration_ms, np.float64), 1.0)).astype(np.float32)


def raw_features(hist: UserHistories, vocab: Vocab) -> RowFeatures:
    """Row features of the raw behaviours (log_n = 0)."""
    c = hist.cols
    item = vocab.item_index(c["item_id"])
    extras = {k: c[k] for k in vocab.extra_cols if k in c}
    return RowFeatures(
        user_ids=hist.user_ids, offsets=hist.offsets, item=item,
        author=vocab.item_author[item], category=vocab.item_category[item],
        dur_bucket=vocab.dur_bucket(c["duration_ms"]),
        cross=vocab.static_cross(c["play_ms"], c["duration_ms"], extras),
        ts=np.asarray(c["ts"], np.float64), log_n=np.zeros(len(item), np.float32),
        comp=completion(c["play_ms"], c["duration_ms"]))


def cluster_features(clusters: pd.DataFrame, vocab: Vocab) -> RowFeatures:
    """Row features of the virtual items of a cluster version: ids copied from the member nearest the
    centroid, cross features from the averaged numeric fields, log_n = ln(size). Rows per user are
    ordered by mean ts (oldest first), so the L most recent are the last L."""
    need = ["user_id", "size", "item_id", "author_id", "category", "duration_ms", "play_ms", "ts"]
    missing = [c for c in need if c not in clusters.columns]
    if missing:
        raise ValueError(f"cluster table lacks columns {missing}; expected the columns of "
                         f"docs/architecture.md (clusters/part-*.parquet)")
    df = clusters.sort_values(["user_id", "ts"], kind="stable")
    uid = df["user_id"].to_numpy(np.int64)
    users, starts = np.unique(uid, return_index=True)
    size = df["size"].to_numpy(np.float64)
    if len(size) and size.min() < 1:
        bad = int(np.argmin(size))
        raise ValueError(f"cluster table row {bad} (user {uid[bad]}): size {size[bad]} < 1; expected >= 1")
    item = vocab.item_index(df["item_id"].to_numpy(np.int64))
    extras = {k: df[k].to_numpy(np.float64) for k in vocab.extra_cols if k in df.columns}
    return RowFeatures(
        user_ids=users, offsets=np.append(starts, len(uid)).astype(np.int64), item=item,
        author=vocab.id_index(df["author_id"].to_numpy(np.int64), "author"),
        category=vocab.id_index(df["category"].to_numpy(np.int64), "category"),
        dur_bucket=vocab.dur_bucket(df["duration_ms"].to_numpy(np.float64)),
        cross=vocab.static_cross(df["play_ms"].to_numpy(np.float64), df["duration_ms"].to_numpy(np.float64), extras,
                                 df["completion"].to_numpy(np.float64) if "completion" in df.columns else None),
        ts=df["ts"].to_numpy(np.float64), log_n=np.log(size).astype(np.float32),
        comp=(df["completion"].to_numpy(np.float32) if "completion" in df.columns else
              completion(df["play_ms"].to_numpy(np.float64), df["duration_ms"].to_numpy(np.float64))),
        cluster_id=df["cluster_id"].to_numpy(np.int64) if "cluster_id" in df.columns else None)


MIX_FIELDS = ("category", "author", "item")


def cluster_mix(clusters: RowFeatures, members: pd.DataFrame, raw: RowFeatures, vocab: Vocab, slots: int,
                watermark: int | None = None) -> dict:
    """Virtual-item mixes (our extension to the paper's nearest-member ids, docs/models.md "virtual_mix"):
    for every cluster row and field f in MIX_FIELDS, the `slots` most frequent ids among its members
    (ties: smaller index first), with each id's member count n and summed member completion c.

    members: the version's behaviour -> cluster map (user_id, ts, item_id, cluster_id). A member's completion
    comes from the raw store: by position when the members are exactly the raw rows with ts < watermark (the
    stored order), else by (user_id, ts, item) (1.0 where no raw row matches).
    -> {f: (ids (N, J) int64, n (N, J) float32, c (N, J) float32)}, zero-padded; N = cluster rows."""
    J = int(slots)
    N = len(clusters.item)
    if J <= 0:
        raise ValueError(f"virtual_mix slots must be >= 1, got {slots}")
    if clusters.cluster_id is None:
        raise ValueError("cluster rows carry no cluster_id: the cluster table lacks a cluster_id column")
    for col in ("user_id", "ts", "item_id", "cluster_id"):
        if col not in members.columns:
            raise ValueError(f"members table lacks {col!r}; expected user_id, ts, item_id, cluster_id")
    mu = members["user_id"].to_numpy(np.int64)
    mts = members["ts"].to_numpy(np.int64)
    mitem = vocab.item_index(members["item_id"].to_numpy(np.int64))                 # (M,) item index
    comp = _member_completion(raw, mu, mts, mitem, watermark)
    # cluster row of each member: key (user, cluster id) -> row of the cluster store
    urow = np.repeat(np.arange(len(clusters.user_ids)), np.diff(clusters.offsets))
    span = int(max(clusters.cluster_id.max(initial=0), members["cluster_id"].max() if len(members) else 0)) + 1
    ckey = clusters.user_ids[urow] * span + clusters.cluster_id
    order = np.argsort(ckey, kind="stable")
    mkey = mu * span + members["cluster_id"].to_numpy(np.int64)
    at = np.clip(np.searchsorted(ckey[order], mkey), 0, max(N - 1, 0))
    found = (ckey[order][at] == mkey) if N else np.zeros(len(mkey), bool)
    if not found.all():
        bad = int(np.flatnonzero(~found)[0])
        raise ValueError(f"members row {bad} (user {mu[bad]}, cluster {members['cluster_id'].iloc[bad]}) has no "
                         f"cluster row; expected every member's (user_id, cluster_id) in the cluster table")
    row = order[at]                                                                  # (M,)
    ids = {"category": vocab.item_category[mitem], "author": vocab.item_author[mitem], "item": mitem}
    return {f: _top_ids(row, ids[f], comp, N, J) for f in MIX_FIELDS}


def _member_completion(raw: RowFeatures, mu, mts, mitem, watermark) -> np.ndarray:
    """(M,) completion of each member, from the raw row it was clustered from."""
    urows = np.repeat(raw.user_ids, np.diff(raw.offsets))
    rts = raw.ts.astype(np.int64)
    comp = raw.comp if raw.comp is not None else np.ones(len(rts), np.float32)
    if watermark is not None:
        keep = rts < int(watermark)
        if (int(keep.sum()) == len(mu) and np.array_equal(urows[keep], mu) and np.array_equal(rts[keep], mts)
                and np.array_equal(raw.item[keep], mitem)):
            return comp[keep].astype(np.float32)
    left = pd.DataFrame({"user_id": mu, "ts": mts, "item": mitem})
    right = pd.DataFrame({"user_id": urows, "ts": rts, "item": raw.item, "c": comp}).drop_duplicates(
        ["user_id", "ts", "item"])
    j = left.merge(right, on=["user_id", "ts", "item"], how="left")         # left merge keeps the left order
    return j["c"].fillna(1.0).to_numpy(np.float32)


def _top_ids(row: np.ndarray, ids: np.ndarray, comp: np.ndarray, N: int, J: int):
    """Per cluster row, the J most frequent ids of its members -> (ids, n, c), each (N, J)."""
    V = int(ids.max(initial=0)) + 1
    key = row.astype(np.int64) * V + ids
    uk, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
    csum = np.bincount(inv, weights=comp, minlength=len(uk))
    r, v = uk // V, uk % V
    o = np.lexsort((v, -cnt, r))                                   # by row, count desc, id asc
    r, v, cnt, csum = r[o], v[o], cnt[o], csum[o]
    first = np.searchsorted(r, r, side="left")
    rank = np.arange(len(r)) - first
    k = rank < J
    out_i = np.zeros((N, J), np.int64)
    out_n = np.zeros((N, J), np.float32)
    out_c = np.zeros((N, J), np.float32)
    out_i[r[k], rank[k]] = v[k]
    out_n[r[k], rank[k]] = cnt[k]
    out_c[r[k], rank[k]] = csum[k]
    return out_i, out_n, out_c


# ---------------------------------------------------------------- samples


@dataclass
class Samples:
    """Impressions addressed into the stores: (user index, position) plus the target and label."""

    user: np.ndarray        # (M,) int64 raw user ids
    uidx: np.ndarray        # (M,) index into the raw store (-1: no history)
    pos: np.ndarray         # (M,) behaviours of the user with ts < sample ts
    cidx: np.ndarray        # (M,) index into the cluster store (-1: none / not used)
    ts: np.ndarray          # (M,) int64
    item: np.ndarray        # (M,) target item index
    item_id: np.ndarray     # (M,) raw target item id
    label: np.ndarray       # (M,) float32
    p_true: np.ndarray      # (M,) float32, NaN where unknown
    # the user's earlier train labels (twinv2.training.feedback; World.samples fills them): n, positives k, and
    # p0 the positive rate of the train labels strictly before each sample. None: not computed (a model reading
    # them raises)
    fb_n: np.ndarray | None = None      # (M,) int64
    fb_k: np.ndarray | None = None      # (M,) float64
    fb_prior: np.ndarray | None = None  # (M,) float64 (Feedback.prior)

    def __len__(self) -> int:
        return len(self.user)


def make_samples(impressions: pd.DataFrame, hist: UserHistories, vocab: Vocab,
                 clusters: RowFeatures | None = None, watermark: int | None = None) -> Samples:
    """Address each impression into the stores. With clusters, every sample must be at or after the
    watermark W (the clusters summarise behaviours before W only): earlier samples would leak."""
    users = impressions["user_id"].to_numpy(np.int64)
    ts = impressions["ts"].to_numpy(np.int64)
    if clusters is not None and watermark is not None and len(ts) and ts.min() < watermark:
        n_bad = int((ts < watermark).sum())
        row = int(np.argmin(ts))
        raise ValueError(
            f"{n_bad} samples have ts before the cluster watermark W={watermark} (first: row {row}, ts "
            f"{ts[row]}); clusters built up to W would leak behaviours after those samples. Expected every "
            f"impression at or after W: cluster with --watermark <= {int(ts.min())} or pick an earlier version")
    uidx, pos = hist.positions(users, ts)
    label = impressions["label"].to_numpy(np.float32)
    p_true = (impressions["p_true"].to_numpy(np.float32, na_value=np.nan) if "p_true" in impressions.columns
              else np.full(len(users), np.nan, np.float32))
    cidx = clusters.index_of(users) if clusters is not None else np.full(len(users), -1, np.int64)
    item_id = impressions["item_id"].to_numpy(np.int64)
    return Samples(users, uidx, pos, cidx, ts, vocab.item_index(item_id), item_id, label, p_true)


# ---------------------------------------------------------------- batch assembly


def _gather(rows: RowFeatures, lo: np.ndarray, hi: np.ndarray, width: int | None, target_ts: np.ndarray,
            vocab: Vocab) -> dict[str, torch.Tensor]:
    """Rows [lo, hi) of each sample, the last `width` of them, left-aligned and padded at the end.

    lo, hi: (B,) global row bounds. width None: as wide as the longest sample in the batch."""
    n = np.maximum(hi - lo, 0)
    if width is None:
        width = max(int(n.max()) if len(n) else 0, 1)
    start = np.maximum(lo, hi - width)                                    # (B,)
    idx = start[:, None] + np.arange(width)[None, :]                     # (B, W)
    mask = idx < hi[:, None]                                              # (B, W)
    safe = np.where(mask, idx, 0) if len(rows.item) else np.zeros_like(idx)
    if len(rows.item) == 0:
        mask = np.zeros_like(mask)

    def take(a: np.ndarray) -> np.ndarray:
        return np.where(mask, a[safe], 0) if len(a) else np.zeros(idx.shape, a.dtype)

    static = rows.cross[safe] if len(rows.item) else np.zeros(idx.shape + (rows.cross.shape[1],), np.int32)
    gap = vocab.gap_bucket(target_ts[:, None] - (rows.ts[safe] if len(rows.item) else 0.0))   # (B, W)
    cross = np.concatenate([static[..., :2], gap[..., None], static[..., 2:]], axis=-1)       # (B, W, J)
    cross = np.where(mask[..., None], cross, 0)
    out = {
        "item": torch.from_numpy(take(rows.item).astype(np.int64)),
        "author": torch.from_numpy(take(rows.author).astype(np.int64)),
        "category": torch.from_numpy(take(rows.category).astype(np.int64)),
        "dur_bucket": torch.from_numpy(take(rows.dur_bucket).astype(np.int64)),
        "cross": torch.from_numpy(cross.astype(np.int64)),
        "mask": torch.from_numpy(mask),
        "log_n": torch.from_numpy(np.where(mask, rows.log_n[safe], 0).astype(np.float32)
                                  if len(rows.item) else np.zeros(idx.shape, np.float32)),
    }
    if rows.comp is not None:
        out["comp"] = torch.from_numpy(np.where(mask, rows.comp[safe], 0).astype(np.float32)
                                       if len(rows.item) else np.zeros(idx.shape, np.float32))
    return out


def _concat(first: dict, second: dict, width: int | None) -> dict:
    """Two left-aligned padded blocks of the same samples -> one left-aligned block: the rows of `first`, then
    those of `second`, keeping the last `width` real rows of the two together (None: all)."""
    n1, n2 = first["mask"].sum(1), second["mask"].sum(1)                           # (B,)
    n = n1 + n2
    W = int(n.max()) if width is None else int(width)
    W = max(W, 1)
    drop = (n - W).clamp_min(0)                                                    # oldest rows beyond the budget
    j = torch.arange(W).unsqueeze(0) + drop.unsqueeze(1)                           # (B, W) position in the merge
    mask = j < n.unsqueeze(1)
    in1 = j < n1.unsqueeze(1)
    j1 = j.clamp(max=first["mask"].shape[1] - 1)
    j2 = (j - n1.unsqueeze(1)).clamp(0, second["mask"].shape[1] - 1)
    out = {}
    for key, a in first.items():
        b = second[key]
        idx1 = j1.reshape(j1.shape + (1,) * (a.dim() - 2)).expand(j1.shape + a.shape[2:])
        idx2 = j2.reshape(j2.shape + (1,) * (b.dim() - 2)).expand(j2.shape + b.shape[2:])
        m = in1.reshape(in1.shape + (1,) * (a.dim() - 2))
        keep = mask.reshape(mask.shape + (1,) * (a.dim() - 2))
        x = torch.where(m, torch.gather(a, 1, idx1), torch.gather(b, 1, idx2))
        out[key] = torch.where(keep, x, torch.zeros((), dtype=x.dtype))
    out["mask"] = mask
    return out


def _bounds(rows: RowFeatures, uidx: np.ndarray, pos: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Global row bounds [lo, hi) of each sample's history (pos None: all the user's rows)."""
    ok = uidx >= 0
    u = np.where(ok, uidx, 0)
    if len(rows.offsets) < 2:
        z = np.zeros(len(uidx), np.int64)
        return z, z
    lo = rows.offsets[u]
    hi = rows.offsets[u + 1] if pos is None else lo + pos
    return np.where(ok, lo, 0), np.where(ok, hi, 0)


class SampleSet(torch.utils.data.Dataset):
    """Batches of samples, materialised on the fly. Index it with a list of sample indices (use it
    with `batch_size=None` and a batch sampler, see `loader`); nothing is copied per sample."""

    def __init__(self, samples: Samples, raw: RowFeatures, vocab: Vocab, long_source: str,
                 long_len: int | None, short_len: int, clusters: RowFeatures | None = None,
                 watermark: int | None = None, watermark_gap: bool = False, mix_slots: int = 0):
        if long_source not in ("raw", "clusters", "none"):
            raise ValueError(f"long_source must be raw, clusters or none, got {long_source!r}")
        if long_source == "clusters" and clusters is None:
            raise ValueError("long_source 'clusters' needs a cluster version: run `twinv2 cluster --data DIR` first")
        self.samples, self.raw, self.vocab = samples, raw, vocab
        self.long_source, self.short_len, self.clusters = long_source, int(short_len), clusters
        self.long_len = None if (long_len is None or int(long_len) <= 0) else int(long_len)
        # virtual_mix: the long part's match counts read every cluster's id mix, over the whole life cycle
        self.mix_slots = int(mix_slots) if long_source == "clusters" else 0
        self.life = None
        if self.mix_slots:
            if clusters.mix is None:
                raise ValueError("virtual_mix > 0 needs the cluster store's mixes (World.dataset attaches them)")
            self.life = LifeCounts(clusters)
        # watermark_gap: the raw behaviours in [W, ts) follow the clusters in the long sequence as clusters of
        # size 1 (ln n = 0), so a sample reads its whole life cycle up to ts, not only up to W.
        self.gap_pos = None
        if long_source == "clusters" and watermark_gap and watermark is not None:
            self.gap_pos = raw.positions_before(int(watermark))                   # (U,) rows of u with ts < W
        # the batch path: twinv2.training.fastbatch (one gather per field group from a packed row table), or
        # reference_batch (False); the same tensors (tests/training/test_fast_input.py)
        self.fast = True

    bounds = staticmethod(_bounds)      # for twinv2.training.fastbatch, which does not import this module
    mix_fields = MIX_FIELDS

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index) -> dict:
        if self.fast:
            return fast_batch(self, np.atleast_1d(np.asarray(index, dtype=np.int64)))
        return self.reference_batch(index)

    def reference_batch(self, index) -> dict:
        """The batch of samples `index`, assembled store by store (`_gather`, `_concat`): the reference the fast
        path (twinv2.training.fastbatch, the default) is tested equal to."""
        i = np.atleast_1d(np.asarray(index, dtype=np.int64))
        s, v = self.samples, self.vocab
        ts = s.ts[i].astype(np.float64)
        batch = {"target": self.targets(i), "label": torch.from_numpy(s.label[i]), "user": torch.from_numpy(s.user[i])}
        lo, hi = _bounds(self.raw, s.uidx[i], s.pos[i])
        batch["short"] = _gather(self.raw, lo, hi, self.short_len, ts, v)
        if self.long_source == "raw":
            batch["long"] = _gather(self.raw, lo, hi, self.long_len, ts, v)
        elif self.long_source == "clusters":
            clo, chi = _bounds(self.clusters, s.cidx[i], None)
            if self.gap_pos is None:
                batch["long"] = _gather(self.clusters, clo, chi, self.long_len, ts, v)
            else:
                glo, _ = self.gap_bounds(i)                                        # rows in [W, ts)
                batch["long"] = _concat(_gather(self.clusters, clo, chi, self.long_len, ts, v),
                                        _gather(self.raw, glo, hi, self.long_len, ts, v), self.long_len)
            if self.life is not None:
                batch["life"] = self.life_counts(i)
        else:   # no long part: an all-padding sequence of length 1 keeps the dict shape uniform
            z = np.zeros(len(i), np.int64)
            batch["long"] = _gather(self.raw, z, z, 1, ts, v)
        return batch


    def targets(self, i: np.ndarray) -> dict:
        """The target part of a batch: item-inherent feature indices of samples i -> dict of (B,) tensors."""
        v, item = self.vocab, self.samples.item[i]
        ts = self.samples.ts[i]
        views, vcomp = self.raw.counts_before("item", item, ts)                     # leakage rule: before ts
        author = v.item_author[item]
        aviews, acomp = self.raw.counts_before("author", author, ts)
        pop = np.clip(np.floor(np.log2(1.0 + views)), 0, int(v.features.get("pop_log2_max", 20))).astype(np.int64) + 1
        # target_stats: ln(1 + views), mean completion of the views (0 if none), the same for the author
        stats = np.stack([np.log1p(views), vcomp / np.maximum(views, 1), np.log1p(aviews),
                          acomp / np.maximum(aviews, 1)], axis=1).astype(np.float32)          # (B, 4)
        out = {"item": torch.from_numpy(item), "author": torch.from_numpy(author),
               "category": torch.from_numpy(v.item_category[item]),
               "dur_bucket": torch.from_numpy(v.dur_bucket(v.item_duration_ms[item]).astype(np.int64)),
               "pop": torch.from_numpy(pop), "stats": torch.from_numpy(stats)}
        s = self.samples
        if s.fb_n is not None:      # user_feedback: ln(1 + n), (k + p0) / (n + 1) of the user's earlier train labels
            from twinv2.training.feedback import head_features

            out["feedback"] = torch.from_numpy(head_features(s.fb_n[i], s.fb_k[i], s.fb_prior[i]))
        return out


    def gap_bounds(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw rows [W, ts) of samples i (global bounds; empty without the watermark-gap rows)."""
        s = self.samples
        _, hi = _bounds(self.raw, s.uidx[i], s.pos[i])
        if self.gap_pos is None:
            return hi, hi
        u = np.maximum(s.uidx[i], 0)
        glo = np.where(s.uidx[i] >= 0, self.raw.offsets[u] + self.gap_pos[u], 0)
        return np.minimum(glo, hi), hi

    def life_counts(self, i: np.ndarray) -> torch.Tensor:
        """virtual_mix: the match counts (base.match_counts' 4F + 2 numbers, F = MIX_FIELDS) of samples i over
        their whole life cycle up to ts: every cluster of the user (its id mix) plus the gap rows [W, ts)."""
        s, v = self.samples, self.vocab
        item = s.item[i]
        target = {"item": item, "author": v.item_author[item], "category": v.item_category[item]}
        glo, ghi = self.gap_bounds(i)
        return torch.from_numpy(self.life.features(s.cidx[i], target, self.raw, glo, ghi))


class LifeCounts:
    """Per (user, field, id) sums over ALL of a user's clusters of the virtual-item mixes (member counts n and
    summed completion c), as sorted keys: a sample's life-cycle match counts are one binary search per field,
    whatever the number of clusters, plus its gap rows read from the raw store."""

    def __init__(self, clusters: RowFeatures):
        U = len(clusters.user_ids)
        urow = np.repeat(np.arange(U, dtype=np.int64), np.diff(clusters.offsets))              # (N,)
        size = np.exp(clusters.log_n.astype(np.float64))
        comp = clusters.comp.astype(np.float64) if clusters.comp is not None else np.ones(len(size))
        self.N = np.bincount(urow, weights=size, minlength=U)                                   # (U,) members
        self.P = np.bincount(urow, weights=size * comp, minlength=U)                            # (U,) completion
        self.tables = {}
        for f in MIX_FIELDS:
            ids, n, c = clusters.mix[f]                                                          # (N, J)
            keep = n > 0
            V = int(ids.max(initial=0)) + 2
            key = (urow[:, None] * V + ids)[keep]
            uk, inv = np.unique(key, return_inverse=True)
            self.tables[f] = (V, uk, np.bincount(inv, weights=n[keep].astype(np.float64), minlength=len(uk)),
                              np.bincount(inv, weights=c[keep].astype(np.float64), minlength=len(uk)))

    def lookup(self, f: str, cidx: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        V, uk, n, c = self.tables[f]
        ok = (cidx >= 0) & (ids < V) & (len(uk) > 0)
        key = np.where(ok, cidx, 0) * V + np.where(ok, ids, 0)
        at = np.clip(np.searchsorted(uk, key), 0, max(len(uk) - 1, 0))
        hit = ok & (uk[at] == key) if len(uk) else np.zeros(len(key), bool)
        return np.where(hit, n[at] if len(uk) else 0.0, 0.0), np.where(hit, c[at] if len(uk) else 0.0, 0.0)

    def features(self, cidx: np.ndarray, target: dict, raw: RowFeatures, glo: np.ndarray,
                 ghi: np.ndarray) -> np.ndarray:
        """(B, 4F + 2) float32, the formula of base.match_counts over clusters + gap rows [glo, ghi)."""
        B = len(cidx)
        ok = cidx >= 0
        u = np.where(ok, cidx, 0)
        N = np.where(ok, self.N[u] if len(self.N) else 0.0, 0.0)
        P = np.where(ok, self.P[u] if len(self.P) else 0.0, 0.0)
        width = int(max((ghi - glo).max(initial=0), 1))
        idx = glo[:, None] + np.arange(width)[None, :]                                          # (B, w)
        m = idx < ghi[:, None]
        safe = np.where(m, idx, 0) if len(raw.item) else np.zeros_like(idx)
        if not len(raw.item):
            m = np.zeros_like(m)
        gc = np.where(m, raw.comp[safe], 0.0) if raw.comp is not None and len(raw.item) else m.astype(np.float64)
        N = N + m.sum(1)
        P = P + gc.sum(1)
        C, D = np.zeros((B, len(MIX_FIELDS))), np.zeros((B, len(MIX_FIELDS)))
        for k, f in enumerate(MIX_FIELDS):
            n, c = self.lookup(f, cidx, target[f])
            hit = m & (getattr(raw, f)[safe] == target[f][:, None]) if len(raw.item) else m
            C[:, k] = n + hit.sum(1)
            D[:, k] = c + np.where(hit, gc, 0.0).sum(1)
        out = [np.log1p(C), C / np.maximum(N, 1e-6)[:, None], np.log1p(D), D / np.maximum(P, 1e-6)[:, None],
               np.log1p(N)[:, None], (P / np.maximum(N, 1.0))[:, None]]
        return np.concatenate(out, axis=1).astype(np.float32)


class BatchOrder(torch.utils.data.Sampler):
    """Deterministic batches: a permutation seeded by (seed, epoch), cut into batches; under DDP each
    rank takes every world-th batch (all ranks get the same number of batches)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1):
        self.n, self.bs, self.shuffle, self.seed = n, int(batch_size), shuffle, int(seed)
        self.rank, self.world, self.epoch = rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[np.ndarray]:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        return [order[k:k + self.bs] for k in range(0, self.n, self.bs)]

    def __iter__(self):
        b = self._batches()
        if self.world > 1:
            keep = len(b) // self.world * self.world if self.shuffle else len(b)
            b = b[self.rank:keep:self.world]
        return iter([x.tolist() for x in b])

    def __len__(self) -> int:
        nb = (self.n + self.bs - 1) // self.bs
        if self.world > 1:
            return (nb // self.world) if self.shuffle else len(range(self.rank, nb, self.world))
        return nb


def loader(dataset: SampleSet, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
           rank: int = 0, world: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader whose workers each build whole batches (batch_size=None + a batch sampler)."""
    order = BatchOrder(len(dataset), batch_size, shuffle, seed, rank, world)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=order, num_workers=int(num_workers),
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None)


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Move a (nested) batch dict to a device."""
    return {k: (to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True))
            for k, v in batch.items()}
