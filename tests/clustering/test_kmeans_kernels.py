"""The batched k-means kernels of kmeans.py against plain per-node references.

Each bucket holds B nodes of different sizes padded to S points; the batched seeding, Lloyd and argmin
must give every node exactly what a plain loop over that node alone gives."""
from __future__ import annotations

import warnings

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import KMeans

from twinv2.clustering import kmeans


def bucket(seed: int, B: int = 7, d: int = 16, lo: int = 21, hi: int = 250):
    """B nodes of blobs, padded to one bucket size: X (B, S, d) with zero pads, valid (B, S), sizes, k."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lo, hi, B)
    k = kmeans.n_parts(sizes, 0.3)
    S = int(kmeans.padded_size(sizes.max()))
    X = np.zeros((B, S, d), np.float32)
    for a in range(B):
        centres = 2 * rng.normal(size=(6, d))
        X[a, :sizes[a]] = centres[rng.integers(0, 6, sizes[a])] + rng.normal(size=(sizes[a], d))
    return X, np.arange(S)[None, :] < sizes[:, None], sizes, k, rng


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 10), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_argmin_k_equals_argmin(B, K, S, seed):
    """Running-minimum argmin == np.argmin over axis 1, ties (to the lowest index) and +inf pads included."""
    rng = np.random.default_rng(seed)
    D = rng.integers(0, 4, (B, K, S)).astype(np.float32)         # few values: many ties
    D[:, rng.random(K) < 0.3] = np.inf                          # padded centroids
    assert (kmeans._argmin_k(D) == D.argmin(1)).all()


def plain_seed(x: np.ndarray, k: int, u: np.ndarray) -> np.ndarray:
    """Greedy k-means++ of one node, a loop: u (k, L) uniforms, L = 2 + floor(ln k) candidates a step."""
    n = len(x)
    L = 2 + int(np.log(k))
    centres = [x[min(int(u[0, 0] * n), n - 1)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for t in range(1, k):
        cdf = np.cumsum(d2.astype(np.float64))
        if cdf[-1] > 0:
            picks = np.searchsorted(cdf, u[t, :L] * cdf[-1], side="right")
        else:
            picks = (u[t, :L] * n).astype(np.int64)
        picks = np.minimum(picks, n - 1)
        trials = [np.minimum(d2, ((x - x[p]) ** 2).sum(1)) for p in picks]
        best = int(np.argmin([tr.sum() for tr in trials]))
        centres.append(x[picks[best]])
        d2 = trials[best]
    return np.stack(centres)


def test_batched_seeding_equals_plain_loop():
    for seed in range(5):
        X, valid, sizes, k, rng = bucket(seed)
        keys = rng.integers(0, 2**62, len(sizes)).astype(np.uint64)
        C = kmeans._seed(X, valid, sizes, k, keys)
        u = kmeans.uniforms(keys, int(k.max()) * kmeans._TRIALS).reshape(len(sizes), int(k.max()), kmeans._TRIALS)
        for a in range(len(sizes)):
            want = plain_seed(X[a, :sizes[a]], int(k[a]), u[a])
            np.testing.assert_allclose(C[a, :k[a]], want, rtol=0, atol=0)


def test_batched_lloyd_equals_kmeans_fit_per_node():
    """From the same seeds, every node of the bucket gets exactly KMeans(init=seeds).fit's labels, whether
    it converges, stops on the tolerance or hits the iteration cap."""
    checked = 0
    for seed in range(8):
        X, valid, sizes, k, rng = bucket(seed)
        C = np.zeros((len(sizes), int(k.max()), X.shape[2]), np.float32)
        for a in range(len(sizes)):
            C[a, :k[a]] = X[a, rng.choice(sizes[a], k[a], replace=False)]
        for iters in (1, 3, 20):
            got = kmeans._lloyd_batched(np.ascontiguousarray(X.transpose(0, 2, 1)), valid, sizes, k, C, iters)
            for a in range(len(sizes)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    want = KMeans(n_clusters=int(k[a]), init=C[a, :k[a]], n_init=1, max_iter=iters,
                                  tol=kmeans.TOL).fit(X[a, :sizes[a]]).labels_
                assert (got[a, :sizes[a]] == want).all(), (seed, iters, a)
                checked += 1
    assert checked == 8 * 3 * 7


def test_batched_lloyd_ignores_padding_and_bucket_mates():
    """A node's labels do not depend on the size S it is padded to or on the other nodes of its bucket
    (near-duplicate points make near-ties likely, where a changed summation order would show)."""
    rng = np.random.default_rng(0)
    d = 32
    for _ in range(40):
        n = int(rng.integers(21, 250))
        k = int(kmeans.n_parts(n, 0.3))
        base = rng.normal(size=(n // 3 + 1, d)).astype(np.float32)
        x = base[rng.integers(0, len(base), n)] + 0.01 * rng.normal(size=(n, d)).astype(np.float32)
        seeds = x[rng.choice(n, k, replace=False)]
        other = rng.normal(size=(n, d)).astype(np.float32)
        runs = []
        for S in sorted({int(kmeans.padded_size(n)), 384, 768}):
            for mates in (0, 3):
                XT = np.zeros((1 + mates, d, S), np.float32)
                XT[:, :, :n] = other.T
                XT[0, :, :n] = x.T
                C = np.repeat(other[None, :k], 1 + mates, 0)
                C[0] = seeds
                sizes = np.full(1 + mates, n)
                valid = np.arange(S)[None, :] < sizes[:, None]
                runs.append(kmeans._lloyd_batched(XT, valid, sizes, np.full(1 + mates, k), C, 20)[0, :n])
        assert all((r == runs[0]).all() for r in runs[1:])
