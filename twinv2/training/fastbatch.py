"""The fast batch path of SampleSet (issue 29): the same batch dict as the reference assembly
(`SampleSet.reference_batch`: `_gather` per store, `_concat` of the clusters and the watermark-gap rows), built
with one gather per field group from a packed row table.

    PackedRows([raw, clusters])     the stores' rows one after another, plus one all-zero padding row:
        ids   (4, N + 1) int64      item, author, category, dur_bucket (column-major: each field's gather is
                                    one contiguous (B, W) block)
        cross (N + 1, J) int64      the static cross buckets with the time-gap slot (column 2) left 0
        flt   (2, N + 1) float32    log_n, comp
        ts    (N + 1,) float64

A sequence is at most two row ranges per sample (the clusters, then the raw rows [W, ts) under
model.watermark_gap; or one raw range), of which the last `width` rows are kept, left-aligned; a padded
position points to the padding row, so no per-field masking is needed. Only the time-gap bucket is computed per
(sample, position) (it depends on the target's ts). The whole-life counts (model.virtual_mix) read the gap
rows through per-field sorted keys and prefix sums (`GapCounts`) instead of a (B, gap rows) block.

Equality with the reference path is tested in tests/training/test_fast_input.py (every key and dtype, integer
fields exactly, float fields within float32 rounding).
"""
from __future__ import annotations

import numpy as np
import torch

ID_FIELDS = ("item", "author", "category", "dur_bucket")


class PackedRows:
    """The rows of one or more RowFeatures stores in one table (store k's rows start at base[k]), plus a
    zero padding row at index `pad`."""

    def __init__(self, stores: list):
        sizes = [len(s.item) for s in stores]
        self.base = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)[:-1]
        n = int(sum(sizes))
        self.pad = n
        J1 = stores[0].cross.shape[1]
        if any(s.cross.shape[1] != J1 for s in stores):
            raise ValueError("the stores' static cross features differ in width; expected one vocabulary")
        self.has_comp = all(s.comp is not None for s in stores)
        self.ids = np.zeros((len(ID_FIELDS), n + 1), np.int64)
        self.cross = np.zeros((n + 1, J1 + 1), np.int64)
        self.flt = np.zeros((2, n + 1), np.float32)
        self.ts = np.zeros(n + 1, np.float64)
        for s, b, m in zip(stores, self.base, sizes):
            for k, f in enumerate(ID_FIELDS):
                self.ids[k, b:b + m] = getattr(s, f)
            c = s.cross
            self.cross[b:b + m, :2] = c[:, :2]
            self.cross[b:b + m, 3:] = c[:, 2:]
            self.flt[0, b:b + m] = s.log_n
            if self.has_comp:
                self.flt[1, b:b + m] = s.comp
            self.ts[b:b + m] = s.ts

    def sequence(self, a_lo, a_hi, b_lo, b_hi, width: int | None, target_ts: np.ndarray, vocab) -> dict:
        """The rows [a_lo, a_hi) then [b_lo, b_hi) (packed indices) of each sample, the last `width` of them,
        left-aligned, padded at the end (width None: the longest sample's, at least 1)."""
        n1 = np.maximum(a_hi - a_lo, 0)
        n2 = np.maximum(b_hi - b_lo, 0)
        n = n1 + n2
        W = max(int(n.max()) if len(n) else 0, 1) if width is None else int(width)
        drop = np.maximum(n - W, 0)                                                  # oldest rows beyond W
        k = np.arange(W, dtype=np.int64)[None, :]
        mask = k < (n - drop)[:, None]                                               # (B, W)
        idx = (a_lo + drop)[:, None] + k                                             # part 1: a_lo + drop + k
        if n2.any():                                                                 # part 2 past its n1 - drop rows
            idx += (k >= (n1 - drop)[:, None]) * (b_lo - n1 - a_lo)[:, None]
        np.copyto(idx, self.pad, where=~mask)
        ids = np.take(self.ids, idx, axis=1)                                         # (4, B, W)
        cross = np.take(self.cross, idx, axis=0)                                     # (B, W, J)
        gap = vocab.gap_bucket(target_ts[:, None] - np.take(self.ts, idx))           # (B, W)
        gap[~mask] = 0
        cross[..., 2] = gap
        flt = np.take(self.flt, idx, axis=1)                                         # (2, B, W)
        out = {f: torch.from_numpy(ids[k]) for k, f in enumerate(ID_FIELDS)}
        out.update(cross=torch.from_numpy(cross), mask=torch.from_numpy(mask), log_n=torch.from_numpy(flt[0]))
        if self.has_comp:
            out["comp"] = torch.from_numpy(flt[1])
        return out


class GapCounts:
    """Per field of MIX_FIELDS, the raw rows sorted by (id, global row): the rows of id x inside a row range
    [lo, hi) are one contiguous run found by two binary searches, and their summed completion a prefix-sum
    difference. Replaces LifeCounts.features' (B, gap rows) block."""

    def __init__(self, raw, fields):
        N = len(raw.item)
        self.N = N + 1
        comp = raw.comp.astype(np.float64) if raw.comp is not None else np.ones(N)
        self.comp_cum = np.concatenate([[0.0], np.cumsum(comp)])
        self.keys = {}
        for f in fields:
            key = getattr(raw, f).astype(np.int64) * self.N + np.arange(N, dtype=np.int64)
            order = np.argsort(key, kind="stable")
            self.keys[f] = (key[order], np.concatenate([[0.0], np.cumsum(comp[order])]))

    def range_sums(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, summed completion) of each range [lo, hi)."""
        n = np.maximum(hi - lo, 0)
        return n, np.where(n > 0, self.comp_cum[np.maximum(hi, lo)] - self.comp_cum[lo], 0.0)

    def matches(self, f: str, ids: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, summed completion) of the rows in [lo, hi) whose field f equals ids[i]."""
        key, cum = self.keys[f]
        base = np.asarray(ids, np.int64) * self.N
        a = np.searchsorted(key, base + lo, side="left")
        b = np.searchsorted(key, base + np.maximum(hi, lo), side="left")
        return b - a, cum[b] - cum[a]


