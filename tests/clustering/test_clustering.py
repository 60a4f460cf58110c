"""Hierarchical clustering: invariants, virtual items, fast vs reference, degenerate input."""
from __future__ import annotations

import numpy as np
import pytest

from twinv2.clustering.grouping import group_of
from twinv2.clustering import kmeans
from twinv2.clustering.hierarchical import cluster_behaviours, cluster_sets
from twinv2.clustering.kmeans import fallback_labels, is_degenerate, kmeans_level, n_parts, root_keys
from twinv2.clustering.reference import cluster_behaviours_reference
from twinv2.clustering.virtual_items import mean_inertia, virtual_items


def blobs(n, d=16, centers=20, seed=0, users=1):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    X = (c[rng.integers(0, centers, n)] + 0.4 * rng.normal(size=(n, d))).astype(np.float32)
    return X, np.sort(rng.integers(0, users, n)).astype(np.int64), rng.integers(0, 6, n).astype(np.int8)


def check_partition(cid, user, group, gamma):
    """Every point in exactly one cluster, sizes <= gamma, one group per cluster, ids 0.. per user."""
    assert cid.shape == user.shape and (cid >= 0).all()
    key = user * 1_000_000 + cid
    _, inv, size = np.unique(key, return_inverse=True, return_counts=True)
    assert size.max() <= gamma
    g_min = np.full(len(size), 127)
    g_max = np.full(len(size), -1)
    np.minimum.at(g_min, inv, group)
    np.maximum.at(g_max, inv, group)
    assert (g_min == g_max).all(), "a cluster mixes completion groups"
    for u in np.unique(user):
        ids = np.unique(cid[user == u])
        assert (ids == np.arange(len(ids))).all()


