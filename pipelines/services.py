"""Local servers: `make mlflow` (MLflow tracking server) and `make airflow` (api-server, scheduler,
dag-processor, triggerer with the LocalExecutor, and the two task-log servers). Everything listens on
127.0.0.1 only: Airflow's own `serve-logs` (started by the scheduler and the triggerer) binds every
interface, so they run with --skip-serve-logs and this module serves the same log app on 127.0.0.1
(ports [logging] worker_log_server_port 8793 and trigger_log_server_port 8794).

    python -m pipelines.services mlflow  [--port 5000] [--root mlflow]
    python -m pipelines.services airflow [--port 8080] [--home airflow_home]
    python -m pipelines.services serve-logs --port 8793          (one log server on 127.0.0.1)

SIGTERM, SIGHUP or Ctrl-C stop every component's process group (each runs in its own session) before
the launcher exits: nothing is left re-parented to init.

The same classes start/stop the servers of the end-to-end tests (random free ports, bounded waits).
Airflow's metadata DB and config live in ./airflow_home (git-ignored). Credentials are never hard-coded:
the simple auth manager generates the admin password on first start and this command prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NamedTuple

from twinv2.config import REPO_ROOT

HOST = "127.0.0.1"
# LocalExecutor task slots: independent tasks (the cluster shards, the models' train/evaluate) run side by side
# on every core of the machine ([core] parallelism)
TASK_SLOTS = max(1, os.cpu_count() or 1)
# How long a task may wait in the executor's queue. In Airflow 3.3 this is also the lifetime of the workload
# token a queued task starts with ([scheduler] task_queued_timeout, default 600 s): a train task queued 13.5
# minutes behind another died with "Invalid auth token". No queued task outlives its DAG run, so it is the
# longest dagrun_timeout of the DAGs (twinv2_benchmark: 24 h; tests/dags/test_dag_import.py checks it).
TASK_QUEUED_TIMEOUT_S = 24 * 3600


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Wait until `url` answers (any HTTP status < 500), the process dies, or the timeout passes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"server for {url} exited with code {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
            last = e
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s (last error: {last})")


# MLflow 3.17's UI ignores the experiment's mlflow.experimentKind tag: an experiment page opens on the GenAI
# overview unless the URL says workflowType=machine_learning (else the browser's stored choice, GenAI when new).
ML_WORKFLOW = "workflowType=machine_learning"


def mlflow_experiment_url(base: str, experiment_id: str | None) -> str:
    """The MLflow UI link that opens experiment EXPERIMENT_ID on its runs in a fresh browser (the experiment
    list when there is none yet)."""
    page = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"{base.rstrip('/')}/#/{page}?{ML_WORKFLOW}"


def _mlflow_experiment_id(url: str, name: str = "twinv2") -> str | None:
    try:
        q = urllib.parse.urlencode({"experiment_name": name})
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?{q}", timeout=10) as r:
            return json.loads(r.read())["experiment"]["experiment_id"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return None


def _stop(procs: list[subprocess.Popen], grace: float = 15) -> None:
    """SIGTERM each process group we started, then SIGKILL what is left after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and a local artifact root."""

    def __init__(self, root: str | Path = REPO_ROOT / "mlflow", port: int | None = None, workers: int = 1):
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.workers = workers
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "server.log"

    def start(self, timeout: float = 120) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"),
               "--serve-artifacts", "--host", HOST, "--port", str(self.port), "--workers", str(self.workers)]
        env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=self.root)
        wait_http(f"{self.url}/health", timeout, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop([self.proc])
            self.proc = None

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class DagRun(NamedTuple):
    """A DAG run started by AirflowServices.run_dag, once it ended: its id, end state and task instances."""
    run_id: str
    state: str | None
    task_instances: list[dict]

    @property
    def states(self) -> dict[str, str]:
        """{"task_id[map_index]": state} of its task instances (for error messages)."""
        return {f"{t['task_id']}[{t['map_index']}]": t["state"] for t in self.task_instances}


class AirflowServices:
    """api-server + scheduler + dag-processor + triggerer sharing one AIRFLOW_HOME (SQLite, LocalExecutor)."""

    COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer", "serve-logs", "serve-trigger-logs")

    def __init__(self, home: str | Path = REPO_ROOT / "airflow_home", port: int | None = None,
                 all_admins: bool = False, extra_env: dict | None = None, log_ports: tuple[int, int] | None = None):
        self.home = Path(home).resolve()
        self.port = port or free_port()
        # task logs (scheduler/LocalExecutor) and triggerer logs: 8793/8794 for `make airflow`, free ports else
        self.log_ports = log_ports or (free_port(), free_port())
        self.url = f"http://{HOST}:{self.port}"
        self.all_admins = all_admins
        self.extra_env = extra_env or {}
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(TASK_SLOTS),
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(TASK_QUEUED_TIMEOUT_S),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__HOST": HOST,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True" if self.all_admins else "False",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.log_ports[0]),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.log_ports[1]),
            # task instances record this host name; the api-server fetches live logs from it
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "pipelines.services.loopback_hostname",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "GX_ANALYTICS_ENABLED": "False", "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1",
            # progress bars in task logs: one refresh per 30 s at most, not a carriage return per batch
            "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "30"),
        }
        env.update(self.extra_env)
        return env

    def airflow(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.home)

    def migrate(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        r = self.airflow("db", "migrate")
        if r.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed in {self.home}:\n{r.stderr[-3000:]}")

    def start(self, timeout: float = 180) -> "AirflowServices":
        self.migrate()
        airflow = [sys.executable, "-m", "airflow"]
        own = [sys.executable, "-m", "pipelines.services", "serve-logs", "--port"]
        cmds = {"api-server": [*airflow, "api-server", "--host", HOST, "--port", str(self.port)],
                "scheduler": [*airflow, "scheduler", "--skip-serve-logs"],
                "dag-processor": [*airflow, "dag-processor"],
                "triggerer": [*airflow, "triggerer", "--skip-serve-logs"],
                "serve-logs": [*own, str(self.log_ports[0])],
                "serve-trigger-logs": [*own, str(self.log_ports[1])]}
        for name in self.COMPONENTS:
            log = self.home / f"{name}.log"
            self.procs[name] = subprocess.Popen(cmds[name], env=self.env, stdout=open(log, "ab"),
                                                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.home)
        try:
            wait_http(f"{self.url}/api/v2/monitor/health", timeout, self.procs["api-server"],
                      self.home / "api-server.log")
        except Exception:
            self.stop()
            raise
        return self

    def password(self) -> str | None:
        f = self.home / "simple_auth_manager_passwords.json.generated"
        return json.loads(f.read_text()).get("admin") if f.exists() else None

    def token(self) -> str:
        """A JWT for the REST API (POST /auth/token with the generated admin password)."""
        if self.all_admins:
            req = urllib.request.Request(f"{self.url}/auth/token", method="GET")
        else:
            body = json.dumps({"username": "admin", "password": self.password()}).encode()
            req = urllib.request.Request(f"{self.url}/auth/token", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["access_token"]

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json",
                                              "Authorization": f"Bearer {token or self.token()}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"{}")

    # DAG runs over the REST API: run_dag below is what `make run`, the DAG tests and bench_large call
    def trigger(self, dag_id: str, conf: dict, parse_timeout: float = 180) -> tuple[str, bool]:
        """Wait until the dag-processor has parsed DAG_ID, unpause it (a paused DAG's runs are not scheduled),
        POST a run with CONF. Returns (dag_run_id, whether the DAG was paused before)."""
        token, deadline = self.token(), time.monotonic() + parse_timeout
        while True:
            try:
                paused = bool(self.api("GET", f"/api/v2/dags/{dag_id}", token=token)["is_paused"])
                break
            except urllib.error.HTTPError as e:
                if e.code != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(2)
        self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False}, token)
        run = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf}, token)
        return run["dag_run_id"], paused

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float, poll_s: float = 3.0, on_poll=None,
                 verbose: bool = True) -> str | None:
        """Poll the run until it ends ("success" / "failed"; the last state seen when `timeout` s pass). Prints
        the running tasks by their mapped names when they change (verbose); calls on_poll() at each poll."""
        end, state, last = time.monotonic() + timeout, None, ""
        while time.monotonic() < end:
            if on_poll is not None:
                on_poll()
            state = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                return state
            if verbose:
                running = sorted(f"{t['task_id']}[{t.get('rendered_map_index') or t['map_index']}]"
                                 for t in self.task_instances(dag_id, run_id) if t["state"] == "running")
                if running and ", ".join(running) != last:
                    last = ", ".join(running)
                    print(f"      running: {last}", flush=True)
            time.sleep(poll_s)
        return state

    def run_dag(self, dag_id: str, conf: dict, timeout: float, *, parse_timeout: float = 180,
                poll_s: float = 3.0, on_start=None, on_poll=None, verbose: bool = True) -> "DagRun":
        """The one way a DAG run is started and awaited here (make run, bench_large, the DAG tests): wait until
        the dag-processor has parsed DAG_ID, unpause it, trigger a run with CONF over the REST API, call
        on_start(run_id), poll the run until it ends (on_poll(run_id) at each poll), pause the DAG again when it
        was paused. Returns the run id, its end state ("success" / "failed", or the last state seen when
        `timeout` s pass) and its task instances."""
        run_id, paused = self.trigger(dag_id, conf, parse_timeout)
        try:
            if on_start is not None:
                on_start(run_id)
            state = self.wait_run(dag_id, run_id, timeout, poll_s=poll_s, verbose=verbose,
                                  on_poll=None if on_poll is None else (lambda: on_poll(run_id)))
        finally:
            if paused:
                self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": True})
        return DagRun(run_id, state, self.task_instances(dag_id, run_id))

    def stop(self) -> None:
        _stop(list(self.procs.values()), grace=20)
        self.procs = {}

    def __enter__(self) -> "AirflowServices":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def loopback_hostname() -> str:
    """[core] hostname_callable of the local components: every server here listens on 127.0.0.1 only."""
    return HOST


def serve_logs(port: int) -> None:
    """Airflow's task-log server app (what `airflow serve-logs` runs) on 127.0.0.1 only."""
    import uvicorn

    uvicorn.run("airflow.utils.serve_logs.log_server:get_app", host=HOST, port=port, log_config=None,
                access_log=False, factory=True)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def _serve(kind: str, port: int | None, root: str | None = None) -> int:
    # SIGTERM / SIGHUP (a closed terminal, `kill`, a supervisor) stop the components like Ctrl-C does
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_stop)
    srv: MlflowServer | AirflowServices | None = None
    try:
        if kind == "mlflow":
            srv = MlflowServer(root=root or REPO_ROOT / "mlflow", port=port or 5000)
            srv.start()
            print(f"MLflow UI: {mlflow_experiment_url(srv.url, _mlflow_experiment_id(srv.url))}\n"
                  "  (experiment twinv2 on its runs; the sidebar's GenAI / Machine learning switch is per browser)\n"
                  f"  (backend sqlite:///{srv.root}/mlflow.db, artifacts {srv.root}/artifacts; "
                  f"log {srv.log})\nPoint the pipeline at it with: export MLFLOW_TRACKING_URI={srv.url}\n"
                  "Ctrl-C stops it.", flush=True)
        else:
            log_ports = (int(os.environ.get("AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT") or 8793),
                         int(os.environ.get("AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT") or 8794))
            srv = AirflowServices(home=root or REPO_ROOT / "airflow_home", port=port or 8080, log_ports=log_ports)
            srv.start()
            pw = srv.password()
            print(f"Airflow UI: {srv.url}  user: admin  password: {pw}\n(generated on first start, kept in "
                  f"{srv.home}/simple_auth_manager_passwords.json.generated; logs in {srv.home}/*.log)\n"
                  "DAGs: twinv2_daily, twinv2_recluster, twinv2_benchmark (paused at creation: unpause or trigger them in "
                  "the UI).\n"
                  "Ctrl-C stops all components.", flush=True)
        while True:
            procs = [srv.proc] if kind == "mlflow" else list(srv.procs.values())
            dead = [p for p in procs if p is not None and p.poll() is not None]
            if dead:
                print(f"a component exited (code {dead[0].returncode}); stopping", file=sys.stderr)
                return 1
            time.sleep(2)
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):   # a second signal must not cut the cleanup
            signal.signal(sig, signal.SIG_IGN)
        if srv is not None:
            srv.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.services")
    p.add_argument("kind", choices=["mlflow", "airflow", "serve-logs"])
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--root", default=None, help="mlflow: the store folder (default mlflow/); airflow: AIRFLOW_HOME "
                                                "(default airflow_home/)")
    a = p.parse_args(argv)
    if a.kind == "serve-logs":
        serve_logs(a.port or 8793)
        return 0
    return _serve(a.kind, a.port, a.root)


if __name__ == "__main__":
    sys.exit(main())
