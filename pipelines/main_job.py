"""`make run`: the whole twinv2_daily pipeline on the default synthetic world, executed by Airflow.

1. generate the default world into data/world (params `generate`) unless it is already there;
2. start the Airflow components (AIRFLOW_HOME=airflow_home, 127.0.0.1, free ports), trigger twinv2_daily over
   the REST API and wait for it (task logs in airflow_home/logs, shown by `make airflow`'s UI; `--dags-test`:
   in-process `airflow dags test` instead), training TWIN-V2 and TWIN and logging to MLflow
   ($MLFLOW_TRACKING_URI, else sqlite:///mlflow/mlflow.db);
3. print the metrics table of both models and how to open the Airflow and MLflow UIs, and write it with the
   run's date, commit and wall time to RUNS/twinv2_daily/<run>/make_run.md; on the default world with no
   --set also to docs/results_files/make_run.md (committed: README's figures are that file's, tested).

    python -m pipelines.main_job [--preset default] [--data data/world] [--set train.epochs=2 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from twinv2.config import REPO_ROOT, load_params

from pipelines import tracking

COLUMNS = [("auc", "AUC"), ("gauc", "GAUC"), ("logloss", "logloss"), ("oracle_gap", "oracle gap"),
           ("diversity.retrieval.distinct_categories", "GSU cats"), ("diversity.ranking.coverage", "top-N cov"),
           ("diversity.ranking.ild", "top-N ILD")]


def airflow_env(home: Path) -> dict[str, str]:
    return {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
            "PYTHONPATH": str(REPO_ROOT), "GX_ANALYTICS_ENABLED": "False", "MLFLOW_ENABLE_TELEMETRY": "false",
            "DO_NOT_TRACK": "1", "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "30")}  # few bar lines in logs


def find_metric(metrics: dict, key: str):
    """A metric from evaluate's metrics.json by dotted path (top level, or under 'test')."""
    if "." in key:
        node = metrics
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return float(node) if isinstance(node, (int, float)) else None
    for node in (metrics.get("test"), metrics.get("overall"), metrics):
        if isinstance(node, dict) and isinstance(node.get(key), (int, float)):
            return float(node[key])
    for v in metrics.values():
        if isinstance(v, dict) and isinstance(v.get(key), (int, float)):
            return float(v[key])
    return None


def table(runs: dict[str, Path]) -> str:
    head = f"{'model':<10}" + "".join(f"{title:>12}" for _, title in COLUMNS)
    lines = [head, "-" * len(head)]
    for model, run in runs.items():
        m = json.loads((run / "metrics.json").read_text())
        vals = [find_metric(m, k) for k, _ in COLUMNS]
        lines.append(f"{model:<10}" + "".join(f"{v:>12.4f}" if v is not None else f"{'-':>12}" for v in vals))
    return "\n".join(lines)


RECORD = REPO_ROOT / "docs" / "results_files" / "make_run.md"


def record(runs: dict[str, Path], run_id: str, wall_s: float, commit: str) -> str:
    """The markdown record of one `make run`: when, which commit, how long, and the metrics table (the text
    README.md quotes; tests/pipelines/test_make_run_record.py holds the two equal)."""
    m0 = json.loads(next(iter(runs.values())).joinpath("metrics.json").read_text()) if runs else {}
    oracle = find_metric(m0, "oracle_auc")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (f"# Last `make run` on the default world\n\nWritten by `make run` (pipelines/main_job.py) on {when}, "
            f"commit {commit}, DAG run {run_id}, the job {wall_s:.0f} s (set-up not counted). One seed; test "
            f"split.\n\n```\n{table(runs)}\n```\n")
    if oracle is not None:
        text += f"oracle AUC (the world's p_true on the test split): {oracle:.4f}\n"
    return text


def write_record(run_root: Path, models: list[str], run_id: str, wall_s: float, committed: bool) -> list[Path]:
    """record() into run_root/make_run.md, and into RECORD (docs/results_files/make_run.md) when `committed`
    (the default world, no --set) and both models have metrics. Returns the files written."""
    from twinv2.io import write_text

    text = record({m: run_root / m for m in models}, run_id, wall_s, tracking.git_commit())
    out = [run_root / "make_run.md"]
    if committed and models:
        out.append(RECORD)
    for f in out:
        write_text(f, text)
    return out


def table_block(text: str) -> str:
    """The first ``` block of a markdown text that starts with the metrics table's header."""
    for b in text.split("```")[1::2]:
        if b.strip().startswith("model") and "GAUC" in b.strip().splitlines()[0]:
            return b.strip()
    raise ValueError("no metrics table block (```model ... GAUC ...```) found")


