"""Scoring with a trained run: (user, candidate items[, ts]) -> probability, read from the stored history
and clusters of the dataset. Used by evaluation (test split, diversity pools) and by the MLflow model.

    s = RunScorer(RUNDIR)                    # data: the directory the run was trained on, unless given
    p = s.score_user(user, items, ts)        # one user against many candidates (the serving path)
    p = s.score_many(users, items, ts)       # many users' candidates, grouped by (user, ts) (the batch path)
    p = s.score_frame(df)                    # a request DataFrame (user_id, item_id[, ts]): one of the two
    p = s.predict_frame(df)["prob"]          # the reference: every row as a training sample (row by row)

The fast paths (score_user, score_many) build what depends on the user only once per (user, ts) group: the
user's short and long sequences (one SampleSet row), the stores' addressing and the user's label counts;
what depends on the candidate (target features, life-cycle counts) is built for all candidates at once.
The sequences are broadcast over the group's candidates (stride 0), so TWIN / TWIN-V2 project them once
(TwinAttention.gsu_esu_shared / attend) and nothing is copied per candidate. The SampleSet of the model
(and its life-cycle count tables) is built once per scorer, not per request; input checks run once on the
user's row, not on the broadcast batch; the forward runs under torch.inference_mode. Same scores as
predict_frame on the same rows within fp32 tolerance (tests/training/test_scoring.py).
"""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from twinv2.io import read_json
from twinv2.training.checkpoint import load_checkpoint
from twinv2.training.loop import autocast, predict, probability
from twinv2.training.samples import Samples, Vocab, loader, to_device
from twinv2.training.world import World, load_world


