"""bench/bench_levers.py: the tables it prints are the cells' figures (valid and test: means, paired differences per
seed and per life-cycle quartile), a cell is one real train + evaluate on a dataset, and bench/choose.py chooses
among rows on the valid figures only (issue 30)."""
import json

import numpy as np
import pytest

from bench.bench_levers import ROWS, apply, cell, group_table, row_table, table, valid_at_best
from bench.choose import choose


def _cell(model, seed, auc, gauc, gq, vauc=0.5, vgauc=0.5):
    return {"row": "default", "model": model, "seed": seed, "auc": auc, "gauc": gauc, "valid_auc": vauc,
            "valid_gauc": vgauc, "groups": [{"group": k, "max_len": 10.0 * (k + 1), "auc": a, "gauc": g} for k, (a, g) in enumerate(gq)]}


def test_tables_are_means_and_paired_differences_of_the_cells():
    cells = [_cell("twin", 0, 0.60, 0.58, [(0.5, 0.5), (0.6, 0.6)]), _cell("twin", 1, 0.62, 0.60, [(0.5, 0.5), (0.7, 0.6)]),
             _cell("twinv2", 0, 0.63, 0.60, [(0.5, 0.6), (0.7, 0.7)]), _cell("twinv2", 1, 0.64, 0.61, [(0.6, 0.5), (0.8, 0.9)])]
    lines = {x["model"]: x for x in table(cells, "twin")}
    assert lines["twinv2"]["auc"] == pytest.approx(0.635)
    assert lines["twinv2"]["auc_std"] == pytest.approx(np.std([0.63, 0.64], ddof=1))
    assert lines["twinv2"]["d_auc"] == pytest.approx([0.03, 0.02])
    assert lines["twinv2"]["d_gauc"] == pytest.approx([0.02, 0.01])
    assert "d_auc" not in lines["twin"]
    cells[2]["valid_auc"], cells[3]["valid_auc"] = 0.70, 0.72       # valid figures are tabled beside the test ones
    lines = {x["model"]: x for x in table(cells, "twin")}
    assert lines["twinv2"]["valid_auc"] == pytest.approx(0.71) and lines["twinv2"]["d_valid_auc"] == pytest.approx([0.2, 0.22])
    assert lines["twinv2"]["auc"] == pytest.approx(0.635)
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


class TestOnly(dict):
    """A cell whose test figures explode when read: a choice that reads one fails."""

    ALLOWED = {"row", "model", "seed", "valid_auc", "valid_gauc"}

    def __getitem__(self, k):
        if k not in self.ALLOWED:
            raise AssertionError(f"a choice read {k!r}")
        return super().__getitem__(k)

    def get(self, k, default=None):
        if k not in self.ALLOWED:
            raise AssertionError(f"a choice read {k!r}")
        return super().get(k, default)


def _vcell(row, seed, vauc, vgauc, tauc):
    return TestOnly(row=row, model="twinv2", seed=seed, valid_auc=vauc, valid_gauc=vgauc, auc=tauc, gauc=tauc,
                    groups=[{"auc": tauc, "gauc": tauc}])


def test_a_choice_reads_valid_figures_only_and_follows_them_not_test():
    # on test, row b is far ahead; on valid, row a is: the choice is a, and no test figure is touched
    cells = [_vcell("a", s, 0.70, 0.68, 0.60) for s in (0, 1, 2)] + [_vcell("b", s, 0.69, 0.68, 0.99) for s in (0, 1, 2)]
    c = choose(cells, ["b", "a"], "twinv2")
    assert c["chosen"] == "a" and c["seeds"] == [0, 1, 2]
    assert c["score"]["a"] == pytest.approx(0.69) and c["vs_first"]["a"] == pytest.approx([0.005] * 3)
    assert choose(cells, ["b", "a"], "twinv2", "gauc")["chosen"] == "b"      # a tie goes to the incumbent
    nan = [TestOnly({**x, "auc": float("nan"), "gauc": float("nan")}) for x in cells]     # poisoned test figures
    assert choose(nan, ["a", "b"], "twinv2")["chosen"] == "a"
    assert choose(cells[:3] + cells[3:5], ["a", "b"], "twinv2")["seeds"] == [0, 1]       # seeds both rows have
    with pytest.raises(ValueError, match="has no valid figure 'valid_auc'"):          # a cell without valid figures
        choose([TestOnly({**cells[0], "valid_auc": None}), cells[3]], ["a", "b"], "twinv2")


def test_valid_figures_are_the_history_record_of_the_kept_epoch():
    rep = {"best_epoch": 2, "history": [{"epoch": 1, "valid_auc": 0.6, "valid_gauc": 0.5},
                                        {"epoch": 2, "valid_auc": 0.7, "valid_gauc": 0.65},
                                        {"epoch": 3, "valid_auc": 0.8, "valid_gauc": 0.6}]}
    assert valid_at_best(rep) == {"valid_auc": 0.7, "valid_gauc": 0.65}
    with pytest.raises(ValueError, match="best_epoch 4"):
        valid_at_best({**rep, "best_epoch": 4})


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
    hist = json.loads((f.parent / "run" / "train_metrics.json").read_text())
    kept = [h for h in hist["history"] if h["epoch"] == hist["best_epoch"]][0]
    assert (res["valid_auc"], res["valid_gauc"]) == (kept["valid_auc"], kept["valid_gauc"])
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
                             "valid_auc": 0.6, "valid_gauc": 0.6, "key": now}))
    assert cell("unused", "default", "twin", 0, tmp_path)["auc"] == 0.6          # same params: read
    real = bl.load_params
    monkeypatch.setattr(bl, "load_params", lambda: apply(real(), {"train.lr": 0.123}))
    with pytest.raises(ValueError, match=r"twin/s0/cell\.json: computed under other params"):
        cell("unused", "default", "twin", 0, tmp_path)
    legacy = json.loads(f.read_text())
    del legacy["key"]
    f.write_text(json.dumps(legacy))
    assert cell("unused", "default", "twin", 0, tmp_path)["auc"] == 0.6          # no key stored: as before
    legacy = json.loads(f.read_text())
    del legacy["valid_auc"]
    f.write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="before cells stored their valid figures"):     # recomputed, not faked
        cell("unused", "default", "twin", 0, tmp_path)
