"""`twinv2 benchmark` on the tiny world: 1 seed, 2 models (twinv2, twin), 2 variants (default, gamma5).

The real stage functions run (cluster, train, evaluate); small model params and one epoch keep it short.
Checked: the tables of results.md are complete, a second invocation recomputes nothing, a killed cell is
re-run (resumed from its checkpoint) without recomputing the finished ones, the paired-difference math."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines import benchmark
from tests.training.conftest import SMALL_MODEL
from twinv2.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def small(params: dict, epochs: int = 1) -> dict:
    p = copy.deepcopy(params)
    p["model"].update(SMALL_MODEL)
    p["train"].update(lr=0.005, batch_size=128, epochs=epochs, patience=10, progress=False, num_workers=0,
                      keep_checkpoints=0)
    p["evaluate"].update(diversity_users=10, diversity_pool=50, plots=False)
    p["cluster"].update(n_jobs=1)
    return p


# ------------------------------------------------------------------------------------------ math
def test_paired_difference_by_hand():
    a = {0: 0.70, 1: 0.72, 2: 0.69, 7: 0.5}          # seed 7 has no partner: left out
    b = {0: 0.68, 1: 0.70, 2: 0.70}
    p = benchmark.paired(a, b)
    # diffs +0.02, +0.02, -0.01 -> mean 0.01; std sqrt((1e-4 + 1e-4 + 4e-4) / 2) = sqrt(3e-4)
    assert p["n"] == 3 and p["seeds"] == [0, 1, 2]
    assert p["mean"] == pytest.approx(0.01)
    assert p["std"] == pytest.approx(math.sqrt(3e-4))
    half = 4.302652729911275 * math.sqrt(3e-4) / math.sqrt(3)      # t(0.975, df=2) = 4.3027
    assert p["ci95"] == pytest.approx([0.01 - half, 0.01 + half])
    one = benchmark.paired({0: 0.7}, {0: 0.6})
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.1) and one["std"] is None and one["ci95"] is None
    assert benchmark.mean_std([0.6, 0.7, 0.8]) == (pytest.approx(0.7), pytest.approx(0.1))
    assert benchmark.mean_std([]) == (None, None)


def test_plan_and_errors(params):
    cells = benchmark.plan(params, models="twinv2,twin", seeds=2, variants="gamma5")
    got = [(c["model"], c["variant"], c["seed"]) for c in cells]
    # the default variant for every model; the other variants for benchmark.ablation_models (twinv2)
    assert got == [("twinv2", "default", 0), ("twinv2", "default", 1), ("twin", "default", 0),
                   ("twin", "default", 1), ("twinv2", "gamma5", 0), ("twinv2", "gamma5", 1)]
    with pytest.raises(ConfigError, match="nope"):
        benchmark.plan(params, models="twinv2", seeds=1, variants="nope")
    with pytest.raises(ConfigError, match="not models"):
        benchmark.plan(params, models="twinv3", seeds=1)
    with pytest.raises(ConfigError, match="N >= 1"):
        benchmark.plan(params, models="twin", seeds=0)
    bad = copy.deepcopy(params)
    del bad["benchmark"]["variants"]["default"]
    with pytest.raises(ConfigError, match="no 'default' variant"):
        benchmark.plan(bad, models="twin", seeds=1)
    bad = copy.deepcopy(params)
    bad["benchmark"]["variants"]["x"] = {"cluster.gamma": "big"}
    with pytest.raises(ConfigError, match="expected a number"):
        benchmark.plan(bad, models="twin", seeds=1)
    # every variant of params.yaml is valid against params.yaml
    assert benchmark.settings(params)["variants"]["default"] == {}


def test_cli_usage_errors(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["benchmark", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--variants", "nope"]) == 3
    assert "benchmark.variants" in capsys.readouterr().err
    assert main(["benchmark", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "o"),
                 "--models", "twin", "--seeds", "1", "--variants", "default"]) == 2   # no validated data


# ------------------------------------------------------------------------------------------ end to end
def _stamp(out: Path) -> dict[str, int]:
    """mtimes of every cell's done marker and trained weights."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for pat in ("cells/*/*/*/cell.json", "cells/*/*/*/run/model.pt") for p in sorted(out.glob(pat))}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_validated_ro, params):
    from pipelines.cli import main
    from twinv2.clustering import store

    root = tmp_path_factory.mktemp("bench")
    data = root / "world"
    shutil.copytree(tiny_validated_ro, data)
    from pipelines import cluster

    before = cluster.run(data=data, params=small(params))["version"]       # an existing CURRENT is kept
    pfile = root / "params.yaml"
    pfile.write_text(yaml.safe_dump(small(params)))
    out = root / "out"
    args = ["benchmark", "--data", str(data), "--out", str(out), "--models", "twinv2,twin", "--seeds", "1",
            "--variants", "gamma5", "--params", str(pfile)]
    t0 = time.perf_counter()
    assert main(args) == 0
    print(f"first benchmark run: {time.perf_counter() - t0:.1f}s")
    assert store.current_version(data) == before
    return {"data": data, "out": out, "args": args, "pfile": pfile, "current": before}


