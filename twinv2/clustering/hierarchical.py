"""The fast recursive adaptive k-means (TWIN-V2, step 2), level by level instead of node by node.

The queue of the paper becomes a frontier of nodes. Points are kept in one permutation `perm`; every node
is a contiguous run perm[start:start+size]. At each level, nodes of at most gamma points become clusters;
all the others are split together by `kmeans_level` (one batched k-means for the whole level), and each
node's run is reordered by part label so that its children are contiguous runs again.

    cluster_sets(X, root, gamma, exponent, iters, keys)   any root sets (e.g. (user, group) pairs)
    flat_sets(X, root, k, keys, iters)                    one k-means level of k[r] parts per root set
    cluster_behaviours(X, user, group, params)            per user and completion group

params `cluster.method`: hierarchical (default, the paper) | flat, the "flat k-means" ablation: each root set
gets ONE k-means level whose k is the number of clusters the hierarchical method makes of that root set
(so every user keeps the same number of clusters), parts are not split further and may exceed gamma.
"""
from __future__ import annotations

import numpy as np

from twinv2.clustering.kmeans import (child_keys, fallback_labels, is_degenerate, kmeans_level, n_parts,
                                      root_keys)

METHODS = ("hierarchical", "flat")


def check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"params cluster.method must be one of {' | '.join(METHODS)} (recursive k-means, or one "
                         f"k-means level with as many clusters per user), got {method!r}")
    return method


def cluster_sets(X: np.ndarray, root: np.ndarray, gamma: int, exponent: float, iters: int,
                 root_key: np.ndarray) -> np.ndarray:
    """Split every root set recursively until all parts have <= gamma points.

    X: (n, d) float32; root: (n,) int64 root-set id of each point; root_key: (R,) uint64 random key of
    root sets 0..R-1 (ids index it). Returns leaf (n,) int64: a cluster index, numbered 0.. in the order
    (root, tree order), so each root's clusters are a contiguous id range."""
    n = len(X)
    if gamma < 1:
        raise ValueError(f"params cluster.gamma must be >= 1, got {gamma}")
    leaf = np.full(n, -1, np.int64)
    if n == 0:
        return leaf
    perm = np.argsort(root, kind="stable")                                    # points by root, in input order
    r_sorted = root[perm]
    bounds = np.flatnonzero(np.diff(r_sorted)) + 1
    start = np.concatenate([[0], bounds]).astype(np.int64)
    size = np.diff(np.concatenate([start, [n]])).astype(np.int64)
    key = np.asarray(root_key, np.uint64)[r_sorted[start]]
    done_start, done_size = [], []
    while len(start):
        small = size <= gamma
        done_start.append(start[small])
        done_size.append(size[small])
        start, size, key = start[~small], size[~small], key[~small]
        if not len(start):
            break
        start, size, key = _split_level(X, perm, start, size, key, gamma, exponent, iters)
    ds = np.concatenate(done_start)
    dz = np.concatenate(done_size)
    order = np.argsort(ds)
    ds, dz = ds[order], dz[order]
    leaf[perm] = np.repeat(np.arange(len(ds)), dz)
    return leaf


def _split_level(X, perm, start, size, key, gamma, exponent, iters):
    """Split all nodes of one level; reorders perm in place. Returns the children (start, size, key)."""
    k = n_parts(size, exponent)
    pos = _ranges(start, size)                                               # (T,) positions in perm
    lab = kmeans_level(X[perm[pos]], size, k, key, iters)                    # (T,)
    node = np.repeat(np.arange(len(start)), size)
    # degenerate splits -> principal-axis fallback
    kmax = int(k.max())
    counts = np.bincount(node * kmax + lab, minlength=len(start) * kmax).reshape(len(start), kmax)
    bad = np.flatnonzero(is_degenerate(counts, size, gamma))          # parts beyond k[a] are empty columns
    for a in bad:
        lo = int(np.searchsorted(node, a))
        rows = slice(lo, lo + int(size[a]))
        lab[rows] = fallback_labels(X[perm[pos[rows]]], int(k[a]))
        counts[a] = np.bincount(lab[rows], minlength=kmax)
    # children become contiguous: stable sort of each node's run by label
    order = np.argsort(node * kmax + lab, kind="stable")                     # = lexsort((pos, lab, node))
    perm[pos] = perm[pos[order]]
    a_idx, c_idx = np.nonzero(counts)                                         # row-major: node, then label
    c_size = counts[a_idx, c_idx]
    first = np.concatenate([[0], np.cumsum(c_size)[:-1]])
    node_first = np.concatenate([[0], np.cumsum(size)[:-1]])
    c_start = start[a_idx] + (first - node_first[a_idx])
    return c_start, c_size, child_keys(key[a_idx], c_idx.astype(np.uint64))