def test_grouping_edges():
    g = group_of(np.array([-0.1, 0.0, 0.19, 0.2, 0.99, 1.0, 4.0]), [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert g.tolist() == [0, 0, 0, 1, 4, 5, 5]
    with pytest.raises(ValueError, match="group_edges"):
        group_of(np.zeros(2), [0.0, 0.5, 0.5])


def test_n_parts_clamped():
    assert n_parts(np.array([1, 7, 8, 21, 1000, 100000]), 0.3).tolist() == [2, 2, 2, 2, 7, 31]


@pytest.mark.parametrize("gamma", [1, 3, 20])
def test_invariants_fast(gamma):
    X, user, group = blobs(1000 if gamma < 20 else 3000, users=4)
    cid = cluster_behaviours(X, user, group, gamma, 0.3, 20, 0)
    check_partition(cid, user, group, gamma)


def test_fast_matches_reference_quality():
    X, user, group = blobs(2500, d=32, centers=40, seed=1)
    fast = cluster_behaviours(X, user, group, 20, 0.3, 20, 0)
    ref = cluster_behaviours_reference(X, user, group, 20, 0.3, 20, 0)
    check_partition(fast, user, group, 20)
    check_partition(ref, user, group, 20)
    inert = []
    for cid in (fast, ref):
        vi = virtual_items(user, cid, group, X, {}, {})
        inert.append(mean_inertia(vi["sse"], vi["size"]))
    assert inert[0] <= 1.05 * inert[1], inert
    n_fast, n_ref = len(np.unique(fast)), len(np.unique(ref))
    assert abs(n_fast - n_ref) / n_ref < 0.1


def test_big_nodes_sampled_seeding_and_compiled_lloyd_match_reference_quality():
    """One 12k-point set: its top levels take the big-node path (k-means++ seeded from a sample, Lloyd in
    scikit-learn's kernel) and must still partition correctly and stay within 5% of the reference."""
    X, user, _ = blobs(12_000, d=32, centers=60, seed=4)
    group = np.zeros(len(X), np.int8)
    assert 12_000 >= kmeans.SKLEARN_MIN_SIZE and 12_000 > kmeans.SEED_PER_K * n_parts(12_000, 0.3)
    fast = cluster_behaviours(X, user, group, 20, 0.3, 20, 0)
    ref = cluster_behaviours_reference(X, user, group, 20, 0.3, 20, 0)
    check_partition(fast, user, group, 20)
    inert = [mean_inertia(**{k: v for k, v in virtual_items(user, c, group, X, {}, {}).items() if k in ("sse", "size")})
             for c in (fast, ref)]
    assert inert[0] <= 1.05 * inert[1], inert
    assert (cluster_behaviours(X, user, group, 20, 0.3, 20, 0) == fast).all()


def test_compiled_lloyd_equals_kmeans_fit():
    """_lloyd_sklearn calls scikit-learn's Lloyd loop directly; it must label exactly as KMeans.fit does."""
    from sklearn.cluster import KMeans

    X, _, _ = blobs(3000, d=32, centers=12, seed=5)
    init = X[::500][:6].copy()
    want = KMeans(n_clusters=6, init=init, n_init=1, max_iter=20, tol=kmeans.TOL).fit(X).labels_
    assert kmeans._single_lloyd is not None, "scikit-learn moved _kmeans_single_lloyd: fallback in use"
    assert (kmeans._lloyd_sklearn(X, init, 20) == want).all()


def test_deterministic_and_batch_invariant():
    X, user, group = blobs(1500, users=4, seed=2)
    a = cluster_behaviours(X, user, group, 20, 0.3, 20, 7)
    b = cluster_behaviours(X, user, group, 20, 0.3, 20, 7)
    assert (a == b).all()
    # a user's clusters do not depend on which other users share the batch
    for u in np.unique(user):
        m = user == u
        alone = cluster_behaviours(X[m], user[m], group[m], 20, 0.3, 20, 7)
        assert (alone == a[m]).all()
    c = cluster_behaviours(X, user, group, 20, 0.3, 20, 8)
    assert not (a == c).all()


def test_virtual_items_vs_brute_force():
    rng = np.random.default_rng(3)
    X, user, group = blobs(800, users=3, seed=3)
    cid = cluster_behaviours(X, user, group, 20, 0.3, 20, 0)
    play = rng.integers(0, 10_000, len(X))
    liked = rng.integers(0, 2, len(X))
    item = rng.integers(1, 50, len(X))
    vi = virtual_items(user, cid, group, X, {"play_ms": play, "liked": liked}, {"item_id": item})
    assert vi["size"].sum() == len(X)
    for r in range(len(vi["size"])):
        m = np.flatnonzero((user == vi["user_id"][r]) & (cid == vi["cluster_id"][r]))
        assert len(m) == vi["size"][r]
        c = X[m].astype(np.float64).mean(0)
        np.testing.assert_allclose(vi["centroid"][r], c, rtol=1e-5, atol=1e-6)
        assert vi["play_ms"][r] == pytest.approx(play[m].mean())
        assert vi["liked"][r] == pytest.approx(liked[m].mean())
        d = ((X[m] - c) ** 2).sum(1)
        assert vi["sse"][r] == pytest.approx(d.sum(), rel=1e-5)
        best = m[np.argmin(d)]
        assert vi["item_id"][r] == item[best]
        assert vi["group"][r] == group[m[0]]


def test_degenerate_identical_embeddings_terminate():
    n = 5000
    X = np.ones((n, 8), np.float32)
    user = np.zeros(n, np.int64)
    group = np.zeros(n, np.int8)
    cid = cluster_behaviours(X, user, group, 20, 0.3, 20, 0)
    check_partition(cid, user, group, 20)
    # the fallback cuts equal chunks in time order
    sizes = np.bincount(cid)
    assert sizes.min() >= 10 and sizes.max() <= 20
    ref = cluster_behaviours_reference(X[:600], user[:600], group[:600], 20, 0.3, 20, 0)
    check_partition(ref, user[:600], group[:600], 20)


def test_degenerate_giant_part_and_gamma_one():
    # 1 outlier + many identical points: k-means puts the outlier alone and everything else together
    X = np.zeros((300, 4), np.float32)
    X[0] = 100.0
    labels = kmeans_level(X, np.array([300]), np.array([2]), root_keys(0, np.array([0]), np.array([0])), 20)
    counts = np.bincount(labels, minlength=2)
    assert is_degenerate(counts, 300, 20)
    cid = cluster_behaviours(X, np.zeros(300, np.int64), np.zeros(300, np.int8), 20, 0.3, 20, 0)
    check_partition(cid, np.zeros(300, np.int64), np.zeros(300, np.int8), 20)
    # gamma 1: every point its own cluster
    cid = cluster_behaviours(X[:50], np.zeros(50, np.int64), np.zeros(50, np.int8), 1, 0.3, 20, 0)
    assert len(np.unique(cid)) == 50


def test_fallback_labels_equal_chunks_along_principal_axis():
    t = np.linspace(0, 1, 100)
    X = np.stack([t, 2 * t, np.zeros(100)], 1).astype(np.float32)[::-1].copy()
    lab = fallback_labels(X, 4)
    assert np.bincount(lab).tolist() == [25, 25, 25, 25]
    # chunks are contiguous along the axis
    for k in range(4):
        proj = X[lab == k, 0]
        assert proj.max() - proj.min() <= 0.26


@pytest.mark.parametrize("spread", [1, 10**9])
def test_id_index_equals_a_dict(spread):
    """Dense table (compact ids) and binary search (sparse ids) find exactly the rows a dict does."""
    from twinv2.clustering.embeddings import IdIndex

    rng = np.random.default_rng(spread)
    ids = np.unique(rng.integers(0, 5000 * spread, 3000))
    index = IdIndex(ids)
    assert (index.table is not None) == (spread == 1)
    query = np.concatenate([rng.choice(ids, 500), rng.integers(-10, 6000 * spread, 500), [-1, 10**12]])
    want = {int(v): r for r, v in enumerate(ids)}
    assert index.rows(query).tolist() == [want.get(int(q), -1) for q in query]
    assert IdIndex(np.zeros(0, np.int64)).rows(query).tolist() == [-1] * len(query)


def test_incremental_update_refuses_unsorted_behaviours():
    from twinv2.clustering.incremental import update_chunk

    beh = {"user_id": np.array([2, 1]), "ts": np.array([5, 6])}
    with pytest.raises(ValueError, match=r"sorted by \(user_id, ts\)"):
        update_chunk(beh, {}, {}, None, None, {"gamma": 20, "drift_threshold": 0.25}, [], 0)


def test_empty_and_small_sets():
    X = np.zeros((0, 4), np.float32)
    assert len(cluster_sets(X, np.zeros(0, np.int64), 20, 0.3, 5, np.zeros(0, np.uint64))) == 0
    X, user, group = blobs(5)
    cid = cluster_behaviours(X, user, group, 20, 0.3, 20, 0)
    check_partition(cid, user, group, 20)
