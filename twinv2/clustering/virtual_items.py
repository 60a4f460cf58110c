"""Virtual items (TWIN-V2, step 3): one row per cluster.

numeric features: the mean over members (float64) -- play_ms, completion, ts, duration_ms and every
numeric cross feature present (e.g. liked); id/categorical features (item_id, author_id, category) by
params `cluster.virtual_ids` (`rule`):
  nearest   (default, the paper) copied from the member nearest the centroid in the clustering embedding
            space (ties: earliest member);
  random    copied from one member drawn at random: member floor(u * n) of the cluster (members in input
            order, i.e. time order), u a counter-based uniform of (cluster.seed, user, cluster id), so the
            draw is deterministic and does not depend on the chunk or shard the user is in;
  majority  for each id column separately, its most frequent value among the members (ties: the value of
            the earliest member among the tied values);
size n; centroid (float32 mean embedding); sse = sum of squared distances of members to the centroid.
"""
from __future__ import annotations

import numpy as np

from twinv2.clustering.kmeans import root_keys, uniforms

NUMERIC = ("duration_ms", "play_ms", "completion", "ts")
IDS = ("item_id", "author_id", "category")
RULES = ("nearest", "random", "majority")
_RANDOM_SALT = 0x51D5                     # the random member's keys differ from the k-means root keys


def check_rule(rule) -> str:
    if rule not in RULES:
        raise ValueError(f"params cluster.virtual_ids must be one of {' | '.join(RULES)} (how a cluster's "
                         f"item/author/category ids are chosen), got {rule!r}")
    return rule


def random_member(user: np.ndarray, cluster: np.ndarray, size: np.ndarray, seed: int) -> np.ndarray:
    """(C,) int64 index in 0..size-1 of the random member of each (user, cluster), from a uniform of
    (seed, user, cluster id) only."""
    if not len(size):
        return np.zeros(0, np.int64)
    keys = root_keys(int(seed) ^ _RANDOM_SALT, np.asarray(user, np.int64), np.asarray(cluster, np.int64))
    u = uniforms(keys, 1)[:, 0]
    return np.minimum((u * size).astype(np.int64), np.asarray(size, np.int64) - 1)


def majority(values: np.ndarray, gid: np.ndarray, n_clusters: int) -> np.ndarray:
    """(C,) the most frequent value of each cluster; values, gid (n,) with the rows of each cluster in member
    order (gid non-decreasing); ties: the value whose first occurrence is earliest."""
    n = len(values)
    pos = np.arange(n)
    o = np.lexsort((pos, values, gid))                                       # runs of (cluster, value)
    g, v = gid[o], values[o]
    new = np.ones(n, bool)
    new[1:] = (g[1:] != g[:-1]) | (v[1:] != v[:-1])
    run = np.flatnonzero(new)
    count = np.diff(np.append(run, n))
    first = pos[o][run]                                                      # earliest member of each run
    best = np.lexsort((first, -count, g[run]))                               # per cluster: most, then earliest
    rg = g[run][best]
    head = np.ones(len(best), bool)
    head[1:] = rg[1:] != rg[:-1]
    out = np.empty(n_clusters, values.dtype)
    out[rg[head]] = v[run][best][head]
    return out


def pick_ids(ids_sorted: dict[str, np.ndarray], gid: np.ndarray, first: np.ndarray, dist: np.ndarray,
             rule: str, user: np.ndarray | None = None, cluster: np.ndarray | None = None,
             seed: int = 0) -> dict[str, np.ndarray]:
    """The id columns of C clusters by `rule`. ids_sorted: name -> (n,) values with each cluster's members
    contiguous, in member order; gid (n,) cluster index 0..C-1 (non-decreasing); first (C,) first row of each
    cluster; dist (n,) squared distance of each member to its centroid (rule nearest); user, cluster (C,) the
    (user, cluster id) of each cluster (rule random)."""
    check_rule(rule)
    n = len(gid)
    size = np.diff(np.append(first, n))
    if rule == "nearest":
        rep = np.lexsort((np.arange(n), dist, gid))[first]                  # nearest member, ties earliest
    elif rule == "random":
        rep = first + random_member(user, cluster, size, seed)
    else:
        return {k: majority(np.asarray(v), gid, len(first)) for k, v in ids_sorted.items()}
    return {k: np.asarray(v)[rep] for k, v in ids_sorted.items()}


def virtual_items(user: np.ndarray, cluster: np.ndarray, group: np.ndarray, X: np.ndarray,
                  numeric: dict[str, np.ndarray], ids: dict[str, np.ndarray], rule: str = "nearest",
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Cluster table (dict of columns, one row per (user, cluster), sorted by user then cluster id).

    user, cluster, group: (n,); X: (n, d) float32; numeric: name -> (n,) values to average;
    ids: name -> (n,) values chosen by `rule` (nearest | random | majority, module doc); seed: cluster.seed
    (rule random)."""
    check_rule(rule)
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
    out["user_id"] = u[first].astype(np.int64)
    out["cluster_id"] = c[first].astype(np.int32)
    out["group"] = np.asarray(group)[order][first].astype(np.int8)
    out["size"] = size.astype(np.int32)
    out["centroid"] = cent.astype(np.float32)
    out["sse"] = np.add.reduceat(dist, first)
    out.update(pick_ids({k: np.asarray(v)[order] for k, v in ids.items()}, gid, first, dist, rule,
                        out["user_id"], out["cluster_id"], seed))
    for k, v in numeric.items():
        out[k] = np.add.reduceat(np.asarray(v, np.float64)[order], first) / size
    return out


def mean_inertia(sse: np.ndarray, size: np.ndarray) -> float:
    """Mean squared distance of a behaviour to its cluster centroid."""
    n = float(np.sum(size))
    return float(np.sum(sse) / n) if n else 0.0
