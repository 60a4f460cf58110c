"""Metrics against plain references."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import roc_auc_score

from twinv2.metrics.ctr import auc, calibration, gauc, gauc_reference, logloss
from twinv2.metrics.diversity import list_diversity, ranking_diversity, retrieval_diversity, top_n_list
from twinv2.metrics.groups import by_group, length_groups


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 300), st.integers(1, 20), st.booleans())
def test_gauc_matches_per_user_loop(seed, n, n_users, ties):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, n_users, n)
    y = rng.integers(0, 2, n)
    s = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
    got = gauc(u, y, s)
    ref = gauc_reference(u, y, s)
    if ref is None:
        assert got["gauc"] is None
    else:
        assert got["gauc"] == pytest.approx(ref, abs=1e-12)


def test_gauc_weights_and_skips():
    # user 0: perfect (AUC 1, 4 impressions); user 1: inverted (AUC 0, 2 impressions); user 2 one class
    u = [0, 0, 0, 0, 1, 1, 2, 2, 2]
    y = [1, 0, 1, 0, 1, 0, 1, 1, 1]
    s = [.9, .1, .8, .2, .1, .9, .5, .5, .5]
    g = gauc(u, y, s)
    assert g["gauc"] == pytest.approx((4 * 1 + 2 * 0) / 6)
    assert g["n_users"] == 2 and g["n_skipped"] == 1 and g["n_impressions"] == 6


def test_auc_logloss_plain():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = rng.uniform(size=500)
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p))
    ref = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert logloss(y, p) == pytest.approx(ref, rel=1e-9)
    assert auc([1, 1], [0.1, 0.2]) is None
    with pytest.raises(ValueError, match="non-finite"):
        auc([0, 1], [np.nan, 1])
    with pytest.raises(ValueError, match="differ"):
        auc([0, 1], [0.1])


def test_calibration_counts_add_up():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=1000)
    y = (rng.uniform(size=1000) < p).astype(int)
    c = calibration(y, p, n_bins=10)
    assert sum(c["count"]) == 1000
    assert c["ece"] < 0.08


def test_length_groups_and_by_group():
    lens = np.arange(1, 101)
    g, edges = length_groups(lens, 4)
    assert np.bincount(g).tolist() == [25, 25, 25, 25]
    assert edges[0] == 1 and edges[-1] == 100
    users = np.repeat(np.arange(100), 4)
    y = np.tile([0, 1, 0, 1], 100)
    s = np.where(users >= 75, y, 1 - y) + 0.0          # longest quarter perfect, the rest inverted
    out = by_group(users, y, s, (np.arange(100), lens), 4)
    assert [o["n_users"] for o in out] == [25, 25, 25, 25]
    assert sum(o["n_impressions"] for o in out) == 400
    assert out[3]["gauc"] == 1.0 and out[0]["gauc"] == 0.0 and out[3]["auc"] == 1.0


def test_diversity_definitions():
    r = retrieval_diversity(np.array([[1, 1, 2, 0], [3, 3, 3, 3]]), np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool))
    assert r["distinct_categories"] == pytest.approx((2 + 1) / 2)
    h = -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    assert r["entropy"] == pytest.approx(h / 2)
    d = list_diversity(np.array([1, 1, 2, 3]), n_categories=10)
    assert d["coverage"] == pytest.approx(3 / 4)
    assert d["ild"] == pytest.approx(1 - 1 / 6)
    assert top_n_list(np.array([0.1, 0.9, 0.5, 0.9]), 3).tolist() == [1, 3, 2]
    rk = ranking_diversity([np.array([1, 2]), np.array([1, 1])], n_categories=4)
    assert rk["coverage"] == pytest.approx((1 + 0.5) / 2) and rk["catalogue_coverage"] == 0.5
