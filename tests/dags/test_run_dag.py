"""AirflowServices.run_dag: the one helper that starts a DAG run over the REST API and waits for it (issue 31,
item 2). Its sequence is checked against a scripted REST API (fast: no Airflow started; the slow DAG tests run
it against the real api-server), and the three callers (make run's main job, bench_large's Celery
re-clustering, the Celery test) go through it: nobody else POSTs a DAG run."""
from __future__ import annotations

import ast
import urllib.error
from pathlib import Path

import pytest

from pipelines.services import AirflowServices

REPO = Path(__file__).resolve().parents[2]


class ScriptedAirflow(AirflowServices):
    """The REST calls of run_dag answered from a script: DAG_ID unknown (not parsed) for `unparsed` GETs, then
    known and paused; the run goes queued -> running -> END."""

    def __init__(self, unparsed: int = 2, paused: bool = True, end: str = "success"):
        super().__init__(home="/nonexistent", port=1, log_ports=(2, 3))
        self.calls: list[tuple[str, str, dict | None]] = []
        self.unparsed, self.paused, self.states = unparsed, paused, ["queued", "running", end]

    def token(self) -> str:
        return "t"

    def api(self, method, path, body=None, token=None):
        self.calls.append((method, path, body))
        if method == "GET" and path == "/api/v2/dags/d":
            if self.unparsed:
                self.unparsed -= 1
                raise urllib.error.HTTPError(path, 404, "not found", None, None)
            return {"is_paused": self.paused}
        if method == "PATCH":
            self.paused = body["is_paused"]
            return {}
        if method == "POST":
            assert not self.paused, "a run triggered on a paused DAG is never scheduled"
            return {"dag_run_id": "manual__1"}
        if path.endswith("/taskInstances?limit=100"):
            return {"task_instances": [{"task_id": "t", "map_index": -1, "state": self.states[0]}]}
        if path == "/api/v2/dags/d/dagRuns/manual__1":
            return {"state": self.states.pop(0) if len(self.states) > 1 else self.states[0]}
        raise AssertionError(f"unexpected call {method} {path}")


def test_run_dag_waits_for_parse_unpauses_triggers_waits_and_pauses_again(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    srv = ScriptedAirflow(unparsed=2, paused=True)
    started, polled = [], []
    run = srv.run_dag("d", {"x": 1}, timeout=60, on_start=started.append, on_poll=polled.append, verbose=False)
    assert run.run_id == "manual__1" and run.state == "success"
    assert run.states == {"t[-1]": "success"}
    assert started == ["manual__1"] and polled == ["manual__1"] * 3
    seq = [(m, p) for m, p, _ in srv.calls]
    assert seq[:3] == [("GET", "/api/v2/dags/d")] * 3                      # twice not parsed yet, then found
    assert seq[3] == ("PATCH", "/api/v2/dags/d") and srv.calls[3][2] == {"is_paused": False}
    assert seq[4] == ("POST", "/api/v2/dags/d/dagRuns") and srv.calls[4][2]["conf"] == {"x": 1}
    assert srv.calls[-2][2] == {"is_paused": True} and srv.paused          # paused again, as it was


def test_run_dag_leaves_an_unpaused_dag_unpaused_and_reports_failure(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    srv = ScriptedAirflow(unparsed=0, paused=False, end="failed")
    run = srv.run_dag("d", {}, timeout=60, verbose=False)
    assert run.state == "failed" and not srv.paused
    assert [b for m, _, b in srv.calls if m == "PATCH"] == [{"is_paused": False}]


def test_run_dag_gives_up_when_the_dag_is_never_parsed(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    with pytest.raises(urllib.error.HTTPError):
        ScriptedAirflow(unparsed=10_000).run_dag("d", {}, timeout=60, parse_timeout=100, verbose=False)


def _calls(path: Path) -> set[str]:
    return {n.func.attr for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}


@pytest.mark.parametrize("caller", ["pipelines/main_job.py", "bench/bench_large.py", "tests/dags/test_celery.py",
                                    "tests/dags/test_airflow_servers.py"])
def test_callers_use_the_one_helper(caller):
    calls = _calls(REPO / caller)
    assert "run_dag" in calls and not {"trigger", "wait_run"} & calls, (caller, calls & {"trigger", "wait_run"})
    assert "/dagRuns\"" not in (REPO / caller).read_text()


def test_nobody_else_posts_a_dag_run():
    posting = [p.relative_to(REPO).as_posix() for d in ("pipelines", "bench", "tests", "dags")
               for p in (REPO / d).rglob("*.py") if "POST" + '", f"/api/v2/dags/' in p.read_text()]
    assert posting == ["pipelines/services.py"], posting
