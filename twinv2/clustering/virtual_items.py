"""Virtual items (TWIN-V2, step 3): one row per cluster.

numeric features: the mean over members (float64) -- play_ms, completion, ts, duration_ms and every
numeric cross feature present (e.g. liked); id/categorical features (item_id, author_id, category):
copied from the member nearest the centroid in the clustering embedding space (ties: earliest member);
size n; centroid (float32 mean embedding); sse = sum of squared distances of members to the centroid.
"""
from __future__ import annotations

import numpy as np

NUMERIC = ("duration_ms", "play_ms", "completion", "ts")
IDS = ("item_id", "author_id", "category")


def virtual_items(user: np.ndarray, cluster: np.ndarray, group: np.ndarray, X: np.ndarray,
                  numeric: dict[str, np.ndarray], ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cluster table (dict of columns, one row per (user, cluster), sorted by user then cluster id).

    user, cluster, group: (n,); X: (n, d) float32; numeric: name -> (n,) values to average;
    ids: name -> (n,) values copied from the representative."""
    n, d = X.shape
    out: dict[str, np.ndarray] = {}
    if n == 0:
        out.update(user_id=np.zeros(0, np.int64), cluster_id=np.zeros(0, np.int32), group=np.zeros(0, np.int8),
                   size=np.zeros(0, np.int32), centroid=np.zeros((0, d), np.float32), sse=np.zeros(0))
        out.update({k: np.zeros(0, np.float64) for k in numeric})
        out.update({k: np.zeros(0, v.dtype) for k, v in ids.items()})
        return out
    order = np.lexsort((np.arange(n), cluster, user))                       # members by (user, cluster, row)
    u, c = user[order], cluster[order]
    new = np.ones(n, bool)
    new[1:] = (u[1:] != u[:-1]) | (c[1:] != c[:-1])
    first = np.flatnonzero(new)                                              # (C,)
    size = np.diff(np.append(first, n))
    gid = np.cumsum(new) - 1                                                 # (n,) cluster index of sorted rows
    Xs = X[order].astype(np.float64)
    cent = np.add.reduceat(Xs, first, axis=0) / size[:, None]                # (C, d)
    dist = ((Xs - cent[gid]) ** 2).sum(1)                                    # (n,)
    rep = np.lexsort((np.arange(n), dist, gid))[first]                       # nearest member of each cluster
    out["user_id"] = u[first].astype(np.int64)
    out["cluster_id"] = c[first].astype(np.int32)
    out["group"] = np.asarray(group)[order][first].astype(np.int8)
    out["size"] = size.astype(np.int32)
    out["centroid"] = cent.astype(np.float32)
    out["sse"] = np.add.reduceat(dist, first)
    for k, v in ids.items():
        out[k] = np.asarray(v)[order][rep]
    for k, v in numeric.items():
        out[k] = np.add.reduceat(np.asarray(v, np.float64)[order], first) / size
    return out


def mean_inertia(sse: np.ndarray, size: np.ndarray) -> float:
    """Mean squared distance of a behaviour to its cluster centroid."""
    n = float(np.sum(size))
    return float(np.sum(sse) / n) if n else 0.0
