"""twinv2_daily end to end on the tiny world with `airflow dags test` (dag.test(), in-process executor):
a first run (full clustering), a second run (incremental clustering, idempotent registration, champion
moves only on improvement), and a failing validation that stops the DAG before clustering."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import main_job

CONF = {"train_epochs": 1, "n_shards": 2}


@pytest.fixture()
def env(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return {"home": tmp_path / "airflow_home", "runs": tmp_path / "runs", "uri": uri}


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _children(c, run_id):
    exp = c.get_experiment_by_name("twinv2")
    # run_daily returns the run directory name: the Airflow run id made filesystem-safe
    parent = [r for r in c.search_runs([exp.experiment_id], "tags.role = 'parent'")
              if _safe(r.data.tags["run_id"]) == _safe(run_id)]
    assert len(parent) == 1, f"expected one parent run for {run_id}, got {len(parent)}"
    kids = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
    return parent[0], kids


@pytest.mark.slow
def test_daily_twice_incremental_and_idempotent(tiny_world, env, params):
    from pipelines import register

    run1 = main_job.run_daily(tiny_world, env["runs"], env["home"], CONF)
    assert (tiny_world / "clusters" / "CURRENT").exists()
    c = _client(env["uri"])
    parent, kids = _children(c, run1)
    assert parent.info.status == "FINISHED"
    by_stage = {}
    for k in kids:
        by_stage.setdefault(k.data.tags["stage"], []).append(k)
    assert len(by_stage["cluster"]) == 2 and all(k.data.tags["incremental"] == "False" for k in by_stage["cluster"])
    assert {k.data.tags["model"] for k in by_stage["evaluate"]} == {"twinv2", "twin"}
    for k in kids:
        assert k.info.status == "FINISHED"
        assert k.data.tags["dag_id"] == "twinv2_daily" and _safe(k.data.tags["run_id"]) == run1
        assert k.data.tags["git_commit"] and k.data.tags["dvc_data_hash"].endswith(".dir")
    v1 = c.get_model_version_by_alias("twinv2", "champion")
    assert str(v1.version) == "1" and str(c.get_model_version_by_alias("twinv2", "challenger").version) == "1"

    run2 = main_job.run_daily(tiny_world, env["runs"], env["home"], CONF)
    assert run2 != run1
    _, kids2 = _children(c, run2)
    clus2 = [k for k in kids2 if k.data.tags["stage"] == "cluster"]
    assert len(clus2) == 2 and all(k.data.tags["incremental"] == "True" for k in clus2)
    train2 = [k for k in kids2 if k.data.tags["stage"] == "train" and k.data.tags["model"] == "twinv2"]
    assert train2[0].data.tags["warm_start"].endswith("model.pt")       # warm start from the champion
    versions = c.search_model_versions("name = 'twinv2'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    rep = json.loads((env["runs"] / "twinv2_daily" / run2 / "register.json").read_text())
    assert rep["challenger_gauc"] is not None and rep["champion_gauc"] is not None
    margin = params["register"]["champion_margin"]
    should = rep["challenger_gauc"] > rep["champion_gauc"] + margin
    assert rep["promoted"] == should
    assert str(c.get_model_version_by_alias("twinv2", "champion").version) == ("2" if should else "1")
    assert str(c.get_model_version_by_alias("twinv2", "challenger").version) == "2"

    # registering the same run again (a retry) creates no new version and moves nothing
    again = register.run(env["runs"] / "twinv2_daily" / run2 / "twinv2", data=tiny_world, params=params)
    assert again["version"] == 2 and not again["created"]
    assert len(c.search_model_versions("name = 'twinv2'")) == 2
    assert str(c.get_model_version_by_alias("twinv2", "champion").version) == ("2" if should else "1")


def _safe(run_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_id)


@pytest.mark.slow
def test_failing_validation_stops_before_clustering(tiny_world, env):
    # break the play times of most behaviours: far more rows quarantined than validate.max_quarantine_share
    for part in sorted((tiny_world / "raw" / "behaviors").glob("part-*.parquet")):
        t = pq.read_table(part)
        import pyarrow as pa
        import pyarrow.compute as pc

        bad = pc.multiply(pc.cast(t["play_ms"], pa.int32()), pa.scalar(-1, pa.int32()))
        t = t.set_column(t.schema.get_field_index("play_ms"), "play_ms", pc.subtract(bad, pa.scalar(1, pa.int32())))
        pq.write_table(t, part)
    with pytest.raises(RuntimeError) as err:
        main_job.run_daily(tiny_world, env["runs"], env["home"], CONF)
    assert "validate" in str(err.value) or "AirflowFailException" in str(err.value)
    assert not (tiny_world / "clusters").exists()
    assert not (env["runs"] / "twinv2_daily").exists() or not any((env["runs"] / "twinv2_daily").rglob("model.pt"))
    c = _client(env["uri"])
    exp = c.get_experiment_by_name("twinv2")
    parent = c.search_runs([exp.experiment_id], "tags.role = 'parent' and tags.dag_id = 'twinv2_daily'")[0]
    assert parent.data.tags["failed_stage"] == "validate" and "ValidationFailed" in parent.data.tags["error"]
    _, kids = _children(c, parent.data.tags["run_id"])
    assert [k.data.tags["stage"] for k in kids] == ["validate"]
    assert kids[0].info.status == "FAILED"
    assert "error.json" in {a.path for a in c.list_artifacts(kids[0].info.run_id)}
