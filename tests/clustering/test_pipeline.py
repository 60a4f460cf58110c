"""The cluster stage: versions, CURRENT, report, shards + finalize, incremental, embeddings, errors."""
from __future__ import annotations

import copy
import multiprocessing as mp
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import cluster
from tests.clustering.conftest import DAY, make_world
from twinv2.clustering import store
from twinv2.clustering.embeddings import ItemEmbedding, load_npz
from twinv2.clustering.grouping import completion, group_of
from twinv2.data.store import read_table
from twinv2.io import read_json


def behaviours(world):
    return read_table(world / "validated" / "behaviors", "behaviors").to_pandas()


def check_version(world, version, W, gamma, edges, emb=None):
    """All invariants of a cluster version against the validated behaviours."""
    cv = store.load_clusters(world, version)
    cl, mem = cv.clusters.to_pandas(), cv.members.to_pandas()
    beh = behaviours(world)
    before = beh[beh.ts < W].reset_index(drop=True)
    # coverage: every behaviour before W exactly once, nothing at or after W
    assert len(mem) == len(before)
    assert (mem.ts < W).all()
    a = mem.sort_values(["user_id", "ts", "item_id"]).reset_index(drop=True)
    b = before.sort_values(["user_id", "ts", "item_id"]).reset_index(drop=True)
    assert (a[["user_id", "ts", "item_id"]].to_numpy() == b[["user_id", "ts", "item_id"]].to_numpy()).all()
    # cluster table consistent with the map
    assert not cl.duplicated(["user_id", "cluster_id"]).any()
    sizes = mem.groupby(["user_id", "cluster_id"]).size()
    cl_i = cl.set_index(["user_id", "cluster_id"])
    assert (cl_i["size"].loc[sizes.index] == sizes).all() and len(sizes) == len(cl)
    assert cl["size"].max() <= gamma
    # group purity and means vs brute force
    num = [c for c in ["ts", "play_ms", "duration_ms", "liked", "rating"] if c in before.columns]
    mem = mem.assign(**{c: before[c].to_numpy() for c in num if c != "ts"})   # members: behaviour order
    mem["group"] = group_of(completion(mem.play_ms, mem.duration_ms), edges)
    g = mem.groupby(["user_id", "cluster_id"])
    assert (g["group"].nunique() == 1).all()
    assert (g["group"].first() == cl_i["group"].loc[g.size().index]).all()
    for col in num:
        np.testing.assert_allclose(cl_i[col].loc[g.size().index].to_numpy(), g[col].mean().to_numpy(), rtol=1e-9)
    if emb is not None:   # representative = member nearest the centroid
        for (u, c), grp in list(g)[:40]:
            X = emb.lookup(grp.item_id.to_numpy()).astype(np.float64)
            cen = np.asarray(cl_i.loc[(u, c), "centroid"], np.float64)
            np.testing.assert_allclose(cen, X.mean(0), atol=1e-5)
            d = ((X - cen) ** 2).sum(1)
            rep = cl_i.loc[(u, c), "item_id"]
            assert d[grp.item_id.to_numpy() == rep].min() <= d.min() + 1e-6
    return cv


def test_full_run_invariants_and_report(world, cparams):
    rep = cluster.run(world, params=cparams)
    P = cparams["cluster"]
    W = read_json(world / "validated" / "meta.json")["history_end_ms"]
    assert rep["watermark"] == W and store.current_version(world) == rep["version"]
    emb = load_npz(store.version_dir(world, rep["version"]) / "embeddings.npz")
    check_version(world, rep["version"], W, P["gamma"], P["group_edges"], emb)
    disk = read_json(world / "reports" / "cluster.json")
    for k in ["n_users", "n_behaviors", "n_clusters", "compression_ratio", "max_cluster_size", "mean_inertia",
              "watermark", "version", "size_hist", "purity", "timings"]:
        assert k in disk
    assert disk["n_behaviors"] == sum(h * (i + 1) for i, h in enumerate(disk["size_hist"]))
    assert disk["n_clusters"] == sum(disk["size_hist"])
    assert disk["compression_ratio"] > 5
    assert disk["purity"] > 0.6
    man = read_json(store.version_dir(world, rep["version"]) / "manifest.json")
    assert man["embedding"]["version"].startswith("bootstrap-") and man["params"]["gamma"] == P["gamma"]
    assert man["data_version"] and man["watermark"] == W
    # same inputs again: same version, nothing rebuilt
    assert cluster.run(world, params=cparams)["version"] == rep["version"]


