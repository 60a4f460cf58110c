"""The benchmark's paper ablations (no_log_n, flat, vi_random, vi_majority) and the cost table's
multiply-adds per candidate, without training anything (the end-to-end run is test_benchmark.py)."""
from __future__ import annotations

import copy
import json

import pytest

from pipelines import benchmark

NEW = {"no_log_n": {"model.log_n": False}, "flat": {"cluster.method": "flat"},
       "vi_random": {"cluster.virtual_ids": "random"}, "vi_majority": {"cluster.virtual_ids": "majority"}}


def test_ablation_variants_exist_but_do_not_run_by_default(params):
    st = benchmark.settings(params)
    for name, ov in NEW.items():
        assert st["variants"][name] == ov
        assert name not in st["run_variants"]
    assert params["model"]["log_n"] is True
    assert params["cluster"]["method"] == "hierarchical" and params["cluster"]["virtual_ids"] == "nearest"
    default_run = {c["variant"] for c in benchmark.plan(params, models="twinv2", seeds=1)}
    assert not default_run & set(NEW)
    asked = benchmark.plan(params, models="twinv2", seeds=1, variants=",".join(NEW))
    assert [c["variant"] for c in asked] == ["default", *NEW]


def test_switches_at_their_default_keep_a_cell_key(params):
    """A cell computed before the switches existed (no such keys) stays done; a non-default value is
    another cell."""
    old = copy.deepcopy(params)
    del old["model"]["log_n"], old["cluster"]["method"], old["cluster"]["virtual_ids"]
    assert benchmark.cell_key("twinv2", old) == benchmark.cell_key("twinv2", params)
    for ov in NEW.values():
        other = benchmark.load_params_from(params, ov)
        assert benchmark.cell_key("twinv2", other) != benchmark.cell_key("twinv2", params), ov


def test_cluster_version_name_ignores_default_switches():
    from pipelines.cluster import name_params

    P = {"gamma": 20, "seed": 0, "n_jobs": 2}
    assert name_params({**P, "method": "hierarchical", "virtual_ids": "nearest"}) == {"gamma": 20, "seed": 0}
    assert name_params({**P, "method": "flat"})["method"] == "flat"
    assert name_params({**P, "virtual_ids": "random"})["virtual_ids"] == "random"


def _record(model, seed, macs, **cost):
    return {"model": model, "variant": "default", "seed": seed, "run_dir": f"/nonexistent/{model}/{seed}",
            "metrics": {"auc": 0.7, "gauc": 0.6, "logloss": 0.5, "oracle_gap": 0.1, "by_group": [],
                        "diversity": {}},
            "train": {"epochs_run": 2},
            "cost": {"train_s": 1.0, "samples_per_s": 10.0, "evaluate_s": 1.0, "peak_rss_mb": 100.0,
                     "gsu_positions": 300, **({} if macs is None else {"macs_per_candidate": macs}), **cost}}


def test_cost_table_has_macs_per_candidate(params, monkeypatch):
    st = benchmark.settings(params)
    seen = []

    def fake(run):                                   # a cell done before the column existed: from its run
        seen.append(str(run))
        return 2_000

    monkeypatch.setattr(benchmark.cost, "model_macs", fake)     # what the cost table calls
    records = [_record("twinv2", 0, 2_813_440), _record("twinv2", 1, 2_813_440), _record("twin", 0, None)]
    t = benchmark.tables(records, st, ["twinv2", "twin"], ["default"])
    cost = {r["model"]: r for r in t["cost"]}
    assert cost["twinv2"]["macs_per_candidate"] == (2_813_440, 0.0)
    assert cost["twin"]["macs_per_candidate"] == (2_000, None) and seen == ["/nonexistent/twin/0"]
    meta = {"command": "twinv2 benchmark", "git_commit": "abc", "date": "now", "data": "d", "n_cells": 3,
            "models": ["twinv2", "twin"], "variants": ["default"], "seeds": [0, 1]}
    md = benchmark.markdown(t, st, meta, [])
    cost_md = md.split("## 5. Cost")[1]
    header = next(line for line in cost_md.splitlines() if line.startswith("| model |"))
    col = [c.strip() for c in header.split("|")].index("multiply-adds / candidate")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")]
            for line in cost_md.splitlines() if line.startswith("| twin")}
    assert rows["twinv2"][col] == "2,813,440" and rows["twin"][col] == "2,000"


def test_model_macs_of_gbdt_or_a_missing_run_is_none(tmp_path):
    from twinv2.io import write_json

    assert benchmark.model_macs(tmp_path / "absent") is None
    write_json(tmp_path / "config.json", {"model": "gbdt"})
    assert benchmark.model_macs(tmp_path) is None


@pytest.mark.parametrize("name", ["twinv2", "twin"])
def test_model_macs_reads_a_saved_run(tmp_path, name, monkeypatch):
    """model_macs builds the run's model from config.json, vocab.npz and model.pt, as evaluation does."""
    import torch

    from tests.models.conftest import SMALL, VOCAB
    from twinv2.io import write_json
    from twinv2.models import build_model
    from twinv2.training import scoring

    m = build_model(name, VOCAB, {"model": SMALL})
    torch.save(m.state_dict(), tmp_path / "model.pt")
    write_json(tmp_path / "config.json", {"model": name, "params": {"model": SMALL}})
    (tmp_path / "vocab.npz").write_bytes(b"")

    class FakeVocab:                                  # the sizes the model was built with
        @staticmethod
        def load(path):
            return type("Vocab", (), {"sizes": staticmethod(lambda: VOCAB)})()

    monkeypatch.setattr(scoring, "Vocab", FakeVocab)
    assert benchmark.model_macs(tmp_path) == benchmark.macs_per_candidate(m) > 0