def test_results_complete(bench):
    out = bench["out"]
    res = json.loads((out / "results.json").read_text())
    cells = {(c["model"], c["variant"], c["seed"]) for c in res["cells"]}
    assert cells == {("twinv2", "default", 0), ("twin", "default", 0), ("twinv2", "gamma5", 0)}
    for c in res["cells"]:
        m = c["metrics"]
        for k in ("auc", "gauc", "logloss", "oracle_gap"):
            assert isinstance(m[k], float) and math.isfinite(m[k]), (c["label"], k)
        assert len(m["by_group"]) == 4 and all(g["auc"] is not None for g in m["by_group"])
        assert m["diversity"]["ranking"]["coverage"] is not None
        assert c["cost"]["train_s"] > 0 and c["cost"]["samples_per_s"] > 0 and c["cost"]["evaluate_s"] > 0
        assert c["cost"]["peak_rss_mb"] > 50
        assert c["cost"]["gsu_positions"] == SMALL_MODEL["twin_window"]     # TWIN's window = TWIN-V2's max clusters
        # valid AND test per cell: the valid metrics of the epoch training kept (what model.pt holds)
        kept = next(h for h in c["curve"] if h["epoch"] == c["train"]["best_epoch"])
        assert c["valid"] == {"auc": kept["valid_auc"], "gauc": kept["valid_gauc"], "epoch": c["train"]["best_epoch"]}
        assert c["valid"]["gauc"] == c["train"]["best_valid_gauc"] and math.isfinite(c["valid"]["auc"])
        # each cell ran with its own seed and the cluster version of its variant, pinned
        cfg = json.loads((Path(c["run_dir"]) / "config.json").read_text())
        assert cfg["params"]["train"]["seed"] == c["seed"] == 0
        assert cfg["params"]["train"]["cluster_version"] == c["cluster_version"]
        if c["model"] == "twinv2":                   # the model that reads clusters reads that version
            assert cfg["cluster_version"] == c["cluster_version"]
    by = {(c["model"], c["variant"]): c for c in res["cells"]}
    assert by[("twinv2", "default")]["cluster_version"] == by[("twin", "default")]["cluster_version"] == bench["current"]
    assert by[("twinv2", "gamma5")]["cluster_version"] != bench["current"]       # gamma changes the version
    gamma5 = json.loads((bench["data"] / "clusters" / by[("twinv2", "gamma5")]["cluster_version"] /
                         "manifest.json").read_text())
    assert gamma5["params"]["gamma"] == 5
    t = res["tables"]
    assert [r["model"] for r in t["main"]] == ["twinv2", "twin"]
    assert t["main"][0]["d_auc"]["mean"] == pytest.approx(by[("twinv2", "default")]["metrics"]["auc"] -
                                                          by[("twin", "default")]["metrics"]["auc"])
    assert [r["variant"] for r in t["ablation"]] == ["default", "gamma5"]
    assert len(t["groups"]) == 8 and len(t["group_gain"]) == 4
    assert [r["model"] for r in t["diversity"]] == [r["model"] for r in t["cost"]] == ["twinv2", "twin"]
    assert {c["version"] for c in res["clusters"]} == {c["cluster_version"] for c in res["cells"]}
    assert all(c["compression"] > 1 for c in res["clusters"])

    md = (out / "results.md").read_text()
    assert md.startswith("# Benchmark results")
    assert "`twinv2 benchmark --data" in md and res["meta"]["git_commit"] in md
    sections = md.split("\n## ")[1:]
    assert [s.split("\n")[0][:2] for s in sections] == ["1.", "2.", "3.", "4.", "5."]

    def rows(section):
        return [l for l in section.splitlines() if l.startswith("| ") and not l.startswith("| model |")
                and not l.startswith("| group |") and not l.startswith("| variants |")]

    main_rows, abl_rows, grp_rows, div_rows, cost_rows = map(rows, sections)
    assert [r.split("|")[1].strip() for r in main_rows] == ["twinv2", "twin"]
    assert "n/a" not in " ".join(main_rows)
    assert [r.split("|")[2].strip() for r in abl_rows] == ["default", "gamma5"]
    assert "cluster.gamma=5" in abl_rows[1]
    assert len(grp_rows) == 8 + 4 and "n/a" not in " ".join(grp_rows)
    assert [r.split("|")[1].strip() for r in div_rows] == ["twinv2", "twin"] and "n/a" not in " ".join(div_rows)
    assert len(cost_rows) == 2 + 2 and "n/a" not in " ".join(cost_rows)          # 2 models + 2 cluster versions
    assert all(c["curve"] and c["curve"][0]["valid_gauc"] is not None for c in res["cells"])
    for png in ("main.png", "ablations.png", "groups.png", "curves.png", "gamma.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_second_run_recomputes_nothing(bench):
    from pipelines.cli import main

    out = bench["out"]
    before = _stamp(out)
    assert len(before) == 6
    assert main(bench["args"]) == 0
    assert _stamp(out) == before
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["computed"] == 0 and meta["skipped"] == 3
    # one named cell (the DVC cell stages): done, so nothing either
    assert main(bench["args"] + ["--cell", "twinv2/gamma5/0"]) == 0
    assert _stamp(out) == before


def test_adopt_cells_of_an_earlier_report(bench, tmp_path, params):
    """A new benchmark directory adopts the cells of an earlier results.json with the same keys: nothing is
    trained, the tables are the same, the report says which cells were adopted and from which commit; with
    other params (other keys) nothing is adopted; a file that is not a results.json is a clear error."""
    from pipelines.cli import main

    src = tmp_path / "published.json"
    old = json.loads((bench["out"] / "results.json").read_text())
    old["meta"]["git_commit"] = "a" * 40                      # as if published at another commit
    src.write_text(json.dumps(old))
    out = tmp_path / "grown"
    args = [str(out) if a == str(bench["out"]) else a for a in bench["args"]] + ["--adopt", str(src)]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["computed"] == 0 and res["meta"]["skipped"] == 3
    assert sorted(res["meta"]["adopted"]["cells"]) == sorted(c["label"] for c in old["cells"])
    assert res["meta"]["adopted"]["commit"] == old["meta"]["git_commit"]
    assert not list(out.glob("cells/*/*/*/run"))                  # nothing trained here
    assert all(c["how"].startswith("adopted from") for c in res["cells"])
    for k in ("main", "ablation", "groups", "group_gain", "diversity"):
        assert res["tables"][k] == old["tables"][k], k
    assert "3 cells were adopted from" in (out / "results.md").read_text()
    # a second invocation: the adopted cells are done, nothing more is adopted or computed
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())["meta"]
    assert again["computed"] == 0 and again["adopted"]["cells"] == []
    assert "3 cells were adopted from" in (out / "results.md").read_text()     # the records keep where they came from
    # re-published at a later commit and adopted again: each cell still names the commit that computed it
    grown = json.loads((out / "results.json").read_text())
    grown["meta"]["git_commit"] = "b" * 40
    (tmp_path / "republished.json").write_text(json.dumps(grown))
    third = tmp_path / "third"
    assert main([str(third) if a == str(bench["out"]) else a for a in bench["args"]]
                + ["--adopt", str(tmp_path / "republished.json")]) == 0
    recs = json.loads((third / "results.json").read_text())["cells"]
    assert {c["adopted"]["commit"] for c in recs} == {"a" * 40}
    assert {c["adopted"]["via"] for c in recs} == {str(src)}
    assert all(c["how"] == f"adopted from {tmp_path / 'republished.json'} (computed at commit {'a' * 40})" for c in recs)
    assert f"(computed at commit `{'a' * 40}`" in (third / "results.md").read_text()
    # other params: other keys, nothing taken
    p = small(params)
    p["train"]["lr"] = 0.004
    cells = benchmark.prepare(bench["data"], p, benchmark.plan(p, models="twinv2,twin", seeds=1, variants="gamma5"))
    assert benchmark.adopt(tmp_path / "other", cells, src)["cells"] == []
    assert not (tmp_path / "other").exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"cells": [{"model": "twin"}]}')
    with pytest.raises(ConfigError, match=r"bad\.json: cells\[0\] lacks"):
        benchmark.adopt(tmp_path / "other", cells, bad)


