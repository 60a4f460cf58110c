"""The co-occurrence bootstrap embedding of a cluster version reads only behaviours before its watermark W
(pipelines/cluster.py `_compute_bootstrap`'s `ts < W` filter; issue 30: no test pinned it)."""
from __future__ import annotations

import numpy as np

from pipelines import cluster
from twinv2.data.store import read_table
from twinv2.io import read_json


def test_the_bootstrap_embedding_reads_only_behaviours_before_the_watermark(world, cparams, tmp_path, monkeypatch):
    val = world / "validated"
    W = int(read_json(val / "meta.json")["history_end_ms"])
    beh = read_table(val / "behaviors", "behaviors").to_pandas()
    assert (beh.ts >= W).sum() > 100 and (beh.ts < W).sum() > 100          # the filter has rows to drop
    real, seen = cluster.bootstrap, []

    def spy(chunks, *a, **k):
        chunks = list(chunks)
        seen.extend(chunks)
        return real(iter(chunks), *a, **k)

    monkeypatch.setattr(cluster, "bootstrap", spy)
    P = cparams["cluster"]
    emb = cluster._compute_bootstrap(val, W, P, "bootstrap-test", tmp_path / "e.npz")
    got = sorted(zip(np.concatenate([c["user_id"] for c in seen]).tolist(),
                     np.concatenate([c["item_id"] for c in seen]).tolist()))
    before = beh[beh.ts < W]
    assert got == sorted(zip(before.user_id.tolist(), before.item_id.tolist()))   # every row before W, none after
    # and the table equals the bootstrap of the plain before-W rows, user by user in time order
    before = before.sort_values(["user_id", "ts"], kind="stable")
    items = read_table(val / "items.parquet", "items")
    ref = real(iter([{"user_id": g.user_id.to_numpy(), "item_id": g.item_id.to_numpy()}
                     for _, g in before.groupby("user_id", sort=True)]),
               items.column("item_id").to_numpy(), items.column("category").to_numpy(), int(P["embedding_dim"]),
               int(P["seed"]), "bootstrap-test", int(P.get("cooc_window", 5)))
    ids = items.column("item_id").to_numpy()
    np.testing.assert_allclose(emb.lookup(ids), ref.lookup(ids), atol=1e-5)
