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
The vocabulary is twinv2.training.vocab, the per-row stores twinv2.training.rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from twinv2.data.store import UserHistories
from twinv2.training.fastbatch import fast_batch
# the vocabulary and the row stores live in their own modules; their names stay importable from here
from twinv2.training.rows import (MIX_FIELDS, LifeCounts, RowFeatures, cluster_features, cluster_mix,  # noqa: F401
                                  completion, raw_features)
from twinv2.training.vocab import DEFAULT_FEATURES, Vocab, extra_cross_columns  # noqa: F401


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
        # reference_batch (False); the same tensors, the life counts' completion shares to one float32 ulp (prefix-
        # sum differences vs direct sums; tests/training/test_fast_input.py)
        self.fast = True
        # fast path only: the per-sample head inputs (the target's counts before ts, the whole-life match counts)
        # computed once for every sample and gathered per batch (fastbatch.per_sample), for a set read many times
        # (training.loop.fit turns it on for its train and valid sets); off: computed per batch (same numbers)
        self.per_sample = False

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


    def target_counts(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The target's views before ts of samples i: its log2 popularity bucket (B,) int64 and target_stats
        (B, 4) float32: ln(1 + views), mean completion of the views (0 if none), the same for its author."""
        v, item = self.vocab, self.samples.item[i]
        ts = self.samples.ts[i]
        views, vcomp = self.raw.counts_before("item", item, ts)                     # leakage rule: before ts
        aviews, acomp = self.raw.counts_before("author", v.item_author[item], ts)
        pop = np.clip(np.floor(np.log2(1.0 + views)), 0, int(v.features.get("pop_log2_max", 20))).astype(np.int64) + 1
        stats = np.stack([np.log1p(views), vcomp / np.maximum(views, 1), np.log1p(aviews),
                          acomp / np.maximum(aviews, 1)], axis=1).astype(np.float32)          # (B, 4)
        return pop, stats

    def targets(self, i: np.ndarray, counts: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
        """The target part of a batch: item-inherent feature indices of samples i -> dict of (B,) tensors;
        `counts`: target_counts(i) when already at hand."""
        v, item = self.vocab, self.samples.item[i]
        author = v.item_author[item]
        pop, stats = self.target_counts(i) if counts is None else counts
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
        cidx, target, glo, ghi = self.life_query(i)
        return torch.from_numpy(self.life.features(cidx, target, self.raw, glo, ghi))

    def life_query(self, i: np.ndarray) -> tuple[np.ndarray, dict, np.ndarray, np.ndarray]:
        """What the whole-life counts of samples i read: cluster-store index (B,), the target's ids of every
        MIX_FIELDS field (dict of (B,)), the gap rows [glo, ghi) (raw rows in [W, ts))."""
        s, v = self.samples, self.vocab
        item = s.item[i]
        target = {"item": item, "author": v.item_author[item], "category": v.item_category[item]}
        glo, ghi = self.gap_bounds(i)
        return s.cidx[i], target, glo, ghi


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