def test_process_pool_equals_single_process(world, cparams, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(world, other)
    a = cluster.run(world, params=cparams)
    p2 = copy.deepcopy(cparams)
    p2["cluster"]["n_jobs"] = 2
    b = cluster.run(other, params=p2)
    assert a["version"] == b["version"]
    ta, tb = store.load_clusters(world), store.load_clusters(other)
    assert ta.members.equals(tb.members) and ta.clusters.equals(tb.clusters)


def test_shards_then_finalize_equal_unsharded(world, cparams, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(world, other)
    full = cluster.run(world, params=cparams)
    p2 = copy.deepcopy(cparams)
    p2["cluster"]["finalize_last_shard"] = False
    parts = [cluster.run(other, shard=f"{i}/3", params=p2) for i in range(3)]
    assert all(p["pending"] for p in parts) and store.current_version(other) is None
    assert {p["version"] for p in parts} == {full["version"]}
    rep = cluster.finalize(other, full["version"], p2)
    assert store.current_version(other) == full["version"]
    assert rep["n_behaviors"] == full["n_behaviors"] and rep["n_clusters"] == full["n_clusters"]
    assert rep["mean_inertia"] == pytest.approx(full["mean_inertia"])
    key = ["user_id", "cluster_id"]
    a = store.load_clusters(world).clusters.to_pandas().sort_values(key).reset_index(drop=True)
    b = store.load_clusters(other).clusters.to_pandas().sort_values(key).reset_index(drop=True)
    assert a.drop(columns="centroid").equals(b.drop(columns="centroid"))
    ma = store.load_clusters(world).members.to_pandas().sort_values(["user_id", "ts", "item_id"])
    mb = store.load_clusters(other).members.to_pandas().sort_values(["user_id", "ts", "item_id"])
    assert (ma.to_numpy() == mb.to_numpy()).all()
    assert not store.pending_dir(other, full["version"]).exists()
    assert cluster.finalize(other, full["version"], p2)["version"] == full["version"]   # idempotent


def test_last_shard_publishes(world, cparams):
    reps = [cluster.run(world, shard=f"{i}/2", params=cparams) for i in range(2)]
    assert reps[0]["pending"] and "pending" not in reps[1]
    assert store.current_version(world) == reps[1]["version"]


def _killed_run(world, params):
    import pipelines.cluster as pc
    from twinv2.clustering import store as st

    real = st.write_part
    calls = {"n": 0}

    def dying(path, table):
        calls["n"] += 1
        if calls["n"] == 3:
            os._exit(9)                                                   # like a SIGKILL midway
        real(path, table)

    pc.store.write_part = dying
    pc.run(world, params=params, watermark=params["_W"])


def test_killed_run_leaves_current_on_previous_version(world, cparams):
    first = cluster.run(world, params=cparams)
    p2 = copy.deepcopy(cparams)
    p2["_W"] = first["watermark"] - DAY
    proc = mp.get_context("fork").Process(target=_killed_run, args=(world, p2))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 9
    assert store.current_version(world) == first["version"]
    assert store.list_versions(world) == [first["version"]]
    assert store.load_clusters(world).version == first["version"]
    # the next run completes and switches
    second = cluster.run(world, params=cparams, watermark=first["watermark"] - DAY)
    assert store.current_version(world) == second["version"] != first["version"]


def test_incremental_keeps_invariants_and_quality(world, cparams, tmp_path):
    P = cparams["cluster"]
    first = cluster.run(world, params=cparams)
    W1 = first["watermark"] + DAY
    inc = cluster.run(world, incremental=True, params=cparams, watermark=W1)
    assert inc["incremental"] and inc["base_version"] == first["version"]
    st = inc["incremental_stats"]
    assert st["new_behaviors"] > 0 and st["users_updated"] > 0
    emb = load_npz(store.version_dir(world, inc["version"]) / "embeddings.npz")
    check_version(world, inc["version"], W1, P["gamma"], P["group_edges"], emb)
    # untouched users keep their clusters unchanged
    # full rebuild at the same watermark: same coverage, similar quality
    other = tmp_path / "full"
    shutil.copytree(world, other)
    shutil.rmtree(other / "clusters")
    full = cluster.run(other, params=cparams, watermark=W1)
    assert inc["n_behaviors"] == full["n_behaviors"]
    assert inc["mean_inertia"] <= 1.10 * full["mean_inertia"]
    # a second step chains from the first
    inc2 = cluster.run(world, incremental=True, params=cparams)
    assert inc2["watermark"] == W1 + P["incremental_step_ms"] and inc2["base_version"] == inc["version"]
    check_version(world, inc2["version"], inc2["watermark"], P["gamma"], P["group_edges"])


def test_incremental_drift_and_new_users(tmp_path, cparams):
    world = make_world(tmp_path / "w", n_users=12, lengths=(30, 200))
    first = cluster.run(world, params=cparams, watermark=1_700_000_000_000 + 5 * DAY)
    p2 = copy.deepcopy(cparams)
    p2["cluster"]["drift_threshold"] = 0.25
    inc = cluster.run(world, incremental=True, params=p2, watermark=1_700_000_000_000 + 25 * DAY)
    st = inc["incremental_stats"]
    assert st["users_rebuilt"] + st["users_new"] == inc["n_users"]     # 20 new days on 5 old: all drift
    check_version(world, inc["version"], 1_700_000_000_000 + 25 * DAY, 20, p2["cluster"]["group_edges"])


def test_embeddings_file_and_version_change_rebuild(world, cparams, tmp_path):
    items = read_table(world / "validated" / "items.parquet", "items").column("item_id").to_numpy()
    rng = np.random.default_rng(0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ItemEmbedding(np.sort(items), rng.normal(size=(len(items), 8)).astype(np.float32), "run1-abc",
                  "test").save(run_dir / "item_embeddings.npz")
    first = cluster.run(world, params=cparams, embeddings=str(run_dir))
    man = read_json(store.version_dir(world, first["version"]) / "manifest.json")
    assert man["embedding"]["version"] == "run1-abc" and man["embedding"]["dim"] == 8
    ItemEmbedding(np.sort(items), rng.normal(size=(len(items), 8)).astype(np.float32), "run2-def",
                  "test").save(run_dir / "item_embeddings.npz")
    inc = cluster.run(world, incremental=True, params=cparams, embeddings=str(run_dir / "item_embeddings.npz"))
    assert inc["incremental_stats"]["users_rebuilt"] == inc["n_users"]
    # a trained model's weights: the item table of model.pt, mapped to ids by the run's vocab.npz
    import torch

    from twinv2.training.samples import Vocab

    items_df = read_table(world / "validated" / "items.parquet", "items").to_pandas()
    Vocab.build(items_df).save(run_dir / "vocab.npz")
    table = torch.randn(len(items) + 2, 8)
    torch.save({"features.item.weight": table, "head.bias": torch.zeros(1)}, run_dir / "model.pt")
    third = cluster.run(world, incremental=True, params=cparams, embeddings=str(run_dir / "model.pt"))
    man = read_json(store.version_dir(world, third["version"]) / "manifest.json")
    assert man["embedding"]["source"] == str(run_dir / "model.pt") and man["embedding"]["version"].startswith("run-")
    assert third["incremental_stats"]["users_rebuilt"] == third["n_users"]          # a new embedding version
    used = load_npz(store.version_dir(world, third["version"]) / "embeddings.npz")
    assert np.allclose(used.emb, table[1:len(items) + 1].numpy())


def test_clear_errors(tmp_path, cparams, world):
    with pytest.raises(FileNotFoundError, match="validated"):
        cluster.run(tmp_path / "nothing", params=cparams)
    with pytest.raises(FileNotFoundError, match="CURRENT"):
        cluster.run(world, incremental=True, params=cparams)
    bad = tmp_path / "bad.npz"
    np.savez(bad, item_id=np.arange(3), emb=np.zeros((2, 4)), version=np.array("x"))
    with pytest.raises(ValueError, match="bad.npz"):
        cluster.run(world, params=cparams, embeddings=str(bad))
    with pytest.raises(ValueError, match="I/N"):
        cluster.run(world, params=cparams, shard="3")


def test_cli(world, capsys):
    from pipelines.cli import main

    assert main(["--set", "cluster.n_jobs=1", "cluster", "--data", str(world)]) == 0
    assert "clusters" in capsys.readouterr().out
    assert main(["cluster", "--data", str(world / "missing")]) == 2


def test_watermark_before_all_behaviours_gives_empty_version(world, cparams):
    rep = cluster.run(world, params=cparams, watermark=1)
    assert rep["n_behaviors"] == 0 and rep["n_clusters"] == 0
    cv = store.load_clusters(world)
    assert len(cv.clusters) == 0 and len(cv.members) == 0 and "centroid" in cv.clusters.column_names


def test_incremental_from_sharded_base_updates_in_place(world, cparams):
    """Parts of a sharded base interleave users: the update must still match every user's members."""
    P = cparams["cluster"]
    for i in range(3):
        base = cluster.run(world, shard=f"{i}/3", params=cparams)
    assert store.current_version(world) == base["version"]
    inc = cluster.run(world, incremental=True, params=cparams)
    st = inc["incremental_stats"]
    assert st["users_rebuilt"] == 0 and st["users_new"] == 0 and st["users_updated"] > 0
    check_version(world, inc["version"], inc["watermark"], P["gamma"], P["group_edges"])


def test_shards_starting_together_compute_the_bootstrap_embedding_once(world, cparams, monkeypatch):
    """Two shards of a full build start at the same moment with no cached embedding: one computes the
    co-occurrence bootstrap, the other waits on the lock and loads it (the same table, one computation)."""
    import threading
    import time

    real, calls = cluster.bootstrap, []

    def slow_bootstrap(*a, **k):                    # long enough for the other shard to miss the cache
        calls.append(threading.get_ident())
        time.sleep(0.5)
        return real(*a, **k)

    monkeypatch.setattr(cluster, "bootstrap", slow_bootstrap)
    reps, errors = {}, []

    def shard(i):
        try:
            reps[i] = cluster.run(world, shard=f"{i}/2", params=cparams)
        except Exception as e:                      # surfaced below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    assert reps[0]["version"] == reps[1]["version"]
    assert store.current_version(world) == reps[0]["version"]       # the shard completing the set published it
    emb = load_npz(store.version_dir(world, reps[0]["version"]) / "embeddings.npz")
    assert emb.version.startswith("bootstrap-")