def life_features(life, gaps: GapCounts, cidx: np.ndarray, target: dict, glo: np.ndarray,
                  ghi: np.ndarray, fields) -> np.ndarray:
    """LifeCounts.features (base.match_counts over every cluster + the gap rows [glo, ghi)) from range sums."""
    B = len(cidx)
    ok = cidx >= 0
    u = np.where(ok, cidx, 0)
    N = np.where(ok, life.N[u] if len(life.N) else 0.0, 0.0)
    P = np.where(ok, life.P[u] if len(life.P) else 0.0, 0.0)
    gn, gc = gaps.range_sums(glo, ghi)
    N = N + gn
    P = P + gc
    C, D = np.zeros((B, len(fields))), np.zeros((B, len(fields)))
    for k, f in enumerate(fields):
        n, c = life.lookup(f, cidx, target[f])
        hn, hc = gaps.matches(f, target[f], glo, ghi)
        C[:, k] = n + hn
        D[:, k] = c + hc
    out = [np.log1p(C), C / np.maximum(N, 1e-6)[:, None], np.log1p(D), D / np.maximum(P, 1e-6)[:, None],
           np.log1p(N)[:, None], (P / np.maximum(N, 1.0))[:, None]]
    return np.concatenate(out, axis=1).astype(np.float32)


def packed_for(ds) -> PackedRows:
    """The packed table of a SampleSet's stores (raw, then its clusters), built once and cached on the raw
    store (the train and valid sets of a world share it)."""
    cache = ds.raw.__dict__.setdefault("_packed", [])
    for clusters, packed in cache:
        if clusters is ds.clusters:
            return packed
    stores = [ds.raw] + ([ds.clusters] if ds.clusters is not None else [])
    packed = PackedRows(stores)
    cache.append((ds.clusters, packed))
    return packed


def gaps_for(ds, fields) -> GapCounts:
    cache = ds.raw.__dict__.setdefault("_gapcounts", {})
    if fields not in cache:
        cache[fields] = GapCounts(ds.raw, fields)
    return cache[fields]


def per_sample(ds, chunk: int = 65536) -> dict:
    """The head inputs that depend on the sample alone, for every sample of `ds` (its SampleSet), computed once
    (in chunks of `chunk` samples) and cached on the set for its current `samples`: pop (M,) int64 and stats
    (M, 4) float32 (SampleSet.target_counts), life (M, 4F + 2) float32 (life_features) under model.virtual_mix.
    The formulas are row-wise, so a batch's rows equal what the per-batch path computes."""
    cached = ds.__dict__.get("_per_sample")
    if cached is not None and cached[0] is ds.samples:
        return cached[1]
    n = len(ds.samples)
    out = {"pop": np.zeros(n, np.int64), "stats": np.zeros((n, 4), np.float32)}
    for a in range(0, n, chunk):
        i = np.arange(a, min(n, a + chunk))
        out["pop"][i], out["stats"][i] = ds.target_counts(i)
        if ds.life is not None:
            life = _life(ds, i)
            out.setdefault("life", np.zeros((n, life.shape[1]), np.float32))[i] = life
    ds.__dict__["_per_sample"] = (ds.samples, out)
    return out


def _life(ds, i: np.ndarray) -> np.ndarray:
    cidx, target, glo, ghi = ds.life_query(i)
    return life_features(ds.life, gaps_for(ds, ds.mix_fields), cidx, target, glo, ghi, ds.mix_fields)


def fast_batch(ds, i: np.ndarray) -> dict:
    """SampleSet.__getitem__ on the packed table (the reference: SampleSet.reference_batch)."""
    _bounds = ds.bounds          # samples.py's helper, reached through the set (no import cycle)
    P = packed_for(ds)
    if not P.has_comp:                       # a store without completion: the reference path handles its keys
        return ds.reference_batch(i)
    s, v = ds.samples, ds.vocab
    ts = s.ts[i].astype(np.float64)
    pre = per_sample(ds) if getattr(ds, "per_sample", False) else None
    counts = None if pre is None else (pre["pop"][i], pre["stats"][i])
    batch = {"target": ds.targets(i, counts), "label": torch.from_numpy(s.label[i]),
             "user": torch.from_numpy(s.user[i])}
    lo, hi = _bounds(ds.raw, s.uidx[i], s.pos[i])
    z = np.zeros(len(i), np.int64)
    batch["short"] = P.sequence(lo, hi, z, z, ds.short_len, ts, v)
    if ds.long_source == "raw":
        batch["long"] = P.sequence(lo, hi, z, z, ds.long_len, ts, v)
    elif ds.long_source == "clusters":
        clo, chi = _bounds(ds.clusters, s.cidx[i], None)
        cb = P.base[1]
        if ds.gap_pos is None:
            batch["long"] = P.sequence(clo + cb, chi + cb, z, z, ds.long_len, ts, v)
        else:
            glo, _ = ds.gap_bounds(i)                                              # raw rows [W, ts)
            batch["long"] = P.sequence(clo + cb, chi + cb, glo, hi, ds.long_len, ts, v)
        if ds.life is not None:
            batch["life"] = torch.from_numpy(pre["life"][i] if pre is not None else _life(ds, i))
    else:
        batch["long"] = P.sequence(z, z, z, z, 1, ts, v)
    return batch
