"""The cluster stage on the project's tiny synthetic world (generate -> validate -> cluster)."""
from __future__ import annotations

import shutil

from pipelines import cluster
from tests.clustering.test_pipeline import check_version
from twinv2.clustering import store
from twinv2.clustering.embeddings import load_npz
from twinv2.io import read_json


def test_tiny_world_clusters(tiny_validated_ro, tmp_path, params):
    world = tmp_path / "w"
    shutil.copytree(tiny_validated_ro, world)
    rep = cluster.run(world, params=params)
    P = params["cluster"]
    W = read_json(world / "validated" / "meta.json")["history_end_ms"]
    emb = load_npz(store.version_dir(world, rep["version"]) / "embeddings.npz")
    check_version(world, rep["version"], W, P["gamma"], P["group_edges"], emb)
    assert rep["n_behaviors"] > 0 and rep["max_cluster_size"] <= P["gamma"]
    if "purity" in rep:
        assert 0 < rep["purity"] <= 1
    inc = cluster.run(world, incremental=True, params=params)
    check_version(world, inc["version"], inc["watermark"], P["gamma"], P["group_edges"])
