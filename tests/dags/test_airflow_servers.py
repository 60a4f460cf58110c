"""Real Airflow components on 127.0.0.1 (api-server, scheduler, dag-processor, triggerer; LocalExecutor):
the REST API lists both DAGs, the UI in headless Chromium shows them, and a triggered twinv2_daily run
on the tiny world succeeds while logging to a real `mlflow server`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from pipelines import register
from pipelines.services import AirflowServices, MlflowServer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1400,900", "--virtual-time-budget=20000"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with MlflowServer(root=tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, mlflow_server):
    # all_admins: the headless browser cannot type the generated password; the REST token flow is the same.
    srv = AirflowServices(home=tmp_path_factory.mktemp("airflow_home"), all_admins=True,
                          extra_env={"MLFLOW_TRACKING_URI": mlflow_server.url,
                                     "TWINV2_ALLOWED_ROOTS": tempfile.gettempdir(),
                                     "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"})   # only triggered runs
    srv.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ids = {d["dag_id"] for d in srv.api("GET", "/api/v2/dags")["dags"]}
            if {"twinv2_daily", "twinv2_recluster"} <= ids:
                break
            time.sleep(2)
        yield srv
    finally:
        srv.stop()


def test_rest_api_lists_both_dags(airflow):
    dags = {d["dag_id"]: d for d in airflow.api("GET", "/api/v2/dags")["dags"]}
    assert {"twinv2_daily", "twinv2_recluster"} <= set(dags)
    detail = airflow.api("GET", "/api/v2/dags/twinv2_daily/details")
    assert "validate" in (detail.get("doc_md") or "")
    assert detail["params"]["train_epochs"]["value"] is not None


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (.ci/run does it)")
    return exe


def test_ui_lists_both_dags_in_chromium(airflow):
    url = f"{airflow.url}/auth/token/login?next={airflow.url}/dags"
    exe = _chromium()
    with tempfile.TemporaryDirectory() as prof:
        dom = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={prof}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120).stdout
    assert "twinv2_daily" in dom and "twinv2_recluster" in dom, dom[-2000:]
    with tempfile.TemporaryDirectory() as prof:
        tmp = Path(prof) / "shot.png"
        subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={prof}", f"--screenshot={tmp}", url],
                       capture_output=True, timeout=120)
        assert tmp.exists() and tmp.stat().st_size > 10_000
        if os.environ.get("TWINV2_UPDATE_SCREENSHOTS") == "1":      # refresh docs/orchestration.md's picture
            shot = REPO / "docs" / "screenshots" / "airflow_dags.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp, shot)


def _task_log(airflow, dag_id: str, run_id: str, task_id: str, map_index: int | None) -> str:
    """Try 1's log of one task instance through the REST endpoint the UI's log page reads, as text."""
    q = "?full_content=true" + (f"&map_index={map_index}" if map_index is not None else "")
    body = airflow.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1{q}")
    return "\n".join(c if isinstance(c, str) else json.dumps(c) for c in body.get("content") or [])


def test_trigger_daily_through_rest_and_read_back_mlflow(airflow, mlflow_server, tiny_world, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    # MLflow resolves logged-model artifacts through the global tracking URI: point it at the server too
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)

    conf = {"data": str(tiny_world), "runs": str(tmp_path / "runs"), "train_epochs": 1, "n_shards": 2}
    run_id, state, tis = airflow.run_dag("twinv2_daily", conf, timeout=480, verbose=False)
    states = {(t["task_id"], t["map_index"]): t["state"] for t in tis}
    assert state == "success", f"run {run_id} ended {state}: {states}\n" + "".join(
        p.read_text()[-1500:] for p in Path(airflow.home).glob("scheduler.log"))
    assert states[("cluster_shard", 0)] == states[("cluster_shard", 1)] == "success"

    # the task log pages of the UI read this endpoint: each task's log is there (not "Log file not found"),
    # with the stage's own progress line, and the progress bar did not flood it with carriage returns
    for task_id, map_index, expect in (("validate", None, "validate"), ("cluster_shard", 1, "cluster"),
                                       ("train", 0, "epoch")):
        text = _task_log(airflow, "twinv2_daily", run_id, task_id, map_index)
        assert expect in text and "not found" not in text.lower(), (task_id, text[-1500:])
        assert text.count("\r") < 200, (task_id, "progress bars flood the task log")
        assert "Skipping registering function" not in text, (task_id, "GX's import-time INFO lines are back")
    # and the UI's own log page of the validate task, rendered by headless Chromium, shows its progress line
    page = f"{airflow.url}/dags/twinv2_daily/runs/{quote(run_id, safe='')}/tasks/validate"
    exe = _chromium()
    with tempfile.TemporaryDirectory() as prof:
        dom = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={prof}", "--dump-dom",
                              f"{airflow.url}/auth/token/login?next={quote(page, safe='')}"],
                             capture_output=True, text=True, timeout=120).stdout
    assert "row/s" in dom and "was not found" not in dom, dom[-3000:]

    # read everything back from the real MLflow server over HTTP
    c = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    exp = c.get_experiment_by_name("twinv2")
    parent = c.search_runs([exp.experiment_id], f"tags.role = 'parent' and tags.run_id = '{run_id}'")
    assert len(parent) == 1
    children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
    stages = {r.data.tags["stage"] for r in children}
    assert {"validate", "cluster", "cluster_finalize", "train", "evaluate", "register"} <= stages
    for r in children:
        for tag in ("dag_id", "run_id", "try_number", "git_commit", "dvc_data_hash"):
            assert r.data.tags.get(tag), (r.data.tags.get("stage"), tag)
    # every run carries its stage's params (Compare has something to show); settings are not metrics
    expected = {"validate": "validate.max_quarantine_share", "cluster": "cluster.gamma",
                "cluster_finalize": "cluster.gamma", "train": "train.lr", "evaluate": "evaluate.diversity_pool",
                "register": "register.champion_margin"}
    for r in children:
        stage = r.data.tags["stage"]
        assert expected[stage] in r.data.params, (stage, sorted(r.data.params)[:10])
        assert not any(k.startswith("params.") or k.endswith((".pool", ".top_n")) or k.startswith("test_")
                       for k in r.data.metrics), (stage, sorted(r.data.metrics))
        if stage in ("train", "evaluate"):
            from pipelines import tracking

            assert [d.dataset.digest for d in r.inputs.dataset_inputs] == [tracking.data_hash(tiny_world, "validated")]
    assert c.get_experiment_by_name("twinv2").tags["mlflow.experimentKind"] == "custom_model_development"
    ev = [r for r in children if r.data.tags["stage"] == "evaluate"]
    assert {r.data.tags["model"] for r in ev} == {"twinv2", "twin"}
    names = [set(r.data.metrics) for r in ev]
    assert names[0] == names[1] and any("gauc" in m for m in names[0])
    arts = {a.path for a in c.list_artifacts(ev[0].info.run_id)}
    assert "metrics.json" in arts and "plots" in arts
    champ = c.get_model_version_by_alias("twinv2", "champion")
    chall = c.get_model_version_by_alias("twinv2", "challenger")
    assert str(champ.version) == str(chall.version) == "1"
    # the registered version's files, through the client (its own artifact folder: no clash with the run's
    # logged pyfunc model "model", which made list_artifacts(run, "model") look up a missing logged model)
    files = {a.path for a in c.list_artifacts(champ.run_id, register.MODEL_ARTIFACTS)}
    assert f"{register.MODEL_ARTIFACTS}/model.pt" in files, files
    assert champ.tags["files"].rstrip("/").endswith(f"/{register.MODEL_ARTIFACTS}")
    # the version is the training run's logged model: it loads by alias through the server
    assert champ.source == f"models:/{champ.tags['model_id']}"
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.url)
    model = mlflow.pyfunc.load_model("models:/twinv2@champion")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["user_id", "item_id", "ts"]
