"""`make airflow-celery`: Airflow with the CeleryExecutor, deployed as users deploy it, on one machine:

    Redis (Debian's redis-server)        the Celery broker
    PostgreSQL (Debian's postgresql)     Airflow's metadata database and the Celery result backend
    api-server, scheduler, dag-processor, and one task-log server    (pipelines.services.AirflowServices)
    two Celery workers, worker-a and worker-b: both consume the shared queue `default` (every task of
    the DAGs), each also its own queue (`worker_a`, `worker_b`) for tasks that must run on that worker

Everything listens on 127.0.0.1 only. The state lives under one directory (default airflow_home/celery,
git-ignored): AIRFLOW_HOME (airflow.cfg, logs), redis/ (redis.conf, no persistence), postgres/ (the
cluster's data directory; PostgreSQL refuses to run as root, so under root it belongs to the `postgres`
user and every PostgreSQL process runs as that user) and secrets.json (0600: the Redis and PostgreSQL
passwords, generated on first start; nothing is hard-coded). Ports are free ones picked at every start.

    python -m pipelines.celery_services start [--port 8080] [--root airflow_home/celery]   (foreground)
    python -m pipelines.celery_services stop  [--root ...]     (SIGTERM to a running launcher, waits for it)
    python -m pipelines.celery_services mlflow-uri [--root ...]  (the MLflow store of a running set-up)

SIGTERM, SIGHUP or Ctrl-C stop the Airflow components (Celery workers finish or give up their task within
20 s), then PostgreSQL (fast shutdown) and Redis. The end-to-end test (tests/dags/test_celery.py) starts the
same classes on free ports.

A task instance records the worker it ran on: [core] hostname_callable is `worker_hostname` below, which
answers the worker's name (TWINV2_WORKER_HOSTNAME, set per worker) - on several machines leave it at the
default (the machine's name). The task logs of every worker go to the shared AIRFLOW_HOME/logs, where the
api-server reads them.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from twinv2.config import REPO_ROOT

from pipelines.services import HOST, AirflowServices, _raise_stop, _Stop, _stop, free_port

DEFAULT_ROOT = REPO_ROOT / "airflow_home" / "celery"
WORKERS = {"worker-a": "default,worker_a", "worker-b": "default,worker_b"}
HOSTNAME_ENV = "TWINV2_WORKER_HOSTNAME"


def worker_hostname() -> str:
    """[core] hostname_callable of the Celery set-up: the worker's name, 127.0.0.1 for other components."""
    return os.environ.get(HOSTNAME_ENV) or HOST


