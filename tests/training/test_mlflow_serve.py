"""The MLflow path a user of the registry takes: a run trained and evaluated outside Airflow (the CLI/DVC
path: own runs in the `twinv2` experiment), registered; the champion loads by alias and is served by
`mlflow models serve` on 127.0.0.1, scoring one user's candidates over HTTP exactly as RunScorer does.
Also: system metrics on the train run, the validated data as a dataset input whose digest is its DVC hash,
the stage params on every run, one metric name each, the experiment kind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def registered(planted_ro, small_params, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    mlflow.set_tracking_uri(uri)
    from pipelines import evaluate, register, train

    p = small_params
    p["train"].update(epochs=2, log_every=5)
    out = tmp_path / "run"
    train.run(planted_ro, "twinv2", out, params=p)
    evaluate.run(planted_ro, out, params=p)
    rep = register.run(out, data=planted_ro, params=p)
    return {"uri": uri, "out": out, "data": planted_ro, "register": rep, "params": p}


def _one_user_request(data, n=12):
    from twinv2.data.store import read_table

    imp = read_table(data / "validated" / "impressions.parquet", "impressions").to_pandas()
    test = imp[imp.split == "test"]
    user = int(test["user_id"].iloc[0])
    ts = int(test[test.user_id == user]["ts"].min())
    items = imp["item_id"].drop_duplicates().head(n).to_numpy()
    import pandas as pd

    return pd.DataFrame({"user_id": np.full(len(items), user, dtype=np.int64), "item_id": items.astype(np.int64),
                         "ts": np.full(len(items), ts, dtype=np.int64)})


def test_runs_carry_params_datasets_system_metrics_and_one_name_per_metric(registered):
    from mlflow import MlflowClient

    from pipelines import tracking

    c = MlflowClient(tracking_uri=registered["uri"])
    exp = c.get_experiment_by_name("twinv2")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = {r.data.tags.get("stage"): r for r in c.search_runs([exp.experiment_id])}
    train_run, eval_run = runs["train"], runs["evaluate"]
    digest = tracking.data_hash(registered["data"], "validated")
    assert digest.endswith(".dir") and len(digest) == 36
    for r, context in ((train_run, "train"), (eval_run, "evaluate")):
        ds = r.inputs.dataset_inputs
        assert [d.dataset.digest for d in ds] == [digest], (context, ds)
        assert {t.key: t.value for t in ds[0].tags}["mlflow.data.context"] == context
        assert ds[0].dataset.name.endswith("/validated")
    # system metrics (CPU, memory) on the train run
    assert any(k.startswith("system/cpu") for k in train_run.data.metrics), sorted(train_run.data.metrics)
    assert any(k.startswith("system/system_memory") for k in train_run.data.metrics)
    # params of its stage on each run
    assert train_run.data.params["train.lr"] == "0.005"
    assert eval_run.data.params["evaluate.diversity_pool"] == "50"
    m = eval_run.data.metrics
    for name in ("auc", "gauc", "logloss", "ece", "diversity.ranking.ild", "group0.auc"):
        assert name in m, (name, sorted(m))
    for dup in ("test_auc", "test_ece", "calibration.ece", "diversity.ranking.pool", "params.batch_rows",
                "diversity.ranking.top_n", "test_gauc"):
        assert dup not in m, dup


def test_champion_re_evaluation_is_a_child_of_the_dag_run(registered, tmp_path, monkeypatch):
    """register re-evaluates the champion when its GAUC was measured on other data: that evaluation run hangs
    under the DAG run's parent with the DAG's tags (issue 32 item 13; was a stray run with neither), and from
    the CLI under the challenger's training run."""
    from mlflow import MlflowClient

    from pipelines import register, tracking

    c = MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"])
    champ = c.get_model_version_by_alias("twinv2", "champion")
    c.set_model_version_tag("twinv2", champ.version, "eval_key", "other-data")          # measured elsewhere
    ctx = {"dag_id": "twinv2_daily", "run_id": "manual__2026-12-06", "try_number": 1, "map_index": -1}
    parent = tracking.parent_run(ctx)
    reg_run = tracking.child_run(ctx, parent, "register")
    monkeypatch.setenv("MLFLOW_RUN_ID", reg_run)                      # run_stage(..., bind_run=True)
    g = register.champion_gauc_on(c, c.get_model_version("twinv2", champ.version), registered["data"], "k1",
                                  tmp_path / "scratch", registered["params"], challenger_run="unused-in-a-dag")
    assert g == pytest.approx(registered["register"]["challenger_gauc"])     # the champion is this run
    exp = c.get_experiment_by_name("twinv2").experiment_id
    (ev,) = c.search_runs([exp], f"tags.key = 'champion-v{champ.version}'")
    t = ev.data.tags
    assert t["mlflow.parentRunId"] == parent and t["dag_id"] == "twinv2_daily" and t["run_id"] == ctx["run_id"]
    assert t["stage"] == "evaluate" and ev.info.status == "FINISHED" and "gauc" in ev.data.metrics
    assert os.environ["MLFLOW_RUN_ID"] == reg_run                                 # restored
    # from the CLI (nothing bound): under the challenger's training run
    monkeypatch.delenv("MLFLOW_RUN_ID")
    train_id = c.search_runs([exp], "tags.stage = 'train'")[0].info.run_id
    c.set_model_version_tag("twinv2", champ.version, "eval_key", "other-data-2")
    register.champion_gauc_on(c, c.get_model_version("twinv2", champ.version), registered["data"], "k2",
                              tmp_path / "scratch2", registered["params"], challenger_run=train_id)
    cli = [r for r in c.search_runs([exp], f"tags.key = 'champion-v{champ.version}'")
           if r.data.tags.get("dag_id") == "cli"]
    assert len(cli) == 1 and cli[0].data.tags["mlflow.parentRunId"] == train_id


def test_champion_loads_by_alias_and_serves_over_http(registered, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from twinv2.training.scoring import RunScorer

    c = MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"])
    champ = c.get_model_version_by_alias("twinv2", "champion")
    # linked to the logged pyfunc model of the training run (the SQL registry keeps the link as the source
    # models:/<model_id>; ModelVersion.model_id is not returned by it)
    model_id = champ.model_id or champ.tags["model_id"]
    assert champ.source == f"models:/{model_id}"
    logged = c.get_logged_model(model_id)
    assert logged.source_run_id == champ.run_id and logged.name == "model"
    assert {"name": "twinv2", "version": str(champ.version)} in json.loads(logged.tags["mlflow.modelVersions"])
    x = _one_user_request(registered["data"])
    expected = RunScorer(registered["out"]).predict_frame(x)["prob"]

    model = mlflow.pyfunc.load_model("models:/twinv2@champion")
    np.testing.assert_allclose(model.predict(x)["score"].to_numpy(), expected, rtol=1e-5, atol=1e-6)

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "MLFLOW_ENABLE_TELEMETRY": "false",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/twinv2@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping:\n" + log.read_text()[-3000:]
            time.sleep(1)
        body = json.dumps({"dataframe_split": {"columns": list(x.columns), "data": x.to_numpy().tolist()}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            got = json.loads(r.read())
        preds = got["predictions"]
        scores = np.array([p["score"] if isinstance(p, dict) else p for p in preds], dtype=np.float64)
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    finally:
        _stop_group(proc)


def _stop_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
