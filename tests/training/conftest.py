"""A tiny world that is validated, clustered, and given planted labels (fast to learn), shared by the
training tests. Small model/training params keep every test in seconds."""
from __future__ import annotations

import copy
import shutil

import numpy as np
import pandas as pd
import pytest

SMALL_MODEL = {"embed_dim": 16, "side_dim": 8, "cross_dim": 4, "n_heads": 2, "head_dim": 8, "topk": 16,
               "short_len": 8, "twin_window": 48, "twin_full_len": 2500, "din_len": 48, "din_att_mlp": [16],
               "mlp": [32], "sim_soft_dim": 8, "eta_bits": 16, "sdim_hashes": 3, "sdim_width": 2, "hash_seed": 0}


@pytest.fixture()
def small_params(params):
    p = copy.deepcopy(params)
    p["model"].update(SMALL_MODEL)
    p["train"].update(lr=0.005, batch_size=128, epochs=4, patience=10, progress=False, num_workers=0)
    p["evaluate"].update(diversity_users=10, diversity_pool=50, plots=True)
    return p


def _recent_and_old_categories(data, window: int):
    """Per user: categories among the last `window` behaviours before the history end, and those seen
    earlier than them."""
    from twinv2.data.schema import DatasetPaths
    from twinv2.data.store import read_table
    import json

    paths = DatasetPaths(data)
    meta = json.loads((paths.stage("validated") / "meta.json").read_text())
    W = meta["history_end_ms"]
    items = read_table(paths.items("validated"), "items").to_pandas().set_index("item_id")["category"]
    beh = read_table(paths.behaviors("validated"), "behaviors").to_pandas()[["user_id", "item_id", "ts"]]
    beh = beh[beh.ts < W].sort_values(["user_id", "ts"])
    beh["category"] = items.reindex(beh.item_id).to_numpy()
    recent, old = {}, {}
    for u, g in beh.groupby("user_id"):
        r = set(g.category.iloc[-window:])
        recent[u] = r
        old[u] = set(g.category.iloc[:-window])
    return items, recent, old


def _relabel(data, rule) -> None:
    from twinv2.data.schema import DatasetPaths
    from twinv2.data.store import read_table, write_table

    paths = DatasetPaths(data)
    imp = read_table(paths.impressions("validated"), "impressions").to_pandas()
    imp["label"] = rule(imp).astype(np.int8)
    imp["p_true"] = imp["label"].astype(np.float32)          # the planted rule is the oracle
    write_table(paths.impressions("validated"), imp, "impressions")


@pytest.fixture(scope="session")
def clustered_ro(tmp_path_factory, tiny_validated_ro, params):
    """The tiny world, validated and clustered (read-only)."""
    from pipelines import cluster

    dest = tmp_path_factory.mktemp("tinyc") / "world"
    shutil.copytree(tiny_validated_ro, dest)
    cluster.run(data=dest, params=params)
    return dest


@pytest.fixture(scope="session")
def planted_ro(tmp_path_factory, clustered_ro):
    """Label = 1 iff the target's category is among the user's last 48 behaviours before the history
    end (a signal every model's long part -- and, partly, its short part -- can read)."""
    dest = tmp_path_factory.mktemp("planted") / "world"
    shutil.copytree(clustered_ro, dest)
    items, recent, _ = _recent_and_old_categories(dest, 48)
    cat = items.reindex

    def rule(imp):
        c = cat(imp.item_id).to_numpy()
        return np.array([ci in recent.get(u, ()) for u, ci in zip(imp.user_id, c)])

    _relabel(dest, rule)
    return dest


@pytest.fixture(scope="session")
def dormant_ro(tmp_path_factory, clustered_ro):
    """Label = 1 iff the target's category was watched by the user before the last 48 behaviours (TWIN's
    recent window): only a model that reads the whole life cycle sees all of that history; TWIN sees
    it only where those categories came back recently."""
    dest = tmp_path_factory.mktemp("dormant") / "world"
    shutil.copytree(clustered_ro, dest)
    items, _, old = _recent_and_old_categories(dest, 48)
    cat = items.reindex

    def rule(imp):
        c = cat(imp.item_id).to_numpy()
        return np.array([ci in old.get(u, ()) for u, ci in zip(imp.user_id, c)])

    _relabel(dest, rule)
    return dest
