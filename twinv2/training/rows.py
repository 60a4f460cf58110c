"""Per-row feature stores (CSR by user) of the raw behaviours and of the clusters, precomputed once: the
arrays a batch gathers from (twinv2.training.samples, fastbatch), the clusters' virtual-item id mixes and the
whole-life match counts over them (LifeCounts).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from twinv2.data.store import UserHistories
from twinv2.training.vocab import Vocab

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
        if B > 1 and (cidx == cidx[0]).all() and (glo == glo[0]).all() and (ghi == ghi[0]).all():
            return self._one_user(int(cidx[0]), target, raw, int(glo[0]), int(ghi[0]))
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
        return self._formula(C, D, N, P)

    @staticmethod
    def _formula(C: np.ndarray, D: np.ndarray, N, P) -> np.ndarray:
        """Counts C, completion sums D (B, F) and the totals N, P ((B,) or scalars) -> (B, 4F + 2) float32."""
        B = len(C)
        N, P = np.broadcast_to(np.asarray(N, np.float64), (B,)), np.broadcast_to(np.asarray(P, np.float64), (B,))
        out = [np.log1p(C), C / np.maximum(N, 1e-6)[:, None], np.log1p(D), D / np.maximum(P, 1e-6)[:, None],
               np.log1p(N)[:, None], (P / np.maximum(N, 1.0))[:, None]]
        return np.concatenate(out, axis=1).astype(np.float32)

    def _one_user(self, c: int, target: dict, raw: RowFeatures, glo: int, ghi: int) -> np.ndarray:
        """features() of B candidates of ONE (user, ts) (serving, and each group of the batch path): the user's
        keys are one contiguous run of each sorted table and its gap rows are shared, so every candidate is a
        binary search in the user's few ids instead of a search of all users' keys and a (B, gap) table."""
        B = len(target["item"])
        ok = c >= 0
        N = float(self.N[c]) if ok and len(self.N) else 0.0
        P = float(self.P[c]) if ok and len(self.P) else 0.0
        rows = slice(glo, ghi) if len(raw.item) else slice(0, 0)
        gc = raw.comp[rows].astype(np.float64) if raw.comp is not None else np.ones(ghi - glo if len(raw.item) else 0)
        N, P = N + len(gc), P + gc.sum()
        C, D = np.zeros((B, len(MIX_FIELDS))), np.zeros((B, len(MIX_FIELDS)))
        for k, f in enumerate(MIX_FIELDS):
            t = np.asarray(target[f], np.int64)
            V, uk, n, cs = self.tables[f]
            if ok and len(uk):                              # the user's (id, n, c) of every cluster, ids sorted
                lo, hi = np.searchsorted(uk, [c * V, (c + 1) * V])
                ids, n_u, c_u = uk[lo:hi] - c * V, n[lo:hi], cs[lo:hi]
                at = np.clip(np.searchsorted(ids, t), 0, max(len(ids) - 1, 0))
                hit = ids[at] == t if len(ids) else np.zeros(B, bool)
                C[:, k] = np.where(hit, n_u[at] if len(ids) else 0.0, 0.0)
                D[:, k] = np.where(hit, c_u[at] if len(ids) else 0.0, 0.0)
            if len(gc):                                     # the gap rows: count and completion per id
                g_ids, inv = np.unique(getattr(raw, f)[rows], return_inverse=True)
                g_n = np.bincount(inv, minlength=len(g_ids)).astype(np.float64)
                g_c = np.bincount(inv, weights=gc, minlength=len(g_ids))
                at = np.clip(np.searchsorted(g_ids, t), 0, len(g_ids) - 1)
                hit = g_ids[at] == t
                C[:, k] += np.where(hit, g_n[at], 0.0)
                D[:, k] += np.where(hit, g_c[at], 0.0)
        return self._formula(C, D, N, P)
