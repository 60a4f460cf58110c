"""Batched k-means: every node of one tree level in one go, plus the split rules shared with the reference.

A level holds A nodes (sets of points, each a contiguous run of a point array). Nodes are bucketed by
padded size S (a few sizes per octave, small buckets merged), and each bucket runs k-means++ and Lloyd
iterations as batched numpy ops: X (B, S, d) and its transpose (B, d, S), centroids (B, K, d), distances
(B, K, S) by one stacked matmul, the argmin as a running minimum over the K planes, and the centroid update
as a matmul of the one-hot assignment (B, K, S) with X. (At K = 2-10 this cut the Lloyd time of a 10^4 user
from ~17 ms with torch's baddbmm, argmin and index_add_ to ~10 ms on one core; bench/bench_cluster.py
measures the whole.)

Randomness is counter based: the uniforms of node `key` are hashes of (key, step), so a node's split does
not depend on which other nodes (or users, or shards) share its batch. Lloyd stops when every node of the
bucket is at a fixed point (a converged node no longer changes), or after `iters` iterations.

Split rules (also used by reference.py):
  n_parts(|V|) = max(2, floor(|V| ** exponent))
  a split is degenerate when fewer than 2 parts are non-empty, or its largest part holds more than
  max(gamma, max_share * |V|) points; a degenerate node is split instead by `fallback_labels`: sort its
  points by their projection on the principal axis (ties: original order) and cut k equal chunks.
  Every split therefore makes strictly smaller parts, and the recursion terminates.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import ThreadpoolController

try:                                    # scikit-learn's compiled Lloyd loop (see _lloyd_sklearn)
    from sklearn.cluster._kmeans import _kmeans_single_lloyd as _single_lloyd
except ImportError:                     # pragma: no cover - a future scikit-learn may move it
    _single_lloyd = None

from twinv2.data.store import stable_hash

TOL = 1e-4                  # k-means tolerance, as scikit-learn's KMeans(tol=1e-4)
MAX_SHARE = 0.9             # a part above this share of its node (and above gamma) is a "giant part"
_TRIALS = 16               # uniforms reserved per seeding step (greedy k-means++ uses 2 + ln k of them)
SKLEARN_MIN_SIZE = 1024     # padded node size from which Lloyd runs in scikit-learn (see _kmeans_bucket)
SEED_PER_K = 32             # k-means++ seeds a node from at most SEED_PER_K * k of its points
_ELEMS = 1 << 23            # max B*S*K distance entries per batched op (32 MiB float32)


# ---------------------------------------------------------------- split rules


def n_parts(size, exponent: float) -> np.ndarray:
    """max(2, floor(size ** exponent)), elementwise."""
    s = np.asarray(size, dtype=np.float64)
    return np.maximum(2, np.floor(s ** exponent + 1e-9)).astype(np.int64)


def is_degenerate(counts: np.ndarray, size, gamma: int):
    """counts (..., k) part sizes of splits of nodes of `size` (...) points -> bool (...): fewer than 2
    non-empty parts, or a part above max(gamma, MAX_SHARE * size). Works for one node or a whole level."""
    counts = np.asarray(counts)
    return ((counts > 0).sum(-1) < 2) | (counts.max(-1) > np.maximum(gamma, MAX_SHARE * np.asarray(size)))


def fallback_labels(X: np.ndarray, k: int) -> np.ndarray:
    """(n,) labels 0..k-1: k equal chunks along the principal axis (stable on ties, e.g. identical rows)."""
    n = len(X)
    Xc = X.astype(np.float64) - X.mean(0, dtype=np.float64)
    w, V = np.linalg.eigh(Xc.T @ Xc)                                         # (d,), (d, d) ascending
    axis = V[:, -1] * np.sign(V[np.argmax(np.abs(V[:, -1])), -1] or 1.0)     # principal axis, sign fixed
    proj = Xc @ axis if w[-1] > 1e-12 else np.zeros(n)                      # identical rows: time order
    rank = np.empty(n, np.int64)
    rank[np.argsort(proj, kind="stable")] = np.arange(n)
    return (rank * k // n).astype(np.int64)


# ---------------------------------------------------------------- counter-based randomness


def child_keys(parent: np.ndarray, child_index: np.ndarray) -> np.ndarray:
    """uint64 key of child `child_index` of each parent key."""
    p = np.asarray(parent, np.uint64)
    with np.errstate(over="ignore"):
        mixed = stable_hash(p.view(np.int64)) ^ (np.asarray(child_index, np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return stable_hash(mixed.view(np.int64))


def root_keys(seed: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Key of a root set (a, b), e.g. (user_id, group), for one seed."""
    k = stable_hash(np.full(len(a), seed, np.int64))
    k = child_keys(k, np.asarray(a, np.int64).view(np.uint64))
    return child_keys(k, np.asarray(b, np.int64).view(np.uint64))


