"""A task that waits in the executor's queue longer than its workload token lives (issue 32, item 7), on a real
scheduler: in Airflow 3.3 a queued task's token lives [scheduler] task_queued_timeout (default 600 s); with
one task slot, `make run`'s second train task waited 13.5 minutes and died with "Invalid auth token". Scaled
down: one slot, a first task that sleeps WAIT_S, a second task queued beside it. With a lifetime shorter than
the wait (the default's situation) the second task fails with that error; with the components' own settings
(pipelines.services: task_queued_timeout = the longest dagrun_timeout) it runs after the wait. Both set-ups run
at the same time (two AIRFLOW_HOMEs, free ports)."""
from __future__ import annotations

import threading
from datetime import datetime

import pytest

from pipelines.services import TASK_QUEUED_TIMEOUT_S, AirflowServices

pytestmark = pytest.mark.slow

WAIT_S = 30
SHORT_LIFETIME_S = 10

DAG = f'''
import time
from airflow.sdk import dag, task


@dag(dag_id="queued_wait", schedule=None, catchup=False)
def queued_wait():
    @task
    def first():
        time.sleep({WAIT_S})

    @task
    def second():
        return "ran"

    first()
    second()


queued_wait()
'''


def test_a_task_queued_longer_than_its_token_lifetime(tmp_path):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "queued_wait.py").write_text(DAG)
    one_slot = {"AIRFLOW__CORE__DAGS_FOLDER": str(dags), "AIRFLOW__CORE__PARALLELISM": "1"}
    setups = {"short": AirflowServices(tmp_path / "short", all_admins=True, extra_env={
                  **one_slot, "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(SHORT_LIFETIME_S)}),
              "ours": AirflowServices(tmp_path / "ours", all_admins=True, extra_env=one_slot)}
    assert float(setups["ours"].env["AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT"]) == TASK_QUEUED_TIMEOUT_S > WAIT_S
    runs, errors = {}, {}

    def go(name):
        try:
            with setups[name] as s:
                runs[name] = s.run_dag("queued_wait", {}, timeout=240, verbose=False)
        except Exception as e:  # noqa: BLE001 - reported by the asserts below
            errors[name] = e

    threads = [threading.Thread(target=go, args=(n,)) for n in setups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    short, ours = ({t["task_id"]: t for t in runs[n].task_instances} for n in ("short", "ours"))
    # a lifetime shorter than the wait: the queued task never starts; the scheduler's log says why
    assert runs["short"].state == "failed" and short["second"]["state"] == "failed", runs["short"]
    assert short["second"]["start_date"] is None
    assert "Invalid auth token" in (tmp_path / "short" / "scheduler.log").read_text()
    # the components' settings: it waited in the queue for the first task's sleep, then ran
    assert runs["ours"].state == "success", runs["ours"]
    queued = datetime.fromisoformat(ours["second"]["queued_when"])
    started = datetime.fromisoformat(ours["second"]["start_date"])
    assert (started - queued).total_seconds() > SHORT_LIFETIME_S + 5, (queued, started)
