"""The large world end to end on this machine: wall time, CPU time and peak RSS of every stage (issue 16).

    python -m bench.bench_large --out DIR [--shards 4] [--workers 2] [--epochs 1] [--models twinv2,twin]

Every stage is the project's own CLI (`twinv2 ...`) in a fresh child process, so its peak RSS and CPU time
are its own (os.wait4: ru_maxrss, ru_utime + ru_stime):

    generate --preset large          ~12M behaviours, KuaiRand-27K's per-user lengths on 1,000 users
    validate                         the GX suites and the quarantine
    cluster --shard I/N              N shard processes, at most W at a time: what N Airflow shard tasks on W
                                     single-slot Celery workers run; the shard completing the set publishes
    train --model M                  each model, train.epochs = E (one epoch is enough for cost)
    evaluate --run R                 each model: AUC, GAUC, diversity on the test split
    cluster --incremental            the daily step: the behaviours of one cluster.incremental_step_ms after W

Prints a table and JSON and writes DIR/bench_large.json and bench/results/bench_large_<preset>.json. The goals of
issue 16: no stage above 8 GiB peak RSS, the whole run under 60 minutes on 2 cores (both checked and
printed, never asserted here: a benchmark reports). `--projection` prints the cost at 10^8 users x 10^4
behaviours from the measured rates (formulas in docs/scaling.md) from an existing JSON without running.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL_RSS_MB = 8 * 1024
GOAL_TOTAL_S = 60 * 60


def _twinv2() -> list[str]:
    return [sys.executable, "-m", "pipelines.cli"]


def _wait(proc: subprocess.Popen, t0: float, log) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"exit": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "log": str(log)}


def stage(name: str, args: list[str], logs: Path) -> dict:
    """One CLI call in a child process; a non-zero exit stops the benchmark with the log's tail."""
    log = logs / f"{name.replace('/', '_').replace(' ', '_')}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(_twinv2() + args, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "TWINV2_PROGRESS": "0"})
        rec = _wait(proc, t0, log)
    rec.update(stage=name, processes=1, concurrent_peak_rss_mb=rec["peak_rss_mb"])
    if rec["exit"] != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"bench_large: stage {name} failed (exit {rec['exit']}); {log}:\n{tail}")
    print(f"  {name}: {rec['wall_s']:.1f} s wall, {rec['cpu_s']:.1f} s CPU, peak RSS {rec['peak_rss_mb']:.0f} MB",
          flush=True)
    return rec


def sharded_cluster(data: Path, n: int, workers: int, logs: Path) -> dict:
    """N `twinv2 cluster --shard I/N` processes, at most `workers` at a time (each shard one process, as one
    Celery task on a single-slot worker). Peak RSS: the largest process and the largest sum over processes
    running together (what one machine holding all the workers needs)."""
    t0 = time.perf_counter()
    pending = list(range(n))
    running: dict[int, tuple[subprocess.Popen, float, Path, object]] = {}
    recs = []
    live_rss: dict[int, float] = {}
    concurrent = 0.0
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            log = logs / f"cluster_shard_{i}_of_{n}.log"
            fh = open(log, "w")
            p = subprocess.Popen(_twinv2() + ["cluster", "--data", str(data), "--shard", f"{i}/{n}"], stdout=fh,
                                 stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "TWINV2_PROGRESS": "0"})
            running[p.pid] = (p, time.perf_counter(), log, fh)
        # sample the running shards' RSS so that the concurrent peak is measured, not assumed
        for pid in list(running):
            try:
                with open(f"/proc/{pid}/status") as st:
                    for line in st:
                        if line.startswith("VmRSS:"):
                            live_rss[pid] = max(live_rss.get(pid, 0.0), int(line.split()[1]) / 1024)
            except OSError:
                pass
        concurrent = max(concurrent, sum(live_rss.get(pid, 0.0) for pid in running))
        pid, status, usage = os.wait4(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.2)
            continue
        p, t_start, log, fh = running.pop(pid)
        fh.close()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"bench_large: {log.name} failed (exit {code}):\n{log.read_text()[-3000:]}")
        recs.append({"wall_s": time.perf_counter() - t_start, "peak_rss_mb": usage.ru_maxrss / 1024,
                     "cpu_s": usage.ru_utime + usage.ru_stime})
    rec = {"stage": f"cluster ({n} shards, {workers} at a time)", "exit": 0, "wall_s": time.perf_counter() - t0,
           "cpu_s": sum(r["cpu_s"] for r in recs), "peak_rss_mb": max(r["peak_rss_mb"] for r in recs),
           "concurrent_peak_rss_mb": max(concurrent, max(r["peak_rss_mb"] for r in recs)), "processes": n,
           "shards": recs, "log": str(logs / "cluster_shard_*")}
    print(f"  {rec['stage']}: {rec['wall_s']:.1f} s wall, {rec['cpu_s']:.1f} s CPU, peak RSS per shard "
          f"{rec['peak_rss_mb']:.0f} MB, together {rec['concurrent_peak_rss_mb']:.0f} MB", flush=True)
    return rec