def _ranges(start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start[a], start[a] + size[a])."""
    total = int(size.sum())
    base = np.repeat(start - np.concatenate([[0], np.cumsum(size)[:-1]]), size)
    return base + np.arange(total)


def flat_sets(X: np.ndarray, root: np.ndarray, k: np.ndarray, root_key: np.ndarray, iters: int) -> np.ndarray:
    """One k-means level per root set with exactly k[r] non-empty parts (k[r] <= the set's size).

    X: (n, d) float32; root: (n,) int64 root-set ids 0..R-1; k, root_key: (R,). Returns leaf (n,) int64
    numbered 0.. in the order (root, part label), each root's parts a contiguous id range. The batched
    k-means of kmeans.py runs on every root with k >= 2 at once; where it leaves parts empty (e.g. identical
    points), the largest part (ties: the lowest label) is cut in two along its principal axis
    (fallback_labels; identical points in input order) until all k[r] parts are used."""
    n = len(X)
    leaf = np.full(n, -1, np.int64)
    if n == 0:
        return leaf
    k = np.asarray(k, np.int64)
    R = len(k)
    perm = np.argsort(root, kind="stable")                                   # points by root, in input order
    size = np.bincount(root, minlength=R).astype(np.int64)
    if (k < 1).any() or (k > size).any():
        raise ValueError("flat_sets: every root needs 1 <= k <= its number of points")
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    lab = np.zeros(n, np.int64)                                              # label of perm[i]
    split = np.flatnonzero(k >= 2)
    if len(split):
        pos = _ranges(start[split], size[split])
        lab[pos] = kmeans_level(X[perm[pos]], size[split], k[split], np.asarray(root_key, np.uint64)[split], iters)
        for r in split:
            rows = slice(int(start[r]), int(start[r] + size[r]))
            lr = lab[rows]
            counts = np.bincount(lr, minlength=int(k[r]))
            while (counts == 0).any():                                       # empty parts: cut the largest
                big = int(np.argmax(counts))
                members = np.flatnonzero(lr == big)
                half = fallback_labels(X[perm[rows][members]], 2)
                lr[members[half == 1]] = int(np.flatnonzero(counts == 0)[0])
                counts = np.bincount(lr, minlength=int(k[r]))
            lab[rows] = lr
    offset = np.concatenate([[0], np.cumsum(k)[:-1]])
    leaf[perm] = offset[root[perm]] + lab
    return leaf


def cluster_behaviours(X: np.ndarray, user: np.ndarray, group: np.ndarray, gamma: int, exponent: float,
                       iters: int, seed: int, method: str = "hierarchical") -> np.ndarray:
    """(n,) int32 cluster id of each behaviour, unique per user (0..c_u-1), never mixing groups.

    X: (n, d) float32 embeddings; user: (n,) int64 user ids; group: (n,) int8 completion groups;
    method: hierarchical | flat (params cluster.method, module doc)."""
    check_method(method)
    user = np.asarray(user, np.int64)
    group = np.asarray(group, np.int64)
    # root sets = (user, group) pairs, numbered in (user, group) order; 1-D integer keys (np.unique with
    # axis=0 sorts a structured view and is ~20x slower)
    users, uinv = np.unique(user, return_inverse=True)
    g_lo = int(group.min()) if len(group) else 0
    n_g = int(group.max()) - g_lo + 1 if len(group) else 1
    pair_key, root = np.unique(uinv.reshape(-1) * n_g + (group - g_lo), return_inverse=True)
    root = root.reshape(-1)
    keys = root_keys(seed, users[pair_key // n_g], pair_key % n_g + g_lo)
    leaf = cluster_sets(X, root, gamma, exponent, iters, keys)
    if method == "flat" and len(leaf):
        first_row = np.empty(int(leaf.max()) + 1, np.int64)
        first_row[leaf[::-1]] = np.arange(len(leaf))[::-1]
        k = np.bincount(root[first_row], minlength=len(pair_key))          # hierarchical clusters per root
        leaf = flat_sets(X, root, k, keys, iters)
    return per_user_ids(user, leaf)


def per_user_ids(user: np.ndarray, leaf: np.ndarray) -> np.ndarray:
    """Renumber global leaf ids to 0.. within each user (in leaf order).

    leaf: (n,) ids 0..L-1, every id used, each user's ids a contiguous range (as cluster_sets returns)."""
    if len(leaf) == 0:
        return np.zeros(0, np.int32)
    L = int(leaf.max()) + 1
    first_row = np.empty(L, np.int64)
    first_row[leaf[::-1]] = np.arange(len(leaf))[::-1]                       # first row of each leaf
    leaf_user = user[first_row]                                              # (L,), non-decreasing runs
    new_user = np.concatenate([[True], leaf_user[1:] != leaf_user[:-1]])
    user_first = np.flatnonzero(new_user)
    local = np.arange(L) - np.repeat(user_first, np.diff(np.append(user_first, L)))
    return local[leaf].astype(np.int32)
