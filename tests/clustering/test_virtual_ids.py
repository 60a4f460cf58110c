"""The clustering ablation switches: cluster.virtual_ids (nearest | random | majority) against a plain
per-cluster loop, and cluster.method flat (one k-means level, as many clusters per root set as the
hierarchical method) against its contract; both through the stage."""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest

from twinv2.clustering.hierarchical import cluster_behaviours
from twinv2.clustering.kmeans import root_keys, uniforms
from twinv2.clustering.virtual_items import _RANDOM_SALT, virtual_items


def _members(seed=0, n=400, n_users=6):
    rng = np.random.default_rng(seed)
    user = np.sort(rng.integers(1, n_users + 1, n)).astype(np.int64)
    cluster = rng.integers(0, 9, n).astype(np.int32)
    group = (cluster % 3).astype(np.int8)                         # one group per (user, cluster)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    X[rng.random(n) < 0.2] = X[0]                                 # ties in distance
    ids = {"item_id": rng.integers(1, 6, n).astype(np.int64),      # few values: many frequency ties
           "author_id": rng.integers(1, 4, n).astype(np.int64),
           "category": rng.integers(1, 3, n).astype(np.int32)}
    numeric = {"ts": np.arange(n, dtype=np.float64), "play_ms": rng.random(n)}
    return user, cluster, group, X, numeric, ids


def _loop(user, cluster, X, ids, rule, seed):
    """The ids of each (user, cluster), one cluster at a time, in (user, cluster id) order."""
    out = {k: [] for k in ids}
    for u in np.unique(user):
        for c in np.unique(cluster[user == u]):
            rows = np.flatnonzero((user == u) & (cluster == c))          # members in input order
            if rule == "nearest":
                cent = X[rows].astype(np.float64).mean(0)
                d = [float(((X[r].astype(np.float64) - cent) ** 2).sum()) for r in rows]
                rep = rows[int(np.argmin(d))]                              # argmin: first of the tied
                for k in ids:
                    out[k].append(ids[k][rep])
            elif rule == "random":
                key = root_keys(seed ^ _RANDOM_SALT, np.array([u]), np.array([c]))
                j = int(uniforms(key, 1)[0, 0] * len(rows))
                for k in ids:
                    out[k].append(ids[k][rows[j]])
            else:
                for k in ids:
                    vals = [ids[k][r] for r in rows]
                    cnt = Counter(vals)
                    top = max(cnt.values())
                    out[k].append(next(v for v in vals if cnt[v] == top))   # earliest member among the tied
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("rule", ["nearest", "random", "majority"])
def test_virtual_ids_equal_a_per_cluster_loop(rule):
    for seed in (0, 1):
        user, cluster, group, X, numeric, ids = _members(seed)
        got = virtual_items(user, cluster, group, X, numeric, ids, rule=rule, seed=seed)
        want = _loop(user, cluster, X, ids, rule, seed)
        for k in ids:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{rule} {k}")
        # the numeric columns do not depend on the rule
        ref = virtual_items(user, cluster, group, X, numeric, ids)
        np.testing.assert_array_equal(got["ts"], ref["ts"])


def test_majority_and_random_are_not_nearest():
    user, cluster, group, X, numeric, ids = _members(3)
    near = virtual_items(user, cluster, group, X, numeric, ids)
    for rule in ("random", "majority"):
        got = virtual_items(user, cluster, group, X, numeric, ids, rule=rule)
        assert (got["item_id"] != near["item_id"]).any(), rule


def test_random_member_is_independent_of_the_chunk_and_depends_on_the_seed():
    user, cluster, group, X, numeric, ids = _members(4)
    whole = virtual_items(user, cluster, group, X, numeric, ids, rule="random", seed=5)
    parts = []
    for users in ([1, 2, 3], [4, 5, 6]):                           # two "shards" of complete users
        m = np.isin(user, users)
        parts.append(virtual_items(user[m], cluster[m], group[m], X[m], {k: v[m] for k, v in numeric.items()},
                                   {k: v[m] for k, v in ids.items()}, rule="random", seed=5))
    for k in ids:
        np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))
    other = virtual_items(user, cluster, group, X, numeric, ids, rule="random", seed=6)
    assert (other["item_id"] != whole["item_id"]).any()


def test_unknown_rule_names_the_param():
    user, cluster, group, X, numeric, ids = _members()
    with pytest.raises(ValueError, match=r"cluster\.virtual_ids.*nearest \| random \| majority.*'mode'"):
        virtual_items(user, cluster, group, X, numeric, ids, rule="mode")


# ------------------------------------------------------------------ flat k-means
def _points(seed=0, n_users=5):
    rng = np.random.default_rng(seed)
    users, groups, xs = [], [], []
    for u in range(1, n_users + 1):
        L = int(rng.integers(3, 300))
        users.append(np.full(L, u * 10))
        groups.append(rng.integers(0, 3, L))
        centres = rng.normal(size=(6, 8)) * 3
        x = centres[rng.integers(0, 6, L)] + rng.normal(size=(L, 8)) * 0.3
        x[rng.random(L) < 0.15] = x[0]                               # duplicates (empty k-means parts)
        xs.append(x)
    return (np.concatenate(xs).astype(np.float32), np.concatenate(users).astype(np.int64),
            np.concatenate(groups).astype(np.int8))