def celery_recluster(data: Path, n: int, out: Path, timeout: float = 3600) -> dict:
    """The clustering of DATA sharded over real Celery workers: `make airflow-celery`'s set-up (Redis, PostgreSQL,
    api-server, scheduler, dag-processor, workers worker-a and worker-b, pipelines.celery_services) started under
    OUT/celery, DAG twinv2_recluster triggered over the REST API with n_shards = N (a full build on the data's
    validated behaviours), then stopped. Records the run's wall time, every shard task's duration and worker,
    and the peak RSS of each worker's process tree (sampled every 0.5 s; tasks run in processes under it)."""
    import shutil
    import tempfile

    import psutil

    sys.path.insert(0, str(REPO))
    from pipelines.celery_services import CeleryCluster

    dag = "twinv2_recluster"
    pg_root = Path(tempfile.mkdtemp(prefix="twinv2-pg-"))
    os.chmod(pg_root, 0o711)
    env = {"TWINV2_ALLOWED_ROOTS": os.pathsep.join({str(data.parent), str(out)}),
           "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False", "TQDM_MININTERVAL": "30"}
    c = CeleryCluster(root=out / "celery", pg_dir=pg_root / "data", extra_env=env, pg_fsync=False,
                      mlflow_in_postgres=True)
    peak: dict[str, float] = {}
    together = 0.0
    try:
        t_start = time.perf_counter()
        c.start()
        started_s = time.perf_counter() - t_start
        srv = c.airflow

        def sample_rss():                             # each worker's process tree: tasks run in processes under it
            nonlocal together
            for name in srv.workers:
                rss = 0
                try:
                    for p in srv.worker_tree(name):
                        try:
                            rss += p.memory_info().rss
                        except psutil.Error:
                            pass
                except psutil.Error:
                    pass
                peak[name] = max(peak.get(name, 0.0), rss / 2**20)
            together = max(together, sum(peak.values()))

        t0 = time.perf_counter()
        run = srv.run_dag(dag, {"data": str(data), "n_shards": n}, timeout, parse_timeout=300, poll_s=0.5,
                          on_poll=lambda _run_id: sample_rss(), verbose=False)
        wall = time.perf_counter() - t0
        run_id, state, tis = run
    finally:
        c.stop()
        shutil.rmtree(pg_root, ignore_errors=True)
    tasks = [{"task": t["task_id"], "map_index": t["map_index"], "state": t["state"], "worker": t.get("hostname"),
              "duration_s": t.get("duration")} for t in tis]
    if state != "success":
        raise SystemExit(f"bench_large: {dag} run {run_id} ended {state}: {tasks}")
    shards = [t for t in tasks if t["task"] == "cluster_shard"]
    rec = {"stage": f"cluster via Celery ({n} shards on {len(peak)} workers)", "exit": 0, "wall_s": wall,
           "cpu_s": None, "peak_rss_mb": max(peak.values()), "concurrent_peak_rss_mb": together,
           "worker_peak_rss_mb": peak, "services_start_s": started_s, "run_id": run_id, "tasks": tasks,
           "shard_workers": sorted({t["worker"] for t in shards}),
           "version": (data / "clusters" / "CURRENT").read_text().strip()}
    print(f"  {rec['stage']}: {wall:.1f} s wall (services up in {started_s:.0f} s), shards on "
          f"{rec['shard_workers']}, peak RSS per worker {', '.join(f'{k} {v:.0f} MB' for k, v in peak.items())}",
          flush=True)
    return rec