def run_daily(data: Path, runs: Path, home: Path, conf_extra: dict | None = None, timeout: float = 3000) -> str:
    """`airflow dags test twinv2_daily` with the given conf; returns the Airflow run id (runs/ dir name)."""
    env = airflow_env(home)
    # the paths given here (command line / caller) are trusted: allow them for the DAG's path Params
    extra = [str(Path(data).resolve().parent), str(Path(runs).resolve())]
    env[tracking.ALLOWED_ROOTS_ENV] = os.pathsep.join(filter(None, [env.get(tracking.ALLOWED_ROOTS_ENV), *extra]))
    home.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed (AIRFLOW_HOME={home}):\n{r.stderr[-3000:]}")
    conf = {"data": str(data), "runs": str(runs), **(conf_extra or {})}
    before = set((runs / "twinv2_daily").glob("*")) if (runs / "twinv2_daily").exists() else set()
    log = home / "main_job_dags_test.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", "twinv2_daily", "-c", json.dumps(conf)],
                           env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO_ROOT)
    text = log.read_text()
    if r.returncode != 0 or "state=failed" in text.replace(" ", "") or "DagRunState.FAILED" in text:
        raise RuntimeError(f"twinv2_daily failed (full log: {log}):\n{text[-4000:]}")
    new = sorted(set((runs / "twinv2_daily").glob("*")) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise RuntimeError(f"twinv2_daily wrote no run directory under {runs / 'twinv2_daily'} (log: {log})")
    return new[-1].name


def run_scheduled(data: Path, runs: Path, home: Path, conf_extra: dict | None = None, timeout: float = 3600) -> str:
    """twinv2_daily through the real scheduler: start the Airflow components on 127.0.0.1 (free ports, this
    AIRFLOW_HOME), trigger a run over the REST API, wait for it, stop the components. The task logs land in
    AIRFLOW_HOME/logs, where the UI of `make airflow` reads them. Returns the run directory name."""
    from pipelines.services import AirflowServices

    allowed = [str(Path(data).resolve().parent), str(Path(runs).resolve())]
    # the services' task slots (one per core: both models train side by side) and queued-task timeout
    env = {"MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",     # only this triggered run: no timetable runs
           tracking.ALLOWED_ROOTS_ENV: os.pathsep.join(filter(None, [os.environ.get(tracking.ALLOWED_ROOTS_ENV),
                                                                     *allowed])),
           "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "30")}
    conf = {"data": str(data), "runs": str(runs), **(conf_extra or {})}
    with AirflowServices(home=home, extra_env=env) as srv:
        # unpaused for this run (the scheduler makes no timetable run: use_job_schedule is off), paused again
        # afterwards when it was paused
        run = srv.run_dag("twinv2_daily", conf, timeout)
        if run.state != "success":
            raise RuntimeError(f"twinv2_daily run {run.run_id} ended {run.state}: {run.states}; task logs under "
                               f"{home / 'logs'}")
    run_id = run.run_id
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.main_job", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="world to generate when absent (default: params generate.preset)")
    ap.add_argument("--data", default=None, help="dataset directory (default: params airflow.data_dir)")
    ap.add_argument("--runs", default=None, help="run directories (default: params airflow.runs_dir)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="params.yaml override passed to the DAG run, e.g. --set train.epochs=2")
    ap.add_argument("--dags-test", action="store_true",
                    help="run in-process with `airflow dags test` (faster start, but no task logs in the UI) "
                         "instead of the scheduler")
    a = ap.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    params = load_params(None, overrides)
    af = params.get("airflow", {})
    data = tracking.resolve(a.data or af.get("data_dir", "data/world"))
    runs = tracking.resolve(a.runs or af.get("runs_dir", "runs"))
    home = Path(os.environ.get("AIRFLOW_HOME") or REPO_ROOT / "airflow_home")
    t0 = time.monotonic()

    if not (data / "raw").exists():
        from pipelines import generate

        preset = a.preset or params["generate"]["preset"]
        print(f"[1/3] generating the {preset} world into {data} ...", flush=True)
        rep = generate.run(preset=preset, out=data, seed=params["generate"].get("seed"), params=params)
        print("      " + str(rep.get("summary", "")), flush=True)
    else:
        print(f"[1/3] using the existing world in {data}", flush=True)

    how = "airflow dags test" if a.dags_test else "the Airflow scheduler (REST-triggered run)"
    print(f"[2/3] twinv2_daily through {how} (AIRFLOW_HOME={home}, MLflow {tracking.tracking_uri()}) ...",
          flush=True)
    conf = {"overrides": overrides} if overrides else None
    run_id = run_daily(data, runs, home, conf) if a.dags_test else run_scheduled(data, runs, home, conf)
    run_root = runs / "twinv2_daily" / run_id
    models = [m for m in af.get("models", ["twinv2", "twin"]) if (run_root / m / "metrics.json").exists()]

    wall = time.monotonic() - t0
    print(f"[3/3] done in {wall:.0f}s; test metrics of run {run_id}:\n", flush=True)
    print(table({m: run_root / m for m in models}))
    where = write_record(run_root, models, run_id, wall, committed=not overrides and not a.data)
    print(f"\n(recorded in {', '.join(str(w) for w in where)})")
    reg = json.loads((run_root / "register.json").read_text()) if (run_root / "register.json").exists() else None
    if reg:
        print(f"\n{reg.get('summary', '')}")
    from pipelines.services import mlflow_experiment_url

    exp = tracking.client().get_experiment_by_name(tracking.EXPERIMENT)
    print(f"""
Open the UIs:
  Airflow: make airflow   -> http://127.0.0.1:8080 (user admin, password printed at start); DAG twinv2_daily
  MLflow:  make mlflow    -> {mlflow_experiment_url("http://127.0.0.1:5000", exp.experiment_id if exp else None)}
           (experiment 'twinv2' on its runs, not the GenAI overview): tick the evaluate runs of
           twinv2 and twin and press Compare; model registry 'twinv2' shows the champion/challenger aliases.
Run directories: {run_root}""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
