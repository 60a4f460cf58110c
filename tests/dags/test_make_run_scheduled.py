"""`make run`'s path through the real scheduler (pipelines.main_job.run_scheduled): the REST-triggered run
succeeds on the tiny world, every task instance has its log file in AIRFLOW_HOME/logs (where the UI reads
them), mapped instances carry their labels (shard / model), the register task emitted the champion Asset
event, and the progress bars did not flood the logs. Read back from Airflow's own metadata DB."""
from __future__ import annotations

import sqlite3

import pytest

from pipelines import main_job

pytestmark = pytest.mark.slow


def test_daily_through_the_scheduler_has_task_logs(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    home = tmp_path / "airflow_home"
    run = main_job.run_scheduled(tiny_world, tmp_path / "runs", home, {"train_epochs": 1, "n_shards": 2},
                                 timeout=900)
    run_root = tmp_path / "runs" / "twinv2_daily" / run
    assert (run_root / "twinv2" / "metrics.json").exists() and (run_root / "register.json").exists()

    db = sqlite3.connect(home / "airflow.db")
    runs = db.execute("select run_type, state from dag_run where dag_id = 'twinv2_daily'").fetchall()
    assert runs == [("manual", "success")], runs                # no extra timetable run when unpausing
    paused = db.execute("select is_paused from dag where dag_id = 'twinv2_daily'").fetchone()
    assert paused == (1,)                                        # paused again, as it was created
    tis = db.execute("select task_id, map_index, rendered_map_index, state from task_instance "
                     "where dag_id = 'twinv2_daily'").fetchall()
    assert tis and all(state == "success" for *_, state in tis), tis
    labels = {(t, m): r for t, m, r, _ in tis if m >= 0}
    assert labels[("cluster_shard", 0)] == "shard 0/2" and labels[("cluster_shard", 1)] == "shard 1/2"
    assert {labels[("train", 0)], labels[("train", 1)]} == {"twinv2", "twin"}
    assert {labels[("evaluate", 0)], labels[("evaluate", 1)]} == {"twinv2", "twin"}
    events = db.execute("select a.name from asset_event e join asset a on a.id = e.asset_id").fetchall()
    assert ("twinv2_champion",) in events, events

    logs = list((home / "logs").rglob("*.log"))
    for task in ("start", "validate", "cluster_shard", "finalize_clusters", "train", "evaluate", "register"):
        assert any(f"task_id={task}" in str(p) for p in logs), (task, logs)
    train_logs = [p for p in logs if "task_id=train" in str(p)]
    text = "".join(p.read_text(errors="replace") for p in train_logs)
    assert "trained" in text or "epoch" in text
    assert text.count("\r") < 200, "progress bars flood the task logs"
