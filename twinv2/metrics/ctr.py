"""Click-through metrics: AUC, GAUC, logloss (scikit-learn where it fits) and their per-user reference.

GAUC (Zhou et al., DIN): sum over users u of w_u * AUC_u / sum w_u, with w_u = the user's number of
impressions; users whose impressions are all of one class have no AUC and are skipped.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores hold {int((~np.isfinite(s)).sum())} non-finite values; expected finite scores")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    return y, s


def auc(labels, scores) -> float | None:
    """ROC AUC; None when only one class is present."""
    y, s = _check(labels, scores)
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, s))


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities clipped to [eps, 1-eps]."""
    y, p = _check(labels, probs)
    return float(log_loss(y, np.clip(p, eps, 1 - eps), labels=[0, 1]))


def gauc(users, labels, scores) -> dict:
    """Impression-weighted GAUC, vectorised: one sort by (user, score) and rank sums per user.

    Returns {"gauc": float | None, "n_users": users scored, "n_skipped": one-class users,
    "n_impressions": impressions of scored users}."""
    y, s = _check(labels, scores)
    u = np.asarray(users).ravel()
    if len(u) != len(y):
        raise ValueError(f"users ({len(u)}) and labels ({len(y)}) differ in length")
    if len(u) == 0:
        return {"gauc": None, "n_users": 0, "n_skipped": 0, "n_impressions": 0}
    # average ranks within each user (ties get the mean rank, as in the Mann-Whitney statistic)
    order = np.lexsort((s, u))
    uo, so, yo = u[order], s[order], y[order]
    new_user = np.r_[True, uo[1:] != uo[:-1]]
    new_val = new_user | np.r_[True, so[1:] != so[:-1]]
    grp_start = np.flatnonzero(new_user)                                  # first row of each user
    user_of = np.cumsum(new_user) - 1                                     # user group of each row
    pos_in_user = np.arange(len(uo)) - grp_start[user_of] + 1             # 1-based rank, ties not merged
    tie_id = np.cumsum(new_val) - 1
    tie_sum = np.bincount(tie_id, weights=pos_in_user)
    tie_cnt = np.bincount(tie_id)
    rank = (tie_sum / tie_cnt)[tie_id]
    n = np.bincount(user_of).astype(np.float64)
    n_pos = np.bincount(user_of, weights=yo)
    n_neg = n - n_pos
    rank_pos = np.bincount(user_of, weights=rank * yo)
    ok = (n_pos > 0) & (n_neg > 0)
    auc_u = (rank_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    w = n[ok]
    value = float(np.sum(w * auc_u) / np.sum(w)) if ok.any() else None
    return {"gauc": value, "n_users": int(ok.sum()), "n_skipped": int((~ok).sum()), "n_impressions": int(w.sum())}


def gauc_reference(users, labels, scores) -> float | None:
    """Plain per-user loop with scikit-learn's AUC (the reference the vectorised GAUC is tested against)."""
    u = np.asarray(users)
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    num = den = 0.0
    for user in np.unique(u):
        m = u == user
        if len(np.unique(y[m])) < 2:
            continue
        num += m.sum() * roc_auc_score(y[m], s[m])
        den += m.sum()
    return num / den if den else None


def calibration(labels, probs, n_bins: int = 10) -> dict:
    """Reliability curve: mean predicted vs observed rate per equal-width probability bin, and the ECE."""
    y, p = _check(labels, probs)
    b = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    cnt = np.bincount(b, minlength=n_bins)
    mp = np.bincount(b, weights=p, minlength=n_bins) / np.maximum(cnt, 1)
    my = np.bincount(b, weights=y, minlength=n_bins) / np.maximum(cnt, 1)
    ece = float(np.sum(cnt * np.abs(mp - my)) / max(len(y), 1))
    return {"mean_pred": mp.tolist(), "observed": my.tolist(), "count": cnt.tolist(), "ece": ece}
