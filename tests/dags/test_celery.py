"""The CeleryExecutor set-up of `make airflow-celery` (pipelines.celery_services), all real: Redis, PostgreSQL,
api-server, scheduler, dag-processor and two Celery workers (worker-a, worker-b) on 127.0.0.1.

1. twinv2_daily on the tiny world with 4 cluster shards, triggered over the REST API: the run succeeds, shard
   tasks ran on both workers (task instance `hostname`), and the result equals the same stages run in-process
   (the LocalExecutor's result: same cluster version name, same test metrics within float tolerance).
2. A worker SIGKILLed (with every process under it) while it runs a shard task: the scheduler notices the
   missing heartbeats, the task is retried on the other worker, the run succeeds, and nothing is duplicated
   (one cluster version, 4 shard parts, every behaviour clustered once, one MLflow run per shard).

Both tests share one cluster (started once, ~35 s); the second leaves one worker. Shard tasks need no
artificial delay: a shard task runs for several seconds (task start-up, clustering, MLflow); the test freezes
the worker (SIGSTOP) as soon as the REST API shows it running one, checks the shard is still running once
frozen (else lets it go on and takes the next), and then kills it: no race between the poll and the kill."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import main_job
from pipelines.celery_services import CeleryCluster, _binary

pytestmark = pytest.mark.slow
DAG = "twinv2_daily"
CONF = {"train_epochs": 1, "n_shards": 4}
RETRY_DELAY_S = 3          # the DAGs' retry_delay in this cluster (params.yaml: 30 s), via TWINV2_RETRY_DELAY_S
METRICS = ("auc", "gauc", "logloss")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for exe, pkg in (("redis-server", "redis-server"), ("postgres", "postgresql")):
        try:
            _binary(exe, pkg)
        except FileNotFoundError as e:
            pytest.fail(str(e))
    root = tmp_path_factory.mktemp("celery")
    # PostgreSQL runs as the postgres user under root: its data directory may not lie under pytest's 0700 tmp
    pg_root = Path(tempfile.mkdtemp(prefix="twinv2-pg-"))
    os.chmod(pg_root, 0o711)
    env = {"TWINV2_ALLOWED_ROOTS": tempfile.gettempdir(),
           "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",                 # only the triggered runs
           # a lost worker's task fails after 30 s without heartbeats (default 300 s), checked every 5 s
           "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
           "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
           "TWINV2_RETRY_DELAY_S": str(RETRY_DELAY_S),                       # the retry starts soon after that
           "TQDM_MININTERVAL": "30"}
    # MLflow in the same PostgreSQL (database mlflow): both workers write runs at the same time
    c = CeleryCluster(root=root, pg_dir=pg_root / "data", extra_env=env, pg_fsync=False, mlflow_in_postgres=True)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(pg_root, ignore_errors=True)


def _tis(c: CeleryCluster, run_id: str) -> list[dict]:
    return c.airflow.task_instances(DAG, run_id)


def _run(c: CeleryCluster, conf: dict, timeout: float = 900, **kw) -> tuple[str, list[dict]]:
    """The DAG run through the shared helper (wait parsed, unpause, trigger over REST, wait for its end)."""
    run = c.airflow.run_dag(DAG, conf, timeout, **kw)
    assert run.state == "success", (run.state, {f"{t['task_id']}[{t['map_index']}]": (t["state"], t["hostname"])
                                                for t in run.task_instances})
    return run.run_id, run.task_instances


def _safe(run_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_id)


def _reference(data: Path, runs: Path, monkeypatch) -> dict:
    """The same stage functions, in this process, on a copy of the same data: what LocalExecutor runs."""
    from pipelines import cluster as cl, evaluate, tracking, train, validate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)       # no MLflow logging in-process
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    settings = tracking.dag_settings(CONF)
    validate.run(data=data, params=settings)
    n = settings["cluster"]["n_shards"]
    versions = {cl.run(data=data, incremental=False, shard=f"{i}/{n}", params=settings)["version"]
                for i in range(n)}
    assert len(versions) == 1
    version = versions.pop()
    cl.finalize(data=data, version=version, params=settings)
    metrics = {}
    for model in settings["airflow"]["models"]:
        train.run(data=data, model=model, out=runs / model, params=settings)
        evaluate.run(data=data, run=runs / model, params=settings)
        metrics[model] = json.loads((runs / model / "metrics.json").read_text())
    return {"version": version, "metrics": metrics}


def test_daily_on_two_celery_workers_equals_local_run(cluster, tiny_world_ro, tmp_path, monkeypatch):
    nodes = cluster.airflow.celery_workers()           # what `airflow celery list-workers` shows
    assert nodes == {"celery@worker-a": ["default", "worker_a"], "celery@worker-b": ["default", "worker_b"]}, nodes

    data, runs = tmp_path / "world", tmp_path / "runs"
    shutil.copytree(tiny_world_ro, data)
    t0 = time.monotonic()
    # the in-process reference runs meanwhile (the Airflow run waits on scheduling and task start-up a lot)
    with ThreadPoolExecutor(1) as pool:
        ref = []
        run_id, tis = _run(cluster, {"data": str(data), "runs": str(runs), **CONF},
                           on_start=lambda _: ref.append(pool.submit(
                               _reference, shutil.copytree(tiny_world_ro, tmp_path / "ref"), tmp_path / "ref_runs",
                               monkeypatch)))
        print(f"celery run: {time.monotonic() - t0:.0f}s")
        ref = ref[0].result()
    print(f"celery run and in-process reference: {time.monotonic() - t0:.0f}s")
    shards = [t for t in tis if t["task_id"] == "cluster_shard"]
    assert sorted(t["map_index"] for t in shards) == [0, 1, 2, 3]
    assert {t["hostname"] for t in shards} == {"worker-a", "worker-b"}, [(t["map_index"], t["hostname"])
                                                                          for t in shards]
    assert {t["hostname"] for t in tis} <= {"worker-a", "worker-b"}
    assert all(t["state"] in ("success", "skipped") for t in tis)

    assert (data / "clusters" / "CURRENT").read_text().strip() == ref["version"]
    got = runs / DAG / _safe(run_id)
    for model, m in ref["metrics"].items():
        mine = json.loads((got / model / "metrics.json").read_text())
        for k in METRICS:
            a, b = main_job.find_metric(mine, k), main_job.find_metric(m, k)
            assert a is not None and b is not None and a == pytest.approx(b, abs=1e-5), (model, k, a, b)
    assert (got / "register.json").exists()


def test_killed_worker_task_retried_on_the_other(cluster, tiny_world_ro, tmp_path):
    data, runs = tmp_path / "world", tmp_path / "runs"
    shutil.copytree(tiny_world_ro, data)
    conf = {"data": str(data), "runs": str(runs), **CONF, "models": ["twin"]}  # the failover, one model trained
    # A shard seen running can finish between the poll and the kill. So the worker is frozen first (SIGSTOP on
    # its whole tree: the task can neither finish nor report), the state is read again after the freeze (and
    # a second, for a report already on its way), and only a shard still running is killed; one that finished
    # meanwhile lets its worker go on and the next running shard is taken. Done at each poll of the run.
    seen_kill: dict = {}

    def kill_a_running_shard(run_id: str) -> None:
        if seen_kill:
            return
        seen = [t for t in _tis(cluster, run_id) if t["task_id"] == "cluster_shard" and t["state"] == "running"
                and t["hostname"] in cluster.airflow.workers]
        if not seen:
            return
        host, idx = seen[0]["hostname"], seen[0]["map_index"]
        cluster.airflow.suspend_worker(host)
        time.sleep(1.0)
        now = next(t for t in _tis(cluster, run_id) if t["task_id"] == "cluster_shard" and t["map_index"] == idx)
        if now["state"] != "running" or now["hostname"] != host:
            print(f"shard {idx} was {now['state']} once {host} was frozen; letting it go on")
            cluster.airflow.resume_worker(host)
            return
        killed = cluster.airflow.kill_worker(host)
        seen_kill.update(victim=host, shard=idx, t=time.monotonic())
        print(f"killed {host} ({len(killed)} processes) while it ran shard {idx}")

    run_id, tis = _run(cluster, conf, poll_s=0.3, on_poll=kill_a_running_shard, verbose=False)
    assert seen_kill, "no shard task seen running"
    victim, shard = seen_kill["victim"], seen_kill["shard"]
    survivor = next(w for w in cluster.airflow.workers if w != victim)
    print(f"run finished {time.monotonic() - seen_kill['t']:.0f}s after the kill")
    ti = next(t for t in tis if t["task_id"] == "cluster_shard" and t["map_index"] == shard)
    assert ti["state"] == "success" and ti["hostname"] == survivor and ti["try_number"] == 2, ti
    tries = cluster.airflow.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/cluster_shard/"
                                       f"{shard}/tries")["task_instances"]
    by_try = {t["try_number"]: t for t in tries}
    assert by_try[1]["hostname"] == victim and by_try[1]["state"] != "success", tries
    from datetime import datetime

    gap = (datetime.fromisoformat(by_try[2]["start_date"]) - datetime.fromisoformat(by_try[1]["end_date"]))
    assert gap.total_seconds() < 30, (gap, "TWINV2_RETRY_DELAY_S did not reach the DAGs (params.yaml's 30 s)")
    shards = [t for t in tis if t["task_id"] == "cluster_shard"]
    assert all(t["state"] == "success" for t in shards) and len(shards) == 4

    # nothing duplicated: one complete version, its 4 shard parts once, every validated behaviour in it once
    clusters = data / "clusters"
    version = (clusters / "CURRENT").read_text().strip()
    assert sorted(p.name for p in clusters.iterdir() if p.is_dir() and not p.name.startswith(".")) == [version]
    assert not (clusters / ".pending" / version).exists()
    manifest = json.loads((clusters / version / "manifest.json").read_text())
    assert manifest["n_shards"] == 4
    members = pq.read_table(clusters / version / "members").to_pandas()
    behaviours = pq.read_table(data / "validated" / "behaviors").to_pandas()
    behaviours = behaviours[behaviours["ts"] < manifest["watermark"]]             # what a version holds
    assert len(members) == len(behaviours) == manifest["counts"]["n_behaviors"]
    assert not members.duplicated(["user_id", "ts", "item_id"]).any()
    assert set(members["user_id"]) == set(behaviours["user_id"])

    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=cluster.mlflow_uri)
    exp = c.get_experiment_by_name("twinv2")
    kids = c.search_runs([exp.experiment_id], f"tags.run_id = '{run_id}' and tags.stage = 'cluster'")
    assert sorted(k.data.tags["key"] for k in kids) == ["0/4", "1/4", "2/4", "3/4"]
    assert all(k.info.status == "FINISHED" for k in kids)
    retried = next(k for k in kids if k.data.tags["key"] == f"{shard}/4")
    assert retried.data.tags["try_number"] == "2"
