"""The plain reference: the paper's queue-based recursion, one scikit-learn KMeans per node.

Same parameters and split rules as the fast version (n_parts, is_degenerate, fallback_labels), written
for clarity, not speed. Tests and bench/bench_cluster.py hold the fast version against it."""
from __future__ import annotations

import warnings
from collections import deque

import numpy as np
from sklearn.cluster import KMeans

from twinv2.clustering.kmeans import fallback_labels, is_degenerate, n_parts


def cluster_set_reference(X: np.ndarray, gamma: int, exponent: float, iters: int, seed: int) -> np.ndarray:
    """(n,) int64 cluster id of each point of one set (one user's group)."""
    labels = np.full(len(X), -1, np.int64)
    queue = deque([np.arange(len(X))])
    n_clusters = 0
    while queue:
        V = queue.popleft()
        if len(V) <= gamma:
            labels[V] = n_clusters
            n_clusters += 1
            continue
        k = int(n_parts(len(V), exponent))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # identical points: "fewer distinct clusters than k"
            lab = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed).fit_predict(X[V])
        counts = np.bincount(lab, minlength=k)
        if is_degenerate(counts, len(V), gamma):
            lab = fallback_labels(X[V], k)
        for part in range(k):
            if (lab == part).any():
                queue.append(V[lab == part])
    return labels


def cluster_behaviours_reference(X, user, group, gamma, exponent, iters, seed) -> np.ndarray:
    """(n,) int32 cluster id unique per user, one reference recursion per (user, group)."""
    user = np.asarray(user, np.int64)
    out = np.zeros(len(X), np.int32)
    for u in np.unique(user):
        base = 0
        for g in np.unique(group[user == u]):
            rows = np.flatnonzero((user == u) & (group == g))
            lab = cluster_set_reference(X[rows], gamma, exponent, iters, seed)
            out[rows] = base + lab
            base += int(lab.max()) + 1
    return out