def uniforms(keys: np.ndarray, n: int) -> np.ndarray:
    """(A, n) float64 in [0, 1): the n random numbers of each node key."""
    h = child_keys(np.repeat(np.asarray(keys, np.uint64), n), np.tile(np.arange(n, dtype=np.uint64), len(keys)))
    return ((h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))).reshape(len(keys), n)


# ---------------------------------------------------------------- batched k-means


def padded_size(size: np.ndarray) -> np.ndarray:
    """Bucket size >= size: 64 for small nodes, then multiples of 2^(floor(log2 size) - 1) below 4096
    (3 sizes per octave) and of 2^(floor(log2 size) - 2) above (5 per octave, padding waste < 25%).
    Fewer buckets = fewer batched calls; finer buckets = less padding where nodes are big."""
    s = np.maximum(np.asarray(size, np.int64), 1)
    e = np.floor(np.log2(s)).astype(np.int64)
    g = np.left_shift(1, np.maximum(e - np.where(s < 4096, 1, 2), 0))
    return np.maximum((s + g - 1) // g * g, 64)


def _merge_buckets(S: np.ndarray, sizes: np.ndarray, min_elems: int = 1 << 12) -> np.ndarray:
    """Merge small buckets upwards while the padded total stays under max(1.5 x real points, min_elems):
    each bucket costs a fixed number of batched calls, which dominates for small levels."""
    out = S.copy()
    vals = np.unique(S)
    group: list[int] = []
    for v in vals:
        members = np.isin(S, [*group, v])
        if group and members.sum() * v > max(1.5 * sizes[members].sum(), min_elems):
            group = []
        group.append(int(v))
        out[np.isin(S, group)] = v
    return out


def kmeans_level(X: np.ndarray, sizes: np.ndarray, k: np.ndarray, keys: np.ndarray, iters: int) -> np.ndarray:
    """k-means of A nodes at once.

    X: (N, d) float32 points, node after node (node a is rows offsets[a]:offsets[a]+sizes[a]);
    sizes, k, keys: (A,). Returns labels (N,) int64 in [0, k[node])."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    labels = np.empty(len(X), np.int64)
    S_all = _merge_buckets(padded_size(sizes), sizes)
    Xp = np.concatenate([np.asarray(X, np.float32), np.zeros((1, X.shape[1]), np.float32)])
                                                                             # (N + 1, d): row N = padding
    for S in np.unique(S_all):
        nodes = np.nonzero(S_all == S)[0]
        K = int(k[nodes].max())
        per = max(1, _ELEMS // (int(S) * max(K, 8)))
        for lo in range(0, len(nodes), per):
            nb = nodes[lo:lo + per]
            lab = _kmeans_bucket(Xp, offsets[nb], sizes[nb], k[nb], keys[nb], int(S), iters)
            valid = np.arange(S)[None, :] < sizes[nb][:, None]
            labels[(offsets[nb][:, None] + np.arange(S)[None, :])[valid]] = lab[valid]
    return labels


def _sqdist(xx: np.ndarray, XT: np.ndarray, P: np.ndarray) -> np.ndarray:
    """(B, m, S) squared distances of the m points P (B, m, d) to the S points XT (B, d, S); xx = |X|^2 (B, S)."""
    D = np.matmul(P * -2, XT)                                                # (B, m, S)
    D += np.einsum("bmd,bmd->bm", P, P)[:, :, None]
    D += xx[:, None, :]
    return np.maximum(D, 0, out=D)


def _argmin_k(D: np.ndarray) -> np.ndarray:
    """argmin over axis 1 of D (B, K, S) for small K: a running minimum over the K (B, S) planes (numpy's
    argmin over a middle axis was up to ~2x slower at K <= 10). Ties go to the lowest index, as argmin's."""
    best = D[:, 0].copy()
    lab = np.zeros(best.shape, np.int64)
    for j in range(1, D.shape[1]):
        closer = D[:, j] < best
        np.minimum(best, D[:, j], out=best)
        np.copyto(lab, j, where=closer)
    return lab


def _kmeans_bucket(Xp: np.ndarray, off: np.ndarray, size: np.ndarray, k: np.ndarray, keys: np.ndarray,
                   S: int, iters: int) -> np.ndarray:
    """Labels (B, S) of B nodes padded to S points: batched k-means++ seeding, then Lloyd iterations,
    batched (numpy matmuls over the bucket) for small nodes, per node in scikit-learn's compiled Lloyd
    kernel for big ones (its fused distance/argmin/update loop is faster per point than batched ops once a
    node has a few thousand points; measured in bench/bench_cluster.py)."""
    B = len(off)
    ar = np.arange(S)
    valid = ar[None, :] < size[:, None]                                      # (B, S)
    X = Xp[np.where(valid, off[:, None] + ar[None, :], len(Xp) - 1)]         # (B, S, d), pads = 0
    if S >= SKLEARN_MIN_SIZE:
        C = _seed(*_seed_sample(X, size, k), k, keys)                         # (B, K, d)
        out = np.zeros((B, S), np.int64)
        with _threadpools().limit(limits=1, user_api="blas"):               # as KMeans.fit does
            for a in range(B):
                n, ka = int(size[a]), int(k[a])
                out[a, :n] = _lloyd_sklearn(X[a, :n], C[a, :ka], iters)
        return out
    XT = np.ascontiguousarray(X.transpose(0, 2, 1))                          # (B, d, S), for both
    return _lloyd_batched(XT, valid, size, k, _seed(X, valid, size, k, keys, XT), iters)


@functools.cache
def _threadpools() -> ThreadpoolController:
    """The process's BLAS/OpenMP pools, probed once (threadpool_limits() re-reads /proc maps every call)."""
    return ThreadpoolController()


def _lloyd_sklearn(X: np.ndarray, init: np.ndarray, iters: int) -> np.ndarray:
    """One node's Lloyd iterations from the given seeds in scikit-learn's compiled kernel: exactly what
    KMeans(init=init, n_init=1, max_iter=iters, tol=TOL).fit(X) runs (centred data, tol scaled by the mean
    per-dimension variance; tests/clustering check the labels are identical), without fit()'s per-call
    validation and thread-pool probing (~1 ms, which dominated nodes of a few thousand points).
    Falls back to KMeans.fit if the private kernel entry point moves in a future scikit-learn."""
    if _single_lloyd is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # identical points: "fewer distinct clusters than k"
            km = KMeans(n_clusters=len(init), init=init, n_init=1, max_iter=iters, tol=TOL, algorithm="lloyd")
            return km.fit(X).labels_.astype(np.int64)
    X = np.array(X, np.float32, order="C")
    mean = X.mean(axis=0)
    X -= mean
    init = np.array(init, np.float32, order="C") - mean
    tol = float(np.mean(np.var(X, axis=0)) * TOL)
    labels, _, _, _ = _single_lloyd(X, np.ones(len(X), np.float32), init, max_iter=iters, tol=tol, n_threads=1)
    return labels.astype(np.int64)


def _seed_sample(X: np.ndarray, size: np.ndarray, k: np.ndarray):
    """The points k-means++ seeds from: all of a node's points when it has at most SEED_PER_K * k, else
    SEED_PER_K * k points evenly spaced through its run. Seeding reads its points once per centre, so on
    big nodes it would cost as much as the Lloyd iterations; a sample of 32 points per centre seeds as
    well (inertia within 1% of the reference in bench/bench_cluster.py). Returns (Xs (B, M, d), valid (B, M), m (B,))."""
    m = np.minimum(size, SEED_PER_K * k)
    if (m == size).all():
        return X, np.arange(X.shape[1])[None, :] < size[:, None], size
    M = int(m.max())
    j = np.arange(M)
    valid = j[None, :] < m[:, None]                                          # (B, M)
    rows = np.where(valid, (j[None, :] * size[:, None]) // m[:, None], 0)    # (B, M) in [0, size)
    Xs = X[np.arange(len(size))[:, None], rows]                              # (B, M, d)
    return Xs * valid[..., None], valid, m


def _seed(X: np.ndarray, valid: np.ndarray, size: np.ndarray, k: np.ndarray, keys: np.ndarray,
          XT: np.ndarray | None = None) -> np.ndarray:
    """(B, K, d) greedy k-means++ seeds (as scikit-learn: 2 + ln k candidates per step, keep the best),
    batched; a node's trials and uniforms depend on its own key and k only, never on the bucket it shares.
    X (B, S, d); XT: its contiguous transpose (B, d, S) when the caller has it."""
    B, S, d = X.shape
    K = int(k.max())
    b = np.arange(B)
    L_node = 2 + np.log(np.maximum(k, 1)).astype(np.int64)                   # (B,)
    L = int(L_node.max())
    u = uniforms(keys, K * _TRIALS).reshape(B, K, _TRIALS)[:, :, :L]         # (B, K, L)
    trial_off = np.where(np.arange(L)[None, :] < L_node[:, None], 0.0, np.inf)  # (B, L)
    C = np.zeros((B, K, d), np.float32)
    XT = np.ascontiguousarray(X.transpose(0, 2, 1)) if XT is None else XT   # (B, d, S)
    xx = np.einsum("bds,bds->bs", XT, XT)                                    # (B, S)
    C[:, 0] = X[b, np.minimum((u[:, 0, 0] * size).astype(np.int64), S - 1)]
    d2 = _sqdist(xx, XT, C[:, :1])[:, 0] * valid                             # (B, S)
    for t in range(1, K):
        cdf = np.cumsum(d2, 1, dtype=np.float64)                             # (B, S)
        tot = cdf[:, -1:]
        target = u[:, t] * tot                                               # (B, L)
        pick = (cdf[:, None, :] <= target[:, :, None]).sum(-1)               # searchsorted(right=True)
        pick = np.where(tot > 0, pick, (u[:, t] * size[:, None]).astype(np.int64))
        pick = np.minimum(pick, (size - 1)[:, None])
        cand = X[b[:, None], pick]                                           # (B, L, d)
        newd = np.minimum(d2[:, None, :], _sqdist(xx, XT, cand))             # (B, L, S); pads stay 0
        best = (newd.sum(-1) + trial_off).argmin(-1)                         # (B,)
        C[:, t] = cand[b, best]
        d2 = newd[b, best]
    return C


def _lloyd_batched(XT: np.ndarray, valid: np.ndarray, size: np.ndarray, k: np.ndarray, C: np.ndarray,
                   iters: int) -> np.ndarray:
    """(B, S) labels after batched Lloyd iterations from seeds C (B, K, d); XT (B, d, S) the points."""
    B, d, S = XT.shape
    K = C.shape[1]
    xx = np.einsum("bds,bds->bs", XT, XT)                                    # (B, S)
    # Lloyd iterations; argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 c_k.x), padded centroids at +inf.
    # Nodes at a fixed point leave the batch (their labels can no longer change).
    out = np.zeros((B, S), np.int64)
    live = np.arange(B)                                                      # batch rows still iterating
    off_k = np.where(np.arange(K)[None, :] < k[:, None], 0.0, np.inf).astype(np.float32)  # (B, K)
    pad = ~valid                                                             # (B, S)
    ar_k = np.arange(K)[None, :, None]                                       # (1, K, 1)
    # scikit-learn's stopping rule: centre shift^2 summed <= TOL * mean per-dimension variance of the node
    cnt_pts = size.astype(np.float32)[:, None]
    mean = XT.sum(2) / cnt_pts                                               # (B, d)
    var = (xx.sum(1, keepdims=True) / cnt_pts - (mean * mean).sum(1, keepdims=True)) / d
    tol = TOL * np.maximum(var[:, 0], 0)                                     # (B,)
    settled = np.zeros(B, bool)                                              # shift below tol: one last E-step
    prev = None
    for it in range(iters + 1):
        D = np.matmul(C * -2, XT)                                            # (Bl, K, S)
        D += (np.einsum("bkd,bkd->bk", C, C) + off_k)[:, :, None]
        lab = _argmin_k(D)                                                   # (Bl, S)
        if it == iters:
            out[live] = lab
            break
        if prev is not None:
            conv = ((lab == prev) | pad).all(1) | settled                    # (Bl,)
            n_conv = int(conv.sum())
            if n_conv == len(live):
                out[live] = lab
                break
            if n_conv * 4 >= len(live):                                      # compact the batch
                out[live[conv]] = lab[conv]
                keep = ~conv
                live, XT, C, pad, off_k, lab, tol = (v[keep] for v in (live, XT, C, pad, off_k, lab, tol))
        prev = lab
        onehot = (np.where(pad, -1, lab)[:, None, :] == ar_k).astype(np.float32)   # (Bl, K, S); pads: none
        cnt = onehot.sum(-1)[:, :, None]                                     # (Bl, K, 1)
        C_new = np.where(cnt > 0, np.matmul(onehot, XT.transpose(0, 2, 1)) / np.maximum(cnt, 1), C)
        settled = ((C_new - C) ** 2).sum((1, 2)) <= tol
        C = C_new
    return out
