"""bench/bench_levers.py: the tables it prints are the cells' figures (means, paired differences per seed and
per life-cycle quartile), and a cell is one real train + evaluate on a dataset."""
import json

import numpy as np
import pytest

from bench.bench_levers import ROWS, apply, cell, group_table, row_table, table


def _cell(model, seed, auc, gauc, gq):
    return {"row": "default", "model": model, "seed": seed, "auc": auc, "gauc": gauc,
            "groups": [{"group": k, "max_len": 10.0 * (k + 1), "auc": a, "gauc": g} for k, (a, g) in enumerate(gq)]}


def test_tables_are_means_and_paired_differences_of_the_cells():
    cells = [_cell("twin", 0, 0.60, 0.58, [(0.5, 0.5), (0.6, 0.6)]), _cell("twin", 1, 0.62, 0.60, [(0.5, 0.5), (0.7, 0.6)]),
             _cell("twinv2", 0, 0.63, 0.60, [(0.5, 0.6), (0.7, 0.7)]), _cell("twinv2", 1, 0.64, 0.61, [(0.6, 0.5), (0.8, 0.9)])]
    lines = {x["model"]: x for x in table(cells, "twin")}
    assert lines["twinv2"]["auc"] == pytest.approx(0.635)
    assert lines["twinv2"]["auc_std"] == pytest.approx(np.std([0.63, 0.64], ddof=1))
    assert lines["twinv2"]["d_auc"] == pytest.approx([0.03, 0.02])
    assert lines["twinv2"]["d_gauc"] == pytest.approx([0.02, 0.01])
    assert "d_auc" not in lines["twin"]
    g = {(x["model"], x["group"]): x for x in group_table(cells, "twin")}
    assert g["twinv2", 1]["d_auc"] == pytest.approx(0.1)             # ((0.7-0.6) + (0.8-0.7)) / 2
    assert g["twinv2", 1]["d_gauc"] == pytest.approx(0.2)            # ((0.7-0.6) + (0.9-0.6)) / 2
    assert g["twinv2", 0]["gauc"] == pytest.approx(0.55)


def test_row_table_pairs_each_row_with_the_reference_row_of_the_same_model():
    cells = [_cell("twinv2", 0, 0.60, 0.58, []), _cell("twinv2", 1, 0.62, 0.60, []), _cell("twin", 0, 0.50, 0.50, [])]
    cells += [{**_cell("twinv2", s, a, g, []), "row": "user_bias"} for s, a, g in ((0, 0.65, 0.57), (1, 0.66, 0.61))]
    cells += [{**_cell("twin", 1, 0.9, 0.9, []), "row": "user_bias"}]           # no twin seed 1 in the reference row
    d = row_table(cells, "default")
    assert [(x["row"], x["model"]) for x in d] == [("user_bias", "twinv2")]
    assert d[0]["d_auc"] == pytest.approx([0.05, 0.04]) and d[0]["d_gauc"] == pytest.approx([-0.01, 0.01])


def test_rows_apply_overrides_to_a_copy():
    p = {"model": {"virtual_mix": 8, "target_stats": True}, "train": {"seed": 0}}
    q = apply(p, {**ROWS["no_mix"], "train.seed": 2})
    assert q["model"]["virtual_mix"] == 0 and q["train"]["seed"] == 2 and p["model"]["virtual_mix"] == 8
    assert set(ROWS["paper"]) >= {"model.virtual_mix", "model.target_stats", "model.match_counts"}


def test_a_cell_trains_evaluates_and_is_not_recomputed(planted_ro, tmp_path):
    res = cell(str(planted_ro), "default", "avg_pool", 0, tmp_path)
    assert 0.5 < res["auc"] <= 1.0 and 0.0 <= res["gauc"] <= 1.0
    assert len(res["groups"]) == 4 and sum(1 for x in res["groups"] if x["auc"] is not None) >= 2
    f = tmp_path / "default" / "avg_pool" / "s0" / "cell.json"
    stored = json.loads(f.read_text())
    assert stored["auc"] == res["auc"]
    stored["auc"] = -1.0                                            # a finished cell is read, not recomputed
    f.write_text(json.dumps(stored))
    assert cell(str(planted_ro), "default", "avg_pool", 0, tmp_path)["auc"] == -1.0


def test_a_cell_computed_under_other_params_is_refused_not_reused(monkeypatch, tmp_path):
    """A stored cell carries its params key; params.yaml changed since (another key) is a clear error naming
    the cell; a cell written before keys were stored is read as it is."""
    import bench.bench_levers as bl
    from pipelines.benchmark import cell_key
    from twinv2.config import load_params

    f = tmp_path / "default" / "twin" / "s0" / "cell.json"
    f.parent.mkdir(parents=True)
    now = cell_key("twin", apply(load_params(), {"train.seed": 0, "train.progress": False}))
    f.write_text(json.dumps({"row": "default", "model": "twin", "seed": 0, "auc": 0.6, "gauc": 0.6, "groups": [],
                             "key": now}))
    assert cell("unused", "default", "twin", 0, tmp_path)["auc"] == 0.6          # same params: read
    real = bl.load_params
    monkeypatch.setattr(bl, "load_params", lambda: apply(real(), {"train.lr": 0.123}))
    with pytest.raises(ValueError, match=r"twin/s0/cell\.json: computed under other params"):
        cell("unused", "default", "twin", 0, tmp_path)
    legacy = json.loads(f.read_text())
    del legacy["key"]
    f.write_text(json.dumps(legacy))
    assert cell("unused", "default", "twin", 0, tmp_path)["auc"] == 0.6          # no key stored: as before