def load_run_model(run: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, config, vocab) of a run directory (a gbdt run: its GBDTModel)."""
    from twinv2.models import build_model

    run = Path(run)
    for f in ("config.json", "vocab.npz", "model.pt"):
        if not (run / f).exists():
            raise FileNotFoundError(f"{run / f} not found: expected a run directory written by `twinv2 train`")
    config = read_json(run / "config.json")
    vocab = Vocab.load(run / "vocab.npz")
    if config.get("model") == "gbdt":          # boosted trees (arrays in model.pt), scored on the CPU
        from twinv2.models.gbdt import FEATURE_NAMES, GBDTModel

        return GBDTModel.from_state(load_checkpoint(run / "model.pt"), config.get("feature_names", FEATURE_NAMES)), \
            config, vocab
    model = build_model(config["model"], vocab.sizes(), config["params"])
    model.load_state_dict(load_checkpoint(run / "model.pt"))
    return model.to(device).eval(), config, vocab


class RunScorer:
    def __init__(self, run: str | Path, data: str | Path | None = None, world: World | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 1024):
        self.model, self.config, vocab = load_run_model(run, device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.world = world or load_world(data or self.config["data"], need_clusters=self.model.long_source == "clusters",
                                         cluster_version=self.config.get("cluster_version"), vocab=vocab)
        self._template = None              # the model's SampleSet, built on the first fast call
        self._lock = threading.Lock()

    def default_ts(self) -> int:
        end = self.world.meta.get("end_ms")
        if end is not None:
            return int(end)
        ts = self.world.hist.cols["ts"]
        return int(ts.max()) + 1 if len(ts) else 0

    # ------------------------------------------------------------------ reference path
    def predict_frame(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Scores of the rows of df (user_id, item_id[, ts][, label]) in row order, every row a training
        sample (World.samples -> SampleSet -> loop.predict): the reference path."""
        df = df.reset_index(drop=True).copy()
        if "ts" not in df.columns:
            df["ts"] = self.default_ts()
        if "label" not in df.columns:
            df["label"] = 0
        s = self.world.samples(None, df)
        if not isinstance(self.model, torch.nn.Module):      # gbdt: features of the samples, then the trees
            return self.model.predict_samples(self.world, s)
        return predict(self.model, loader(self.world.dataset(s, self.model), self.batch_size, shuffle=False),
                       self.device)

    # ------------------------------------------------------------------ fast paths
    def _dataset(self, samples: Samples):
        """The model's SampleSet over `samples`: a shallow copy of one built once (its stores, life-cycle count
        tables and watermark positions are shared; World.dataset would rebuild them on every call)."""
        if self._template is None:
            with self._lock:
                if self._template is None:
                    self._template = self.world.dataset(samples, self.model)
                    return self._template
        ds = copy.copy(self._template)
        ds.samples = samples
        return ds

    def _samples(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray) -> Samples:
        """Samples of (users[i], items[i], ts[i]) without a DataFrame: World.samples' addressing and label
        counts (the same arrays; tested through predict_frame)."""
        w = self.world
        if w.clusters is not None and w.watermark is not None and len(ts) and ts.min() < w.watermark:
            row = int(np.argmin(ts))
            raise ValueError(
                f"{int((ts < w.watermark).sum())} samples have ts before the cluster watermark W={w.watermark} "
                f"(first: row {row}, ts {ts[row]}); clusters built up to W would leak behaviours after those "
                f"samples. Expected every request at or after W")
        uidx, pos = w.hist.positions(users, ts)
        cidx = w.clusters.index_of(users) if w.clusters is not None else np.full(len(users), -1, np.int64)
        n = len(users)
        s = Samples(users, uidx, pos, cidx, ts, w.vocab.item_index(items), items, np.zeros(n, np.float32),
                    np.full(n, np.nan, np.float32))
        fb = w.feedback()
        s.fb_n, s.fb_k = self._feedback_counts(fb, users, ts)
        s.fb_prior = fb.prior(ts) if callable(fb.prior) else fb.prior
        return s

    def _feedback_counts(self, fb, users: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feedback.counts(users, ts) (n, k of the user's train labels with ts' < t) with its sorted key built
        once per scorer, not per request: the same formula on the same key."""
        if getattr(self, "_fb_key", (None,))[0] is not fb:
            uu, tt = np.unique(fb.user), np.unique(fb.ts)
            self._fb_key = (fb, uu, tt, np.searchsorted(uu, fb.user) * (len(tt) + 1) + np.searchsorted(tt, fb.ts))
        _, uu, tt, key = self._fb_key
        if not len(fb.user):
            return np.zeros(len(users), np.int64), np.zeros(len(users), np.float64)
        r_q = np.searchsorted(uu, users)
        known = (r_q < len(uu)) & (uu[np.minimum(r_q, len(uu) - 1)] == users)
        base = r_q * (len(tt) + 1)
        lo = np.searchsorted(key, base, side="left")
        hi = np.searchsorted(key, base + np.searchsorted(tt, ts, side="left"), side="left")
        return np.where(known, hi - lo, 0).astype(np.int64), np.where(known, fb.cum[hi] - fb.cum[lo], 0.0)

    def _group_batches(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray, starts: np.ndarray):
        """Rows sorted by group ((user, ts) runs starting at `starts`) -> per group its batch dict: the group's
        user row gathered once for all groups, the targets of all rows at once, the life-cycle counts per group
        (the rows of a group share their gap rows)."""
        first = self._samples(users[starts], items[starts], ts[starts])         # one row per group
        n, G = len(users), len(starts)
        grp = np.repeat(np.arange(G), np.diff(np.append(starts, n)))            # (n,) group of each row
        s = Samples(users, first.uidx[grp], first.pos[grp], first.cidx[grp], ts, self.world.vocab.item_index(items),
                    items, np.zeros(n, np.float32), np.full(n, np.nan, np.float32))
        s.fb_n, s.fb_k = first.fb_n[grp], first.fb_k[grp]
        s.fb_prior = first.fb_prior[grp] if isinstance(first.fb_prior, np.ndarray) else first.fb_prior
        ds = self._dataset(s)
        rows = ds[starts]                                  # the user part of each group, gathered once
        if self.model.check_inputs:                        # checked here, on G rows, not on the broadcast batch
            from twinv2.models.layers import check_batch

            check_batch(rows, self.model.vocab, self.model.parts())
        target = ds.targets(np.arange(n))
        bounds = np.append(starts, n)
        for g in range(G):
            a, b = int(bounds[g]), int(bounds[g + 1])
            m = b - a
            batch = {"target": {k: x[a:b] for k, x in target.items()},
                     "long": {k: x[g:g + 1].expand(m, *x.shape[1:]) for k, x in rows["long"].items()},
                     "short": {k: x[g:g + 1].expand(m, *x.shape[1:]) for k, x in rows["short"].items()},
                     "user": torch.from_numpy(users[a:b])}
            if ds.life is not None:        # per group: its gap rows are the user's (a (m, gap) table, not (n, max gap))
                batch["life"] = ds.life_counts(np.arange(a, b))
            yield a, b, batch

    def _forward(self, batch: dict) -> np.ndarray:
        batch = to_device(batch, self.device) if self.device.type != "cpu" else batch
        model, check = self.model, self.model.check_inputs
        model.check_inputs = False                         # checked in _group_batches
        try:
            with torch.inference_mode(), autocast(self.device):
                return model(batch).float().cpu().numpy()
        finally:
            model.check_inputs = check

    def score_user(self, user: int, items, ts=None) -> np.ndarray:
        """Probabilities of one user for many candidate items at one time ts (default: default_ts()): the
        serving path (one group of score_many)."""
        items = np.asarray(items, np.int64)
        t = self.default_ts() if ts is None else int(ts)
        return self.score_many(np.full(len(items), int(user), np.int64), items, np.full(len(items), t, np.int64))

    def score_many(self, users, items, ts=None) -> np.ndarray:
        """Probabilities of rows (users[i], items[i], ts[i]) in row order (ts None: default_ts(); a scalar: every
        row): the batch path. Rows are grouped by (user, ts); each group's user part is built once (all groups
        in one gather) and broadcast over its candidates, one forward per group."""
        users = np.array(users, np.int64).reshape(-1)             # copies: a request's arrays may be read-only
        items = np.array(items, np.int64).reshape(-1)
        n = len(users)
        if len(items) != n:
            raise ValueError(f"score_many: {n} users but {len(items)} items; expected one item per row")
        t = np.full(n, self.default_ts() if ts is None else 0, np.int64)
        if ts is not None:
            t[:] = np.broadcast_to(np.asarray(ts, np.int64), n)
        if n == 0:
            return np.zeros(0, np.float64)
        if not isinstance(self.model, torch.nn.Module):      # gbdt: per-row features are already vectorised
            return self.predict_frame(pd.DataFrame({"user_id": users, "item_id": items, "ts": t}))["prob"]
        if (users == users[0]).all() and (t == t[0]).all():  # one group (a serving request): no sort
            order, starts = None, np.zeros(1, np.int64)
        else:
            order = np.lexsort((t, users))                       # stable: rows of a group keep their order
            su, st = users[order], t[order]
            starts = np.flatnonzero(np.r_[True, (su[1:] != su[:-1]) | (st[1:] != st[:-1])])
            users, items, t = su, items[order], st
        logit = np.empty(n, np.float32)
        for a, b, batch in self._group_batches(users, items, t, starts):
            logit[a:b] = self._forward(batch)
        p = probability(logit)
        if order is None:
            return p
        out = np.empty(n, np.float64)
        out[order] = p
        return out

    def score_frame(self, df: pd.DataFrame) -> np.ndarray:
        """Probabilities of the rows of df (user_id, item_id[, ts]) in row order (a serving request): the
        batch path (one user at one time: one group)."""
        for col in ("user_id", "item_id"):
            if col not in df.columns:
                raise ValueError(f"request lacks column {col!r}; expected user_id, item_id[, ts], got {list(df.columns)}")
        ts = df["ts"].to_numpy(np.int64) if "ts" in df.columns else None
        return self.score_many(df["user_id"].to_numpy(np.int64), df["item_id"].to_numpy(np.int64), ts)

    def score(self, users, items, ts=None) -> np.ndarray:
        df = pd.DataFrame({"user_id": np.asarray(users, np.int64), "item_id": np.asarray(items, np.int64)})
        if ts is not None:
            df["ts"] = np.broadcast_to(np.asarray(ts, np.int64), len(df))
        return self.predict_frame(df)["prob"]
