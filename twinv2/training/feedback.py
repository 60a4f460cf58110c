"""The user's own earlier feedback: how many of the user's labelled train-split impressions came strictly before
a sample's ts, and how many of them were positive. A user's base rate (the user bias of most CTR logs, and of the
synthetic world's labels) is not in the behaviour log; it is in these labels.

    n(u, t) = #{train impressions of u with ts' < t},   k(u, t) = #{those with label 1}

Leakage rule: strictly before t, so a training sample never counts its own label or a later one, and valid /
test samples count the train labels only (never another evaluation label). Used by the neural head
(`model.user_feedback`: ln(1 + n) and (k + p0) / (n + 1)) and by the gbdt anchor (`gbdt.user_feedback`:
ln(1 + n) and k / n, NaN when n = 0).

The prior p0 follows the same rule: p0(t) = the positive rate of ALL users' train labels with ts' < t (0.5 when
there is none), so no sample's features depend on its own label or a later one (issue 30: it was the rate of the
whole train split, later labels and the sample's own included).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


def head_features(n: np.ndarray, k: np.ndarray, prior) -> np.ndarray:
    """(M, 2) float32 head features of counts (n, k): ln(1 + n), (k + p0) / (n + 1) (one pseudo-impression at p0;
    prior: (M,) per-sample p0, or a scalar)."""
    n, k = np.asarray(n, np.float64), np.asarray(k, np.float64)
    return np.stack([np.log1p(n), (k + prior) / (n + 1.0)], axis=1).astype(np.float32)


@dataclass(frozen=True)
class Feedback:
    """Train-split labels sorted by (user, ts): two binary searches per query."""

    user: np.ndarray      # (R,) int64 sorted by (user, ts)
    ts: np.ndarray        # (R,) int64
    cum: np.ndarray       # (R+1,) positives prefix sums
    all_ts: np.ndarray    # (R,) int64 every train label's ts, sorted (for the prior p0)
    all_cum: np.ndarray   # (R+1,) positives prefix sums in that order

    @classmethod
    def from_impressions(cls, impressions: pd.DataFrame) -> "Feedback":
        """From impressions (user_id, ts, label, split): the rows of split 'train'."""
        imp = impressions[impressions["split"] == "train"] if "split" in impressions.columns else impressions
        u, t = imp["user_id"].to_numpy(np.int64), imp["ts"].to_numpy(np.int64)
        y = imp["label"].to_numpy(np.float64)
        o = np.lexsort((t, u))
        g = np.argsort(t, kind="stable")
        return cls(u[o], t[o], np.concatenate([[0.0], np.cumsum(y[o])]), t[g], np.concatenate([[0.0], np.cumsum(y[g])]))

    def prior(self, ts: np.ndarray) -> np.ndarray:
        """(M,) float64 p0 of each query time: the positive rate of every user's train labels with ts' < ts[i]
        (strictly before: never the sample's own label nor a later one); 0.5 where there is none."""
        ts = np.asarray(ts, np.int64)
        m = np.searchsorted(self.all_ts, ts, side="left")          # labels with ts' < t
        return np.where(m > 0, self.all_cum[m] / np.maximum(m, 1), 0.5)

    def counts(self, users: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) of each query (users[i], ts[i]): (M,) int64 and (M,) float64."""
        users, ts = np.asarray(users, np.int64), np.asarray(ts, np.int64)
        if not len(self.user):
            return np.zeros(len(users), np.int64), np.zeros(len(users), np.float64)
        # one sorted key per row: rank(user) * (T + 1) + rank(ts) over the T distinct train times
        uu, tt = np.unique(self.user), np.unique(self.ts)
        key = np.searchsorted(uu, self.user) * (len(tt) + 1) + np.searchsorted(tt, self.ts)
        r_q = np.searchsorted(uu, users)
        known = (r_q < len(uu)) & (uu[np.minimum(r_q, len(uu) - 1)] == users)
        base = r_q * (len(tt) + 1)
        lo = np.searchsorted(key, base, side="left")
        hi = np.searchsorted(key, base + np.searchsorted(tt, ts, side="left"), side="left")   # ts' < t
        n = np.where(known, hi - lo, 0)
        k = np.where(known, self.cum[hi] - self.cum[lo], 0.0)
        return n.astype(np.int64), k

    def head_features(self, users: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """(M, 2) float32: ln(1 + n), (k + p0) / (n + 1) (the rate with one pseudo-impression at p0(t))."""
        return head_features(*self.counts(users, ts), self.prior(ts))