def _read(p: Path) -> dict:
    return json.loads(p.read_text()) if p.exists() else {}


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def projection(res: dict, users: float = 1e8, per_user: float = 1e4) -> dict:
    """Cost at `users` x `per_user` behaviours from the measured rates (docs/scaling.md):
        full rebuild core-hours   = B / r_full / 3600,       r_full = behaviours clustered per CPU-second
        daily step core-hours     = B * c_inc / 3600,         c_inc = CPU-seconds of the measured incremental
                                    stage per behaviour held (it reads every user's clusters and the day's new
                                    behaviours, so its cost is taken to grow with the store, not only with the
                                    day's new behaviours: an upper bound while one day is a small share)
        cluster tables bytes      = B * (members bytes per behaviour) + B / compression * (clusters bytes per cluster)
        training core-hours/epoch = S / s_train / 3600,      S = impressions (the large world's per user ratio)
    where B = users x per_user."""
    m = res["measured"]
    B = users * per_user
    full_ch = B / m["cluster_behaviours_per_cpu_s"] / 3600
    inc = m.get("incremental") or {}
    day_ch = (B * inc["cpu_s"] / m["n_behaviours_before_w"] / 3600) if inc.get("cpu_s") else None
    n_clusters = B / m["compression"]
    table_bytes = B * m["members_bytes_per_behaviour"] + n_clusters * m["clusters_bytes_per_cluster"]
    S = users * m["impressions_per_user"]
    train = {k: S / v / 3600 for k, v in (m.get("train_samples_per_cpu_s") or {}).items() if v}
    return {"users": users, "behaviours_per_user": per_user, "behaviours": B,
            "full_rebuild_core_hours": full_ch, "daily_step_core_hours": day_ch, "clusters": n_clusters,
            "cluster_tables_tb": table_bytes / 1e12, "train_core_hours_per_epoch": train}


def measured(out: Path, data: Path, stages: list[dict], models: list[str]) -> dict:
    gen = _read(data / "reports" / "generate.json")
    by = {s["stage"]: s for s in stages}
    cl = next(s for s in stages if s["stage"].startswith("cluster ("))
    cur = (data / "clusters" / "CURRENT").read_text().strip() if (data / "clusters" / "CURRENT").exists() else None
    full_v = by.get("cluster_version_full") or {}
    vdir = data / "clusters" / full_v.get("version", "")
    rep = _read(vdir / "report.json") or _read(vdir / "manifest.json")
    nb = rep.get("n_behaviors") or rep.get("n_behaviours") or gen.get("n_behaviors_history")
    nc = rep.get("n_clusters")
    train_sps = {}
    for m in models:
        t = _read(out / "runs" / m / "train_metrics.json")
        st = by.get(f"train {m}")
        if st and t.get("n_train"):
            train_sps[m] = t["n_train"] * int(t.get("epochs_run") or 1) / st["cpu_s"]
    res = {"n_behaviours": gen.get("n_behaviors"), "n_behaviours_before_w": nb, "n_clusters": nc,
           "compression": (nb / nc) if nb and nc else None, "n_users": gen.get("n_users"),
           "n_impressions": gen.get("n_impressions"),
           "impressions_per_user": (gen.get("n_impressions") or 0) / max(gen.get("n_users") or 1, 1),
           "cluster_behaviours_per_cpu_s": nb / cl["cpu_s"] if nb else None,
           "cluster_behaviours_per_wall_s": nb / cl["wall_s"] if nb else None,
           "members_bytes_per_behaviour": _dir_bytes(vdir / "members") / nb if nb else None,
           "clusters_bytes_per_cluster": _dir_bytes(vdir / "clusters") / nc if nc else None,
           "train_samples_per_cpu_s": train_sps, "current_version": cur}
    inc = by.get("cluster incremental")
    if inc:
        irep = _read(data / "clusters" / str(cur) / "report.json")
        new = (irep.get("incremental_stats") or {}).get("new_behaviors")
        res["incremental"] = {"version": irep.get("version"), "new_behaviours": new,
                              "new_share": (new / nb) if new and nb else None,
                              "new_per_cpu_s": (new / inc["cpu_s"]) if new else None,
                              "wall_s": inc["wall_s"], "cpu_s": inc["cpu_s"], "report": {
                                  k: irep.get(k) for k in ("summary", "watermark", "n_behaviors", "n_clusters")}}
    return res