def test_crashed_cell_resumes_from_checkpoint(bench):
    """A cell that died after its epoch checkpoint (no model.pt, no done marker) is resumed; the others are
    not touched; resuming gives the uninterrupted run's result."""
    from pipelines.cli import main

    out = bench["out"]
    cell = out / "cells" / "twin" / "default" / "seed0"
    old = json.loads((cell / "cell.json").read_text())
    assert list((cell / "run" / "checkpoints").glob("epoch-*.pt"))
    for f in ("cell.json", "run/model.pt", "run/train_metrics.json", "run/metrics.json", "run/item_embeddings.npz"):
        (cell / f).unlink()
    others = {k: v for k, v in _stamp(out).items() if "twin/default" not in k}
    assert main(bench["args"]) == 0
    new = json.loads((cell / "cell.json").read_text())
    assert new["how"] == "resumed from checkpoint"
    assert new["metrics"]["auc"] == pytest.approx(old["metrics"]["auc"], abs=1e-6)
    assert {k: v for k, v in _stamp(out).items() if "twin/default" not in k} == others
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["computed"] == 1 and meta["skipped"] == 2


def test_killed_cell_is_rerun(bench):
    """A real SIGKILL in the middle of a new cell (seed 1 of twin); the next invocation finishes it, and
    the finished cells (seed 0) are not recomputed."""
    out = bench["out"]
    args = ["benchmark", "--data", str(bench["data"]), "--out", str(out), "--models", "twin", "--seeds", "2",
            "--variants", "default", "--params", str(bench["pfile"])]
    done0 = _stamp(out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cell = out / "cells" / "twin" / "default" / "seed1"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (cell / "run" / "config.json").exists():
            assert proc.poll() is None, "the benchmark ended before the cell started"
            time.sleep(0.2)
        assert (cell / "run" / "config.json").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (cell / "cell.json").exists()
    from pipelines.cli import main

    assert main(args) == 0
    rec = json.loads((cell / "cell.json").read_text())
    assert rec["seed"] == 1 and math.isfinite(rec["metrics"]["auc"])
    assert {k: v for k, v in _stamp(out).items() if k in done0} == done0
    res = json.loads((out / "results.json").read_text())
    assert {(c["model"], c["seed"]) for c in res["cells"]} == {("twin", 0), ("twin", 1)}
    assert res["tables"]["main"][0]["n"] == 2 and res["tables"]["main"][0]["auc"][1] is not None


def test_mlflow_parent_and_nested_cell_runs(bench, tmp_path, monkeypatch, params):
    """With tracking on: one parent run per benchmark, a nested run per computed cell carrying the cell's
    params and tags, into which train and evaluate log (their curves and test metrics)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)                          # the default experiment's ./mlruns stays here
    from pipelines import tracking

    out = tmp_path / "out"
    p = small(params)
    rep = benchmark.run(bench["data"], out, p, models="twin", seeds=1, variants="topk25", command="test")
    assert rep["computed"] == 1
    c = tracking.client()
    exp = tracking.experiment_id(c)
    parents = c.search_runs([exp], "tags.role = 'parent' and tags.dag_id = 'twinv2_benchmark_cli'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["train.epochs"] == "1"
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "benchmark")}
    assert {"benchmark/results.md", "benchmark/results.json"} <= arts
    kids = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(kids) == 1
    kid = kids[0]
    assert kid.info.status == "FINISHED"
    assert kid.data.tags["model"] == "twin" and kid.data.tags["variant"] == "default" and kid.data.tags["seed"] == "0"
    assert kid.data.params["train.seed"] == "0" and kid.data.params["model.topk"] == str(SMALL_MODEL["topk"])
    assert kid.data.params["train.cluster_version"] == bench["current"]
    assert "auc" in kid.data.metrics and "epoch_valid_gauc" in kid.data.metrics      # evaluate + train logged here
    assert kid.data.metrics["auc"] == pytest.approx(json.loads((out / "results.json").read_text())
                                                    ["cells"][0]["metrics"]["auc"])
    assert {r.info.run_id for r in c.search_runs([exp])} == {parent.info.run_id, kid.info.run_id}   # no stray run
    # a second invocation reuses the parent and computes (and logs) nothing new
    assert benchmark.run(bench["data"], out, p, models="twin", seeds=1, variants="topk25")["computed"] == 0
    assert len(c.search_runs([exp], "tags.role = 'parent' and tags.dag_id = 'twinv2_benchmark_cli'")) == 1
    assert len(c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 1


@pytest.mark.slow
def test_benchmark_dag_end_to_end(bench, tmp_path, params):
    """`airflow dags test twinv2_benchmark` on the tiny world, 1 seed, 2 models, 2 variants: one mapped task
    per cell labelled model/variant/seed, a report with every table, a parent MLflow run with a nested run
    per cell."""
    from mlflow import MlflowClient

    from pipelines import main_job, tracking

    home = tmp_path / "airflow_home"
    home.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**main_job.airflow_env(home), "MLFLOW_TRACKING_URI": uri,
           tracking.ALLOWED_ROOTS_ENV: os.pathsep.join([str(bench["data"].parent), str(tmp_path)])}
    env.pop("MLFLOW_RUN_ID", None)
    r = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    conf = {"data": str(bench["data"]), "out": str(out), "models": ["twinv2", "twin"], "seeds": 1,
            "variants": ["default", "gamma5"], "params_file": str(bench["pfile"])}
    r = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", "twinv2_benchmark", "-c", json.dumps(conf)],
                       env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0 and "DagRunState.FAILED" not in log, log[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert {c["label"] for c in res["cells"]} == {"twinv2/default/seed0", "twin/default/seed0", "twinv2/gamma5/seed0"}
    md = (out / "results.md").read_text()
    assert "Airflow DAG twinv2_benchmark" in md and [s[:2] for s in md.split("\n## ")[1:]] == ["1.", "2.", "3.", "4.", "5."]
    assert len(res["tables"]["main"]) == 2 and len(res["tables"]["ablation"]) == 2 and len(res["tables"]["groups"]) == 8
    # the mapped task instances carry their cell's label (map_index_template), not 0/1/2
    from sqlalchemy import create_engine, text

    eng = create_engine(f"sqlite:///{home / 'airflow.db'}")
    with eng.connect() as con:
        names = {row[0] for row in con.execute(text("select rendered_map_index from task_instance where "
                                                    "dag_id = 'twinv2_benchmark' and task_id = 'cell'"))}
    assert names == {"twinv2/default/seed0", "twin/default/seed0", "twinv2/gamma5/seed0"}
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("twinv2").experiment_id
    parents = c.search_runs([exp], "tags.role = 'parent' and tags.dag_id = 'twinv2_benchmark'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert {k.data.tags["key"] for k in kids} == names
    for k in kids:
        assert k.info.status == "FINISHED" and "auc" in k.data.metrics and k.data.params["train.seed"] == "0"
    assert {(k.data.tags["variant"], k.data.params["cluster.gamma"]) for k in kids} == {("default", "20"), ("gamma5", "5")}


def test_select_cells(params):
    cells = benchmark.plan(params, models="twinv2,twin", seeds=2, variants="gamma5")
    got = benchmark.select(cells, ["twinv2/gamma5/1", "twin/default/seed0"])
    assert [(c["model"], c["variant"], c["seed"]) for c in got] == [("twin", "default", 0), ("twinv2", "gamma5", 1)]
    with pytest.raises(ConfigError, match="not a cell of the plan"):
        benchmark.select(cells, ["twin/gamma5/0"])                 # variants run for ablation_models only
    with pytest.raises(ConfigError, match="MODEL/VARIANT/SEED"):
        benchmark.select(cells, ["twin/0"])


def test_dvc_matrix_matches_the_plan(params):
    """benchmark/dvc.yaml's cell and ablation stages are exactly the cells `twinv2 benchmark` plans."""
    r = subprocess.run([str(Path(sys.executable).parent / "dvc"), "stage", "list", "benchmark/dvc.yaml"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    outs = {l.split()[-1] for l in r.stdout.splitlines() if ":cell@" in l or ":ablation@" in l}
    cells = benchmark.plan(params)
    assert outs == {f"runs/benchmark/cells/{c['model']}/{c['variant']}/seed{c['seed']}/cell.json" for c in cells}
    assert any(":report" in l for l in r.stdout.splitlines())


@pytest.mark.slow
def test_dvc_benchmark_repro_and_experiment(tmp_path, params):
    """benchmark/dvc.yaml in a fresh git repository from this working tree, on the tiny world with one model,
    one ablation variant and one seed: `dvc repro` builds every cell and the report; `dvc exp run -S` changes a
    param and `dvc exp show` / `dvc metrics diff` compare the two (metrics in git-tracked dvc_metrics/)."""
    from tests.pipelines.test_dvc_repro import _clone, _sh

    clone = _clone(tmp_path)
    p = small(yaml.safe_load((clone / "params.yaml").read_text()))
    p["generate"]["preset"] = "tiny"
    p["benchmark"].update(models=["twin"], seeds=[0], ablation_models=["twin"], run_variants=["topk25"])
    (clone / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    _sh(["git", "commit", "-q", "-am", "tiny"], clone)
    _sh(["dvc", "repro", "validate"], clone)
    _sh(["dvc", "repro", "benchmark/dvc.yaml"], clone)
    m0 = json.loads((clone / "dvc_metrics" / "benchmark" / "metrics.json").read_text())
    assert {"twin.auc", "twin.gauc", "twin@topk25.auc", "twin@topk25.d_auc_vs_default"} <= set(m0)
    assert (clone / "dvc_metrics" / "benchmark" / "results.md").read_text().startswith("# Benchmark results")
    _sh(["git", "add", "dvc.lock", "benchmark/dvc.lock", "dvc_metrics"], clone)
    _sh(["git", "commit", "-q", "-m", "baseline"], clone)
    assert "changed" not in _sh(["dvc", "status", "benchmark/dvc.yaml"], clone)
    _sh(["dvc", "exp", "run", "benchmark/dvc.yaml", "-S", "train.lr=0.02", "-n", "lr02"], clone)
    m1 = json.loads((clone / "dvc_metrics" / "benchmark" / "metrics.json").read_text())
    assert m1["twin.auc"] != m0["twin.auc"]                          # the cells were recomputed with lr 0.02
    rows = json.loads(_sh(["dvc", "exp", "show", "--json"], clone))
    found = {}
    for row in rows:
        for exp in [row] + [e for x in (row.get("experiments") or []) for e in (x.get("revs") or [])]:
            name = exp.get("name") or exp.get("rev")
            mets = ((exp.get("data") or {}).get("metrics") or {}).get("dvc_metrics/benchmark/metrics.json") or {}
            if (mets.get("data") or {}).get("twin.auc") is not None:
                found[name] = mets["data"]["twin.auc"]
    assert "lr02" in found and len(found) >= 2, found
    diff = _sh(["dvc", "metrics", "diff", "HEAD", "lr02", "--json"], clone)
    assert "twin.auc" in diff


def test_embedding_variant_gets_its_own_cluster_version(bench, params):
    """A variant `cluster.embeddings: <trained run>` (clusters on a trained model's item table instead of the
    co-occurrence bootstrap) is clustered with that embedding into a version of its own; CURRENT stays."""
    from twinv2.clustering import store

    data = bench["data"]
    run = bench["out"] / "cells" / "twin" / "default" / "seed0" / "run"
    p = small(params)
    p["benchmark"]["variants"]["trained_emb"] = {"cluster.embeddings": str(run)}
    cells = benchmark.prepare(data, p, benchmark.plan(p, models="twinv2", seeds=1, variants="trained_emb"))
    by = {c["variant"]: c for c in cells}
    assert by["default"]["cluster_version"] == bench["current"]
    v = by["trained_emb"]["cluster_version"]
    assert v != bench["current"] and store.current_version(data) == bench["current"]
    manifest = json.loads((data / "clusters" / v / "manifest.json").read_text())
    assert manifest["embedding"]["source"] != "bootstrap" and str(run) in manifest["embedding"]["source"]
    assert by["trained_emb"]["params"]["train"]["cluster_version"] == v
    assert by["trained_emb"]["key"] != by["default"]["key"]


def test_publish_replaces_the_generated_block(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.md").write_text("# Benchmark results\n\nrun A\n\n## 1. Main\n\nPlots: [main.png](plots/main.png)\n")
    (out / "plots").mkdir()
    (out / "plots" / "main.png").write_bytes(b"png A")
    (out / "results.json").write_text('{"cells": []}')
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nhand-written text\n")
    benchmark.publish(out / "results.md", doc)
    text = doc.read_text()
    assert text.startswith("# Results\n\nhand-written text\n\n" + benchmark.BEGIN)
    assert "## Benchmark results" in text and "### 1. Main" in text and "run A" in text
    # the document carries its plots and results.json (the benchmark directory stays behind)
    assert "](results_files/plots/main.png)" in text and text.rstrip().endswith(benchmark.END)
    files = doc.parent / "results_files"
    assert (files / "plots" / "main.png").read_bytes() == b"png A"
    assert (files / "results.json").read_text() == '{"cells": []}'
    (out / "results.md").write_text("# Benchmark results\n\nrun B\n")
    (out / "plots" / "main.png").unlink()
    (out / "plots" / "groups.png").write_bytes(b"png B")
    doc.write_text(doc.read_text() + "\nafter the block\n")
    benchmark.publish(out / "results.md", doc)
    text = doc.read_text()
    assert "run B" in text and "run A" not in text and text.count(benchmark.BEGIN) == 1
    assert "hand-written text" in text and text.rstrip().endswith("after the block")
    assert sorted(p.name for p in (files / "plots").iterdir()) == ["groups.png"]     # replaced, not merged


def test_publish_failing_midway_keeps_the_previous_plots(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    (out / "plots").mkdir(parents=True)
    (out / "results.md").write_text("# Benchmark results\n\nrun A\n")
    for name in ("a.png", "b.png"):
        (out / "plots" / name).write_bytes(b"old " + name.encode())
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    benchmark.publish(out / "results.md", doc)
    before, files = doc.read_text(), doc.parent / "results_files" / "plots"
    for name in ("a.png", "b.png"):
        (out / "plots" / name).write_bytes(b"new " + name.encode())
    (out / "results.md").write_text("# Benchmark results\n\nrun B\n")
    real, calls = benchmark.reporting.shutil.copy2, []

    def copy_then_fail(src, dst):            # the disk fills up after the first plot
        calls.append(src)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(benchmark.reporting.shutil, "copy2", copy_then_fail)
    with pytest.raises(OSError):
        benchmark.publish(out / "results.md", doc)
    assert doc.read_text() == before                                        # the document is untouched
    assert {p.name: p.read_bytes() for p in files.iterdir()} == {"a.png": b"old a.png", "b.png": b"old b.png"}
    assert not [p for p in files.parent.iterdir() if p.name.endswith(".tmp")]  # no temporaries left


def test_cell_key_leaves_out_late_switches_at_their_default_and_params_a_model_does_not_read():
    """A switch added after cells existed changes no key while at its default; model.cluster_order (read by
    TWIN-V2 only) changes TWIN-V2's key and no other model's; any other model param changes every key."""
    from twinv2.config import load_params
    from pipelines.benchmark import cell_key
    p = load_params()
    base = {m: cell_key(m, p) for m in ("twinv2", "twin", "gbdt")}
    old = {**p, "model": {k: v for k, v in p["model"].items() if k not in ("numeric_embed", "numeric_dim",
                                                                        "numeric_sigma", "cluster_order",
                                                                        "match_recency")}}
    assert {m: cell_key(m, old) for m in base} == base           # params.yaml before the switches: same keys
    size = {**p, "model": {**p["model"], "cluster_order": "size"}}
    assert cell_key("twinv2", size) != base["twinv2"]
    assert cell_key("twin", size) == base["twin"] and cell_key("gbdt", size) == base["gbdt"]
    emb = {**p, "model": {**p["model"], "numeric_embed": 4}}
    assert all(cell_key(m, emb) != base[m] for m in base)
