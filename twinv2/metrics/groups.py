"""User groups by life-cycle length (the paper's gains are largest for the most active users)."""
from __future__ import annotations

import numpy as np

from twinv2.metrics.ctr import auc, gauc


def length_groups(lengths: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantile group (0 = shortest histories) of each value and the group edges (n_groups + 1 values).

    Edges are the quantiles of the users' lengths; ties at an edge go to the lower group."""
    x = np.asarray(lengths, dtype=np.float64)
    if n_groups < 1:
        raise ValueError(f"n_user_groups must be >= 1, got {n_groups}")
    if len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(n_groups + 1)
    edges = np.quantile(x, np.linspace(0, 1, n_groups + 1))
    g = np.searchsorted(edges[1:-1], x, side="left")
    return g.astype(np.int64), edges


def by_group(users, labels, scores, user_length: dict | tuple, n_groups: int) -> list[dict]:
    """AUC and GAUC per life-cycle length quantile group of the users (groups cut over distinct users).

    user_length: (user_ids, lengths) arrays of every user."""
    uids, lens = (np.asarray(a) for a in user_length)
    grp_of_user, edges = length_groups(lens, n_groups)
    order = np.argsort(uids)
    u = np.asarray(users)
    j = np.clip(np.searchsorted(uids[order], u), 0, max(len(uids) - 1, 0))
    known = uids[order][j] == u if len(uids) else np.zeros(len(u), bool)
    g = np.where(known, grp_of_user[order][j], 0)
    y, s = np.asarray(labels), np.asarray(scores)
    out = []
    for k in range(n_groups):
        m = g == k
        out.append({"group": k, "min_len": float(edges[k]), "max_len": float(edges[k + 1]),
                    "n_users": int(len(np.unique(u[m]))), "n_impressions": int(m.sum()),
                    "auc": auc(y[m], s[m]) if m.any() else None,
                    "gauc": gauc(u[m], y[m], s[m])["gauc"] if m.any() else None})
    return out