def _wait(check, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{tail}")
        try:
            return check()
        except Exception as e:          # noqa: BLE001 - not up yet: retry until the deadline
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{what} was not ready within {timeout:.0f}s (last error: {last})")


def _secrets(root: Path) -> dict:
    f = root / "secrets.json"
    if f.exists():
        return json.loads(f.read_text())
    root.mkdir(parents=True, exist_ok=True)
    s = {"redis": secrets.token_urlsafe(24), "postgres": secrets.token_urlsafe(24)}
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(s, fh)
    return s


def _binary(name: str, apt_package: str) -> str:
    """A server binary: on PATH, else Debian's versioned PostgreSQL bin dirs (newest first)."""
    exe = shutil.which(name)
    if exe is None:
        found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                       key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
        exe = found[-1] if found else None
    if exe is None:
        raise FileNotFoundError(f"{name} not found: install Debian's {apt_package} "
                                f"(`apt-get install -y {apt_package}`; .ci/run does it)")
    return exe


class Redis:
    """redis-server on 127.0.0.1, password from secrets.json, no persistence (a broker of one machine)."""

    def __init__(self, root: Path, password: str, port: int | None = None):
        self.dir = Path(root) / "redis"
        self.password = password
        self.port = port or free_port()
        self.url = f"redis://:{password}@{HOST}:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Redis":
        exe = _binary("redis-server", "redis-server")
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:         # the password stays off the command line (ps)
            f.write(f"bind {HOST}\nport {self.port}\nprotected-mode yes\nrequirepass {self.password}\n"
                    f'dir {self.dir}\nsave ""\nappendonly no\ndaemonize no\nlogfile ""\n')
        log = self.dir / "redis.log"
        self.proc = subprocess.Popen([exe, str(conf)], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.dir)
        import redis

        def ping():
            c = redis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=5)
            try:
                return c.ping()
            finally:
                c.close()

        _wait(ping, "redis-server", timeout, self.proc, log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop([self.proc])
            self.proc = None


class Postgres:
    """A PostgreSQL cluster of its own (initdb on first start) on 127.0.0.1, database `airflow` owned by role
    `airflow` (scram-sha-256, password from secrets.json). Under root its processes run as `os_user`."""

    def __init__(self, data_dir: Path, password: str, port: int | None = None, os_user: str = "postgres",
                 fsync: bool = True):
        self.dir = Path(data_dir)
        self.fsync = fsync          # off only for throw-away clusters (the tests)
        self.password = password
        self.port = port or free_port()
        self.os_user = os_user if os.geteuid() == 0 else None
        self.url = self.database_url("airflow")
        self.proc: subprocess.Popen | None = None
        self.log = self.dir.parent / f"{self.dir.name}.log"

    def _as_user(self) -> dict:
        if self.os_user is None:
            return {}
        pw = pwd.getpwnam(self.os_user)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _own(self, path: Path) -> None:
        if self.os_user is not None:
            pw = pwd.getpwnam(self.os_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    @staticmethod
    def reachable(path: Path) -> bool:
        """Whether another user (the postgres user, under root) can reach `path`: every existing parent o+x."""
        return all(p.stat().st_mode & 0o001 for p in Path(path).resolve().parents if p.exists())

    def _check_traversable(self) -> None:
        if self.os_user is not None and not self.reachable(self.dir):
            raise PermissionError(f"PostgreSQL runs as {self.os_user!r} and cannot reach {self.dir}: a parent folder "
                                  "is not searchable by other users; choose a --pg-dir under a searchable folder")

    def initdb(self) -> None:
        if (self.dir / "PG_VERSION").exists():
            return
        self._check_traversable()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._own(self.dir)
        pwfile = self.dir.parent / f".{self.dir.name}.pwfile"     # read by initdb, removed right after
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        self._own(pwfile)
        try:
            r = subprocess.run([_binary("initdb", "postgresql"), "-D", str(self.dir), "-U", "airflow",
                                f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
                                "-E", "UTF8", "--locale=C", "--no-instructions"],
                               capture_output=True, text=True, timeout=300, cwd="/", **self._as_user())
        finally:
            pwfile.unlink(missing_ok=True)
        if r.returncode != 0:
            raise RuntimeError(f"initdb {self.dir} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")

    def start(self, timeout: float = 120) -> "Postgres":
        self.initdb()
        pid = self.dir / "postmaster.pid"
        if pid.exists():
            other = int(pid.read_text().split()[0])
            if psutil.pid_exists(other):
                raise RuntimeError(f"a PostgreSQL server (pid {other}) already runs on {self.dir}: stop it first "
                                   "(`make airflow-celery-stop`)")
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [_binary("postgres", "postgresql"), "-D", str(self.dir), "-c", f"listen_addresses={HOST}",
             "-c", f"port={self.port}", "-c", "unix_socket_directories=", "-c", "max_connections=200",
             "-c", f"fsync={'on' if self.fsync else 'off'}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd="/", **self._as_user())
        _wait(lambda: self._connect().close(), "postgres", timeout, self.proc, self.log)
        self.create_database("airflow")
        return self

    def _connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=HOST, port=self.port, user="airflow", password=self.password, dbname=dbname,
                                connect_timeout=5)

    def create_database(self, name: str) -> None:
        """CREATE DATABASE `name` (owned by role airflow) unless it exists."""
        conn = self._connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("select 1 from pg_database where datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'create database "{name}"')
        finally:
            conn.close()

    def database_url(self, name: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://airflow:{self.password}@{HOST}:{self.port}/{name}"

    def stop(self, grace: float = 30) -> None:
        """Fast shutdown (SIGINT: open sessions are rolled back), SIGKILL after `grace` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _stop([self.proc], grace=1)
        self.proc = None


class CeleryAirflow(AirflowServices):
    """AirflowServices with the CeleryExecutor: PostgreSQL metadata DB, Redis broker, Celery workers."""

    COMPONENTS = ("api-server", "scheduler", "dag-processor", "serve-logs")

    def __init__(self, *, sql_alchemy_conn: str, broker_url: str, workers: dict[str, str] | None = None,
                 concurrency: int = 1, **kw):
        self.sql_alchemy_conn = sql_alchemy_conn
        self.broker_url = broker_url
        self.workers = dict(workers or WORKERS)
        self.concurrency = concurrency
        super().__init__(**kw)

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env.update({
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
            "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.sql_alchemy_conn,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.concurrency),
            "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",   # a busy worker holds no second task
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
            "AIRFLOW__CORE__PARALLELISM": str(max(4, 2 * self.concurrency * len(self.workers))),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "pipelines.celery_services.worker_hostname",
        })
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 240) -> "CeleryAirflow":
        super().start(timeout)
        try:
            for name, queues in self.workers.items():
                self.start_worker(name, queues)
            self.wait_workers(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def start_worker(self, name: str, queues: str) -> None:
        cmd = [sys.executable, "-m", "airflow", "celery", "worker", "--celery-hostname", name, "--queues", queues,
               "--concurrency", str(self.concurrency), "--skip-serve-logs", "--without-mingle", "--without-gossip"]
        env = {**self.env, HOSTNAME_ENV: name}
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=open(self.home / f"{name}.log", "ab"),
                                            stderr=subprocess.STDOUT, start_new_session=True, cwd=self.home)

    def celery_workers(self) -> dict[str, list[str]]:
        """The Celery nodes answering on the broker: {node name: [queues]} (`airflow celery list-workers`)."""
        from celery import Celery

        app = Celery(broker=self.broker_url)
        try:
            active = app.control.inspect(timeout=3).active_queues() or {}
        finally:
            app.close()
        return {node: sorted(q["name"] for q in qs) for node, qs in active.items()}

    def wait_workers(self, timeout: float = 240) -> None:
        want = {f"celery@{n}" for n in self.workers if self.procs.get(n) and self.procs[n].poll() is None}

        def ready():
            for n in self.workers:
                p = self.procs.get(n)
                if p is not None and p.poll() is not None:
                    log = (self.home / f"{n}.log").read_text(errors="replace")[-3000:]
                    raise SystemExit(f"celery worker {n} exited with code {p.returncode}:\n{log}")
            nodes = self.celery_workers()
            if not want <= set(nodes):
                raise RuntimeError(f"workers up: {sorted(nodes)}")
            return nodes

        try:
            _wait(ready, f"celery workers {sorted(want)}", timeout)
        except SystemExit as e:
            raise RuntimeError(str(e)) from None

    def worker_tree(self, name: str) -> list:
        """The worker's process and every process under it (its pool, task supervisors, task processes)."""
        root = psutil.Process(self.procs[name].pid)
        return [root, *root.children(recursive=True)]

    def suspend_worker(self, name: str) -> int:
        """SIGSTOP a worker and every process under it: frozen, a running task can neither finish nor report;
        `resume_worker` (SIGCONT) lets it go on. Returns how many processes were stopped."""
        n = 0
        for p in self.worker_tree(name):
            try:
                p.suspend()
                n += 1
            except psutil.NoSuchProcess:
                pass
        return n

    def resume_worker(self, name: str) -> None:
        for p in self.worker_tree(name):
            try:
                p.resume()
            except psutil.NoSuchProcess:
                pass

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL a worker and every process under it (its pool, the task supervisors and the task processes,
        which lead process groups of their own): what the loss of its machine does. Returns the pids."""
        tree = self.worker_tree(name)
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        self.procs[name].wait(timeout=30)
        return [p.pid for p in tree]


class CeleryCluster:
    """Redis + PostgreSQL + CeleryAirflow under one state directory, started and stopped together."""

    def __init__(self, root: str | Path = DEFAULT_ROOT, port: int | None = None, pg_dir: str | Path | None = None,
                 log_port: int | None = None, extra_env: dict | None = None, pg_fsync: bool = True,
                 mlflow_in_postgres: bool | None = None, **airflow_kw):
        self.root = Path(root).resolve()
        # MLflow: the tasks of both workers write runs at once, which one SQLite file serves badly; unless
        # MLFLOW_TRACKING_URI names a store, they go to database `mlflow` of this PostgreSQL
        extra_env = dict(extra_env or {})
        if mlflow_in_postgres is None:
            mlflow_in_postgres = not (extra_env.get("MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI"))
        self.mlflow_in_postgres = mlflow_in_postgres
        s = _secrets(self.root)
        self.redis = Redis(self.root, s["redis"])
        if pg_dir is None:
            pg_dir = self.root / "postgres"
            if os.geteuid() == 0 and not Postgres.reachable(pg_dir):      # e.g. a checkout under /root
                import hashlib

                home = Path(pwd.getpwnam("postgres").pw_dir)
                pg_dir = home / f"twinv2-{hashlib.sha1(str(self.root).encode()).hexdigest()[:10]}"
        self.postgres = Postgres(Path(pg_dir), s["postgres"],
                                 fsync=pg_fsync)
        lp = log_port or free_port()
        self.airflow = CeleryAirflow(home=self.root, port=port, extra_env=extra_env, log_ports=(lp, lp),
                                     sql_alchemy_conn=self.postgres.url, broker_url=self.redis.url, **airflow_kw)

    @property
    def url(self) -> str:
        return self.airflow.url

    @property
    def mlflow_uri(self) -> str:
        """The MLflow store the tasks log to."""
        if self.mlflow_in_postgres:
            return self.postgres.database_url("mlflow")
        return self.airflow.extra_env.get("MLFLOW_TRACKING_URI") or os.environ["MLFLOW_TRACKING_URI"]

    def start(self) -> "CeleryCluster":
        try:
            self.redis.start()
            self.postgres.start()
            if self.mlflow_in_postgres:
                self.postgres.create_database("mlflow")
                self.airflow.extra_env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
            self.airflow.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.airflow.stop()
        finally:
            try:
                self.postgres.stop()
            finally:
                self.redis.stop()

    def __enter__(self) -> "CeleryCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _state_file(root: Path) -> Path:
    return root / "launcher.json"


def _running(root: Path) -> dict | None:
    """The state of a running launcher of this root ({pid, api, postgres_port, redis_port}), else None."""
    f = _state_file(root)
    if not f.exists():
        return None
    try:
        st = json.loads(f.read_text())
    except ValueError:
        return None
    return st if psutil.pid_exists(int(st.get("pid", 0))) else None


def _serve(root: Path, port: int | None, pg_dir: str | None) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_stop)
    other = _running(root)
    if other:
        print(f"already running (pid {other['pid']}, {other['api']}); `make airflow-celery-stop` stops it",
              file=sys.stderr)
        return 1
    log_port = int(os.environ.get("AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT") or 8793)
    cluster = CeleryCluster(root=root, port=port or 8080, pg_dir=pg_dir, log_port=log_port)
    state = _state_file(cluster.root)
    try:
        state.write_text(json.dumps({"pid": os.getpid(), "api": cluster.url, "postgres_port": cluster.postgres.port,
                                     "redis_port": cluster.redis.port, "mlflow_in_postgres": cluster.mlflow_in_postgres}))
        cluster.start()
        a = cluster.airflow
        mlflow = (f"database mlflow of that PostgreSQL; its UI: {sys.executable} -m mlflow ui --backend-store-uri "
                  f'"$({sys.executable} -m pipelines.celery_services mlflow-uri)"' if cluster.mlflow_in_postgres
                  else cluster.mlflow_uri)
        print(f"Airflow UI: {a.url}  user: admin  password: {a.password()}\n"
              f"CeleryExecutor: broker redis {HOST}:{cluster.redis.port}, metadata DB postgresql "
              f"{HOST}:{cluster.postgres.port}/airflow (data {cluster.postgres.dir}; passwords in "
              f"{cluster.root}/secrets.json)\n"
              f"MLflow: {mlflow}\n"
              "Workers: " + ", ".join(f"{n} (queues {q})" for n, q in a.workers.items()) + "\n"
              f"Logs in {cluster.root}/*.log. DAGs are paused at creation: unpause or trigger them in the UI.\n"
              "Ctrl-C (or `make airflow-celery-stop`) stops everything.", flush=True)
        while True:
            dead = [(n, p.returncode) for n, p in
                    [*a.procs.items(), ("redis", cluster.redis.proc), ("postgres", cluster.postgres.proc)]
                    if p is not None and p.poll() is not None]
            if dead:
                print(f"{dead[0][0]} exited (code {dead[0][1]}); stopping", file=sys.stderr)
                return 1
            time.sleep(2)
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):   # a second signal must not cut the cleanup
            signal.signal(sig, signal.SIG_IGN)
        cluster.stop()
        state.unlink(missing_ok=True)


def _stop_launcher(root: Path, timeout: float = 120) -> int:
    st = _running(root)
    if st is None:
        _state_file(root).unlink(missing_ok=True)
        print(f"not running ({root})")
        return 0
    pid = int(st["pid"])
    os.kill(pid, signal.SIGTERM)
    try:
        psutil.Process(pid).wait(timeout=timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        print(f"launcher {pid} still running after {timeout:.0f}s", file=sys.stderr)
        return 1
    print("stopped")
    return 0


def _mlflow_uri(root: Path) -> int:
    st = _running(root)
    if st is None or not st.get("mlflow_in_postgres"):
        print("no running `make airflow-celery` keeps MLflow in its PostgreSQL", file=sys.stderr)
        return 1
    pw = _secrets(root)["postgres"]
    print(f"postgresql+psycopg2://airflow:{pw}@{HOST}:{st['postgres_port']}/mlflow")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.celery_services")
    p.add_argument("action", choices=["start", "stop", "mlflow-uri"])
    p.add_argument("--port", type=int, default=None, help="api-server port (default 8080)")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="state directory (default airflow_home/celery)")
    p.add_argument("--pg-dir", default=None, help="PostgreSQL data directory (default ROOT/postgres)")
    a = p.parse_args(argv)
    root = Path(a.root).resolve()
    if a.action == "stop":
        return _stop_launcher(root)
    if a.action == "mlflow-uri":
        return _mlflow_uri(root)
    return _serve(root, a.port, a.pg_dir)


if __name__ == "__main__":
    sys.exit(main())