def table(res: dict) -> str:
    rows = ["| stage | wall s | CPU s | peak RSS MB (one process) | peak RSS MB (together) |", "|---|---|---|---|---|"]
    for s in res["stages"]:
        if "wall_s" not in s:
            continue
        rows.append(f"| {s['stage']} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | {s['peak_rss_mb']:.0f} | "
                    f"{s.get('concurrent_peak_rss_mb', s['peak_rss_mb']):.0f} |")
    g = res["goals"]
    rows.append(f"| **whole run** | **{g['total_wall_s']:.0f}** | | **{g['max_stage_rss_mb']:.0f}** (max) | |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="work directory (the world, runs and logs go there)")
    ap.add_argument("--preset", default="large")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="shard processes at a time (Celery workers)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--models", default="twinv2,twin")
    ap.add_argument("--no-incremental", action="store_true")
    ap.add_argument("--projection", action="store_true", help="print the projection of OUT/bench_large.json only")
    ap.add_argument("--celery", action="store_true",
                    help="only the clustering of OUT/world (generated and validated by an earlier run) sharded over "
                         "the two Celery workers of `make airflow-celery` (DAG twinv2_recluster, a full build into "
                         "a fresh clusters/ folder; the earlier one is kept as clusters.before-celery); writes "
                         "OUT/bench_large_celery.json")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if args.projection:
        res = json.loads((out / "bench_large.json").read_text())
        print(json.dumps(projection(res), indent=2))
        return
    if args.celery:
        data = out / "world"
        if not (data / "validated").exists():
            raise SystemExit(f"bench_large --celery: {data}/validated is missing; run bench_large --out {out} first")
        if (data / "clusters").exists():
            keep = data / "clusters.before-celery"
            if keep.exists():
                import shutil

                shutil.rmtree(keep)
            (data / "clusters").rename(keep)
        rec = celery_recluster(data, args.shards, out)
        sys.path.insert(0, str(REPO))
        from twinv2.io import write_json

        write_json(out / "bench_large_celery.json", rec)
        print(json.dumps(rec, indent=2, default=str))
        return
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    data = out / "world"
    models = [m for m in args.models.split(",") if m]
    print(f"bench_large: preset {args.preset} -> {data}", flush=True)
    t0 = time.perf_counter()
    stages = [stage("generate", ["generate", "--preset", args.preset, "--seed", str(args.seed), "--out", str(data)], logs),
              stage("validate", ["validate", "--data", str(data)], logs),
              sharded_cluster(data, args.shards, args.workers, logs)]
    stages.append({"stage": "cluster_version_full", "version": (data / "clusters" / "CURRENT").read_text().strip()})
    for m in models:
        stages.append(stage(f"train {m}", ["train", "--data", str(data), "--model", m, "--out", str(out / "runs" / m),
                                           "--set", f"train.epochs={args.epochs}", "--set", "train.progress=false"], logs))
        stages.append(stage(f"evaluate {m}", ["evaluate", "--data", str(data), "--run", str(out / "runs" / m)], logs))
    if not args.no_incremental:
        stages.append(stage("cluster incremental", ["cluster", "--data", str(data), "--incremental"], logs))
    total = time.perf_counter() - t0
    real = [s for s in stages if "wall_s" in s]
    metrics = {m: {k: _read(out / "runs" / m / "metrics.json").get(k) for k in ("auc", "gauc", "logloss", "n_test")}
               for m in models}
    res = {"preset": args.preset, "seed": args.seed, "shards": args.shards, "workers": args.workers,
           "epochs": args.epochs, "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "stages": stages, "metrics": metrics,
           "goals": {"total_wall_s": total, "total_goal_s": GOAL_TOTAL_S, "total_met": total < GOAL_TOTAL_S,
                     "max_stage_rss_mb": max(s["peak_rss_mb"] for s in real), "rss_goal_mb": GOAL_RSS_MB,
                     "rss_met": all(s["peak_rss_mb"] < GOAL_RSS_MB for s in real)}}
    res["measured"] = measured(out, data, stages, models)
    res["projection_1e8x1e4"] = projection(res)
    sys.path.insert(0, str(REPO))
    from twinv2.io import write_json

    write_json(out / "bench_large.json", res)
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    write_json(REPO / "bench" / "results" / f"bench_large_{args.preset}.json", res)
    print(table(res))
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