def test_cells_report_valid_and_test_side_by_side(params):
    """Every cell's valid AUC / GAUC is that of the epoch training kept: from the record's `valid`, else (cells
    recorded before it existed) from its curve at train.best_epoch; a cell with neither shows n/a, never a number
    from elsewhere. The main and ablation tables print valid next to test; dvc metrics carry both."""
    from pipelines.benchmark.cells import valid_metrics

    curve = [{"epoch": 1, "valid_auc": 0.61, "valid_gauc": 0.51}, {"epoch": 2, "valid_auc": 0.63, "valid_gauc": 0.53},
             {"epoch": 3, "valid_auc": 0.62, "valid_gauc": 0.52}]
    new = {**_record("twinv2", 0, 1), "valid": {"auc": 0.65, "gauc": 0.55, "epoch": 2}}
    old = {**_record("twinv2", 1, 1), "train": {"epochs_run": 3, "best_epoch": 2}, "curve": curve}
    bare = _record("twin", 0, 1)                                 # neither: n/a
    assert valid_metrics(new)["auc"] == 0.65
    assert valid_metrics(old) == {"auc": 0.63, "gauc": 0.53, "epoch": 2}     # the kept epoch, not the last
    assert valid_metrics(bare)["auc"] is None
    st = benchmark.settings(params)
    t = benchmark.tables([new, old, bare], st, ["twinv2", "twin"], ["default"])
    main = {r["model"]: r for r in t["main"]}
    assert main["twinv2"]["valid_auc"][0] == pytest.approx(0.64) and main["twinv2"]["auc"][0] == pytest.approx(0.7)
    assert main["twin"]["valid_auc"] == (None, None)
    assert t["ablation"][0]["valid_gauc"][0] == pytest.approx(0.54)
    meta = {"command": "twinv2 benchmark", "git_commit": "abc", "date": "now", "data": "d", "n_cells": 3,
            "models": ["twinv2", "twin"], "variants": ["default"], "seeds": [0, 1]}
    md = benchmark.markdown(t, st, meta, [])
    main_md, abl_md = md.split("## 1.")[1].split("## 2.")
    assert "| model | seeds | valid AUC | valid GAUC | AUC | GAUC |" in main_md
    row = {line.split("|")[1].strip(): line for line in main_md.splitlines() if line.startswith("| tw")}
    assert row["twinv2"].split("|")[3].strip().startswith("0.6400") and row["twin"].split("|")[3].strip() == "n/a"
    assert "| valid AUC | valid GAUC | AUC | GAUC |" in abl_md.split("## 3.")[0]
    flat = benchmark.flat_metrics(t, st)
    assert flat["twinv2.valid_auc"] == pytest.approx(0.64) and "twin.valid_auc" not in flat and "twin.auc" in flat


def test_rerender_writes_the_report_of_stored_cells_computing_nothing(params, tmp_path, monkeypatch):
    """`twinv2 benchmark --rerender RESULTS_JSON --out OUT --publish DOC` renders the stored cells again with
    today's report code (valid columns read from the curves), reads no data, trains nothing, and says so."""
    from pipelines import evaluate, train
    from pipelines.cli import main

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("rerender must not train"))
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: pytest.fail("rerender must not evaluate"))
    curve = [{"epoch": 1, "valid_auc": 0.61, "valid_gauc": 0.51}, {"epoch": 2, "valid_auc": 0.63, "valid_gauc": 0.53}]
    cells = [{**_record(m, s, 1000), "label": f"{m}/default/seed{s}", "overrides": {},
              "train": {"epochs_run": 2, "best_epoch": 2}, "curve": curve,
              "adopted": {"from": "docs/x.json", "commit": "abc123"}} for m in ("twinv2", "twin") for s in (0, 1)]
    src = tmp_path / "results.json"
    src.write_text(json.dumps({"meta": {"command": "twinv2 benchmark --data D", "git_commit": "f00", "data": "D",
                                        "models": ["twinv2", "twin"], "variants": ["default"], "seeds": [0, 1],
                                        "n_cells": 4},
                               "cells": cells, "clusters": []}))
    doc = tmp_path / "doc.md"
    doc.write_text("# Results\n\nintro\n")
    assert main(["benchmark", "--rerender", str(src), "--out", str(tmp_path / "o"), "--publish", str(doc)]) == 0
    md = (tmp_path / "o" / "results.md").read_text()
    assert "rendered again from the stored cells of" in md and "`f00`" in md
    main_md = md.split("## 1.")[1].split("## 2.")[0]
    assert "| twinv2 | 2 | 0.6300 +- 0.0000 | 0.5300 +- 0.0000 | 0.7000 +- 0.0000 |" in main_md
    assert "4 cells were adopted from `docs/x.json` (computed at commit `abc123`" in md
    assert doc.read_text().startswith("# Results\n\nintro\n") and "### 1. Main" in doc.read_text()
    out = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [c["label"] for c in out["cells"]] == [c["label"] for c in cells]
    assert main(["benchmark", "--out", str(tmp_path / "o2")]) == 3                  # no --data, no --rerender