def _per_root(cid, user, group):
    return {(int(u), int(g)): len(np.unique(cid[(user == u) & (group == g)]))
            for u, g in set(zip(user.tolist(), group.tolist()))}


@pytest.mark.parametrize("gamma", [5, 20])
def test_flat_has_the_hierarchical_cluster_count_per_root(gamma):
    X, user, group = _points()
    h = cluster_behaviours(X, user, group, gamma, 0.3, 20, 0)
    f = cluster_behaviours(X, user, group, gamma, 0.3, 20, 0, method="flat")
    assert (f >= 0).all() and len(f) == len(X)                          # every point assigned
    assert _per_root(f, user, group) == _per_root(h, user, group)      # same count per (user, group)
    for u in np.unique(user):
        ids = np.unique(f[user == u])
        np.testing.assert_array_equal(ids, np.arange(len(ids)))        # ids per user 0..c-1
        for c in ids:                                                   # a cluster never mixes groups
            assert len(np.unique(group[(user == u) & (f == c)])) == 1
    np.testing.assert_array_equal(f, cluster_behaviours(X, user, group, gamma, 0.3, 20, 0, method="flat"))
    assert not np.array_equal(f, cluster_behaviours(X, user, group, gamma, 0.3, 20, 1, method="flat"))
    # one level: flat's parts are not bounded by gamma, the hierarchical ones are
    sizes_h = np.unique(user * 1000 + h, return_counts=True)[1]
    sizes_f = np.unique(user * 1000 + f, return_counts=True)[1]
    assert sizes_h.max() <= gamma and sizes_f.max() > gamma


def test_flat_fills_every_part_with_identical_points():
    X = np.zeros((60, 4), np.float32)                                   # all identical: k-means leaves parts empty
    user = np.ones(60, np.int64)
    group = np.zeros(60, np.int8)
    h = cluster_behaviours(X, user, group, 7, 0.3, 20, 0)
    f = cluster_behaviours(X, user, group, 7, 0.3, 20, 0, method="flat")
    assert len(np.unique(f)) == len(np.unique(h)) >= 9


def test_unknown_method_names_the_param():
    X, user, group = _points()
    with pytest.raises(ValueError, match=r"cluster\.method.*hierarchical \| flat.*'tree'"):
        cluster_behaviours(X, user, group, 5, 0.3, 20, 0, method="tree")


# ------------------------------------------------------------------ the stage
def test_stage_records_the_switches_and_flat_refuses_incremental(world, cparams):
    from pipelines import cluster
    from twinv2.io import read_json

    base = cluster.run(data=world, params=cparams)
    p = copy.deepcopy(cparams)
    p["cluster"].update(virtual_ids="nearest", method="hierarchical")
    assert cluster.run(data=world, params=p)["version"] == base["version"]   # defaults: same version name
    p["cluster"].update(virtual_ids="majority", method="flat")
    rep = cluster.run(data=world, params=p)
    assert rep["version"] != base["version"]
    man = read_json(world / "clusters" / rep["version"] / "manifest.json")
    assert man["params"]["virtual_ids"] == "majority" and man["params"]["method"] == "flat"
    assert rep["n_clusters"] == base["n_clusters"]                        # same count per (user, group)
    assert rep["max_cluster_size"] > cparams["cluster"]["gamma"]
    with pytest.raises(ValueError, match=r"cluster\.method is 'flat'.*incremental"):
        cluster.run(data=world, params=p, incremental=True)
    p["cluster"]["virtual_ids"] = "centroid"
    with pytest.raises(ValueError, match=r"cluster\.virtual_ids"):
        cluster.run(data=world, params=p)


def test_incremental_keeps_the_virtual_id_rule(world, cparams):
    """An incremental update re-chooses the ids of its updated clusters by the same rule as a full run over
    the same members."""
    from pipelines import cluster
    from twinv2.clustering import store
    from twinv2.clustering.chunk import Catalogue
    from twinv2.data.store import read_table
    from twinv2.io import read_json

    meta = read_json(world / "validated" / "meta.json")
    W0 = meta["history_end_ms"] - 3 * 86_400_000
    p = copy.deepcopy(cparams)
    p["cluster"].update(virtual_ids="majority", drift_threshold=1.0)
    cluster.run(data=world, params=p, watermark=W0)
    rep = cluster.run(data=world, params=p, incremental=True, watermark=meta["history_end_ms"])
    assert rep["incremental_stats"]["users_updated"] > 0
    vdir = store.version_dir(world, rep["version"])
    cl = store.read_parts(vdir / "clusters").to_pandas()
    mem = store.read_parts(vdir / "members").to_pandas()
    cat = Catalogue.from_table(read_table(world / "validated" / "items.parquet", "items"))
    a, c = cat.lookup(mem["item_id"].to_numpy())
    mem["author_id"], mem["category"] = a, c
    mem = mem.sort_values(["user_id", "ts"], kind="stable")
    want = _loop(mem["user_id"].to_numpy(), mem["cluster_id"].to_numpy(), None,
                 {k: mem[k].to_numpy() for k in ("item_id", "author_id", "category")}, "majority", 0)
    cl = cl.sort_values(["user_id", "cluster_id"])
    for k in ("item_id", "author_id", "category"):
        np.testing.assert_array_equal(cl[k].to_numpy(), want[k], err_msg=k)
