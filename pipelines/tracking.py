"""MLflow tracking for pipeline runs: one parent run per DAG run, one child run per stage (task).

Runs are found again by their tags, never created twice: a retried task reuses its child run (its
`try_number` tag is updated), a re-run of the same DAG run reuses the parent. Everything goes through
`MlflowClient` (no global "active run"), so several tasks may share one process (`dag.test()`).

Tags on every run: dag_id, run_id (the Airflow run id), try_number, git_commit, dvc_data_hash, stage;
child runs also carry map_index/key and the standard `mlflow.parentRunId`.

The tracking URI is $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow/mlflow.db with artifacts under
<repo>/mlflow/artifacts (both git-ignored).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from twinv2.config import REPO_ROOT

EXPERIMENT = "twinv2"
MLFLOW_DIR = REPO_ROOT / "mlflow"
# MLflow 3's UI opens an experiment on its runs (not the GenAI overview) when it carries this kind.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# params.yaml sections each stage's run carries (the parent run carries all of them)
STAGE_SECTIONS = {"validate": ("validate",), "cluster": ("cluster",), "cluster_finalize": ("cluster",),
                  "train": ("model", "train"), "evaluate": ("evaluate",), "register": ("register",)}
# report keys that are settings echoed back, not measurements: never logged as metrics (they are params)
SETTING_KEYS = {"params", "pool", "top_n", "k", "seed", "calibration", "plots", "history"}


# ---------------------------------------------------------------------------------------------- setup
def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{MLFLOW_DIR / 'mlflow.db'}"


def client():
    """An MlflowClient on the configured store (the default sqlite store and its folder are created)."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(c, name: str = EXPERIMENT) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        for k, v in EXPERIMENT_KIND.items():       # stores made before the kind was set
            if exp.tags.get(k) != v:
                c.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    artifact_location = None
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside the database
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    try:
        return c.create_experiment(name, artifact_location=artifact_location, tags=dict(EXPERIMENT_KIND))
    except Exception:  # created concurrently by another task
        return c.get_experiment_by_name(name).experiment_id


def use_store() -> str:
    """Point the fluent `mlflow` API at the configured store and the `twinv2` experiment (a stage that
    opens its own run: the CLI / DVC path). Returns the experiment id."""
    c = client()
    exp = experiment_id(c)
    import mlflow

    if not os.environ.get("MLFLOW_EXPERIMENT_ID") and not os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        mlflow.set_experiment(experiment_id=exp)
    return exp


def tracking_wanted() -> bool:
    """Stages log to MLflow inside an orchestrated run (MLFLOW_RUN_ID / an active run), when a tracking URI
    is set, or when TWINV2_MLFLOW=1 (the DVC stages set it: they log to the default store)."""
    if os.environ.get("MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_RUN_ID"):
        return True
    if os.environ.get("TWINV2_MLFLOW", "").lower() in ("1", "true", "yes"):
        return True
    import sys

    return "mlflow" in sys.modules and sys.modules["mlflow"].active_run() is not None


# ------------------------------------------------------------------------------------ provenance tags
@lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_HASH_CACHE: dict[tuple, str] = {}


def data_hash(data: str | Path, sub: str = "raw") -> str:
    """DVC-style content hash of DIR/raw: md5 over the sorted (relpath, md5) list of its files + '.dir'.

    The same bytes give the same hash wherever the directory lives (what DVC records in dvc.lock)."""
    root = Path(data) / sub
    if not root.is_dir():
        return "absent"
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    key = (str(root.resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _HASH_CACHE:
        entries = [{"md5": _file_md5(p), "relpath": p.relative_to(root).as_posix()} for p in files]
        digest = hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest()
        _HASH_CACHE[key] = digest + ".dir"
    return _HASH_CACHE[key]


def dataset_input(data: str | Path, context: str, sub: str = "validated"):
    """An MLflow DatasetInput for DIR/<sub> whose digest is its DVC hash (md5 of the .dir listing, what
    dvc.lock records for the stage output), source the local folder, context train/evaluate."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    root = Path(data).resolve()
    with warnings.catch_warnings():      # a local path "can be interpreted in multiple ways": all local
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(root / sub))
    ds = MetaDataset(source=source, name=f"{root.name}/{sub}", digest=data_hash(root, sub))
    return DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])


def log_dataset(c, run_id: str, data: str | Path, context: str, sub: str = "validated") -> None:
    """Log DIR/<sub> as the run's dataset input (once per run, digest and context)."""
    if not (Path(data) / sub).is_dir():
        return
    inp = dataset_input(data, context, sub)
    for have in c.get_run(run_id).inputs.dataset_inputs or []:
        if have.dataset.digest == inp.dataset.digest and have.dataset.name == inp.dataset.name:
            return
    c.log_inputs(run_id, datasets=[inp])


# ------------------------------------------------------------------------------------------ context
def airflow_context(context: dict | None) -> dict[str, Any]:
    """The identifying bits of an Airflow task context (or a CLI run when there is none)."""
    if not context:
        return {"dag_id": "cli", "run_id": "cli", "try_number": 1, "map_index": -1}
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    return {
        "dag_id": getattr(dag_run, "dag_id", None) or getattr(ti, "dag_id", "unknown"),
        "run_id": context.get("run_id") or getattr(dag_run, "run_id", "unknown"),
        "try_number": int(getattr(ti, "try_number", 1) or 1),
        "map_index": int(getattr(ti, "map_index", -1) if getattr(ti, "map_index", None) is not None else -1),
    }


def _quote(v: str) -> str:
    return "'" + str(v).replace("'", "\\'") + "'"


def _find_run(c, exp_id: str, tags: dict[str, str]):
    flt = " and ".join(f"tags.{k} = {_quote(v)}" for k, v in tags.items())
    runs = c.search_runs([exp_id], filter_string=flt, max_results=10, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def parent_run(ctx: dict, data: str | Path | None = None, params: dict | None = None) -> str:
    """Find or create the parent run of this DAG run; returns its MLflow run id."""
    c = client()
    exp = experiment_id(c)
    key = {"role": "parent", "dag_id": ctx["dag_id"], "run_id": ctx["run_id"]}
    found = _find_run(c, exp, key)
    if found is not None:
        return found.info.run_id
    tags = {**key, "git_commit": git_commit(), "mlflow.source.git.commit": git_commit(),
            "try_number": str(ctx.get("try_number", 1)),
            "mlflow.runName": f"{ctx['dag_id']}/{ctx['run_id']}"}
    if data is not None:
        tags["dvc_data_hash"] = data_hash(data)
        tags["data_dir"] = str(Path(data).resolve())
    run = c.create_run(exp, tags=tags)
    if params:
        log_params(c, run.info.run_id, params)
    return run.info.run_id


def child_run(ctx: dict, parent_id: str, stage: str, key: str = "", data: str | Path | None = None) -> str:
    """Find or create the child run of one stage (key tells mapped instances apart)."""
    c = client()
    exp = experiment_id(c)
    ident = {"role": "stage", "dag_id": ctx["dag_id"], "run_id": ctx["run_id"], "stage": stage,
             "key": key or "-"}
    found = _find_run(c, exp, ident)
    tags = {"try_number": str(ctx.get("try_number", 1)), "git_commit": git_commit()}
    if data is not None:
        tags["dvc_data_hash"] = data_hash(data)
    if found is not None:
        run_id = found.info.run_id
        if found.info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
    else:
        name = f"{stage}:{key}" if key else stage
        run_id = c.create_run(exp, tags={**ident, "mlflow.parentRunId": parent_id, "mlflow.runName": name,
                                         "mlflow.source.git.commit": git_commit()}).info.run_id
    for k, v in tags.items():
        c.set_tag(run_id, k, v)
    return run_id


# ------------------------------------------------------------------------------------------ logging
def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}." if prefix or k else str(k)))
        return out
    out[prefix.rstrip(".")] = obj
    return out


def _clean_key(k: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in k)[:250]


def report_metrics(report: dict, prefix: str = "") -> dict[str, float]:
    """The measurements of a (nested) report as {metric name: value}: every finite numeric scalar, one name
    each (no test_ prefix, no calibration.* copy of ece), settings echoed in reports (SETTING_KEYS: params.*,
    diversity.ranking.pool, top_n, ...) left out; evaluate's per-group list as group<i>.auc / group<i>.gauc."""
    out: dict[str, float] = {}
    for k, v in _flatten({kk: vv for kk, vv in report.items() if kk not in SETTING_KEYS}).items():
        if set(k.split(".")) & SETTING_KEYS:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            continue
        out[_clean_key(prefix + k)] = float(v)
    groups = report.get("by_group")
    if isinstance(groups, list):
        for i, g in enumerate(groups):
            for key in ("auc", "gauc"):
                if isinstance(g, dict) and isinstance(g.get(key), (int, float)) and math.isfinite(g[key]):
                    out[_clean_key(f"{prefix}group{i}.{key}")] = float(g[key])
    return out


def log_metrics(c, run_id: str, report: dict, prefix: str = "", limit: int = 400) -> None:
    """Log report_metrics(report) (same names for every model); values the run already holds (logged by
    the stage itself into its bound run) are not logged twice."""
    from mlflow.entities import Metric
    import time

    now = int(time.time() * 1000)
    have = c.get_run(run_id).data.metrics
    metrics = [Metric(k, v, now, 0) for k, v in report_metrics(report, prefix).items() if have.get(k) != v]
    for i in range(0, min(len(metrics), limit), 200):
        c.log_batch(run_id, metrics=metrics[i:min(i + 200, limit)])


def stage_params(params: dict, stage: str) -> dict:
    """The params.yaml sections of one stage (STAGE_SECTIONS), e.g. {"evaluate": {...}}."""
    return {s: params[s] for s in STAGE_SECTIONS.get(stage, ()) if s in params}


def log_params(c, run_id: str, params: dict) -> None:
    """params.yaml flattened (train.lr, ...). A re-run with changed values logs them as tags instead."""
    from mlflow.entities import Param

    flat = {_clean_key(k): json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            for k, v in _flatten(params).items()}
    existing = c.get_run(run_id).data.params
    new = [Param(k, v[:6000]) for k, v in flat.items() if k not in existing]
    changed = {k: v for k, v in flat.items() if k in existing and existing[k] != v[:6000]}
    for i in range(0, len(new), 100):
        c.log_batch(run_id, params=new[i:i + 100])
    for k, v in changed.items():
        c.set_tag(run_id, f"param_override.{k}", v[:5000])


def log_json(c, run_id: str, name: str, obj: Any, artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        c.log_artifact(run_id, str(p), artifact_path)


def log_paths(c, run_id: str, paths: list[str | Path], artifact_path: str | None = None) -> list[str]:
    """Log the files/directories that exist; returns what was logged."""
    logged = []
    for p in map(Path, paths):
        if p.is_dir():
            c.log_artifacts(run_id, str(p), f"{artifact_path}/{p.name}" if artifact_path else p.name)
        elif p.is_file():
            c.log_artifact(run_id, str(p), artifact_path)
        else:
            continue
        logged.append(str(p))
    return logged


def finish(c, run_id: str, ok: bool = True) -> None:
    c.set_terminated(run_id, status="FINISHED" if ok else "FAILED")


@contextmanager
def bound_run(run_id: str | None):
    """$MLFLOW_RUN_ID = run_id inside the block (the stage called there logs into that run), restored after;
    None: nothing bound."""
    saved = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        yield
    finally:
        if run_id:
            if saved is None:
                os.environ.pop("MLFLOW_RUN_ID", None)
            else:
                os.environ["MLFLOW_RUN_ID"] = saved


def run_stage(ctx: dict, parent_id: str, stage: str, fn: Callable[..., dict], kwargs: dict, *, key: str = "",
              data: str | Path | None = None, artifacts: Callable[[dict], list] | list = (),
              params: dict | None = None, tags: dict | None = None, bind_run: bool = False) -> dict:
    """Call `fn(**kwargs)` (one stage function) inside its child run: its report becomes metrics + report.json, the
    files it names become artifacts. bind_run: the stage sees its child run as $MLFLOW_RUN_ID (train
    logs its curves and pyfunc model there). A failure marks the run FAILED with the error as a tag and in
    error.json (the MLflow UI shows why), then re-raises."""
    c = client()
    run_id = child_run(ctx, parent_id, stage, key=key, data=data)
    for k, v in (tags or {}).items():
        c.set_tag(run_id, k, str(v))
    if params:
        log_params(c, run_id, stage_params(params, stage) or params)
    try:
        with bound_run(run_id if bind_run else None):
            report = fn(**kwargs)
    except Exception as e:
        err = {"error": type(e).__name__, "message": str(e)}
        extra = getattr(e, "report", None)
        if extra:
            err["report"] = extra
        c.set_tag(run_id, "error", f"{type(e).__name__}: {e}"[:5000])
        log_json(c, run_id, "error.json", err)
        for p in (artifacts(extra or {}) if callable(artifacts) else artifacts):
            log_paths(c, run_id, [p])
        finish(c, run_id, ok=False)
        c.set_tag(parent_id, "failed_stage", stage)
        c.set_tag(parent_id, "error", f"{stage}: {type(e).__name__}: {e}"[:5000])
        raise
    report = report if isinstance(report, dict) else {"result": report}
    log_metrics(c, run_id, report)
    log_json(c, run_id, f"{stage}.json", report)
    paths = artifacts(report) if callable(artifacts) else artifacts
    log_paths(c, run_id, list(paths))
    if isinstance(report.get("summary"), str):
        c.set_tag(run_id, "mlflow.note.content", report["summary"][:5000])
    finish(c, run_id, ok=True)
    report = dict(report)
    report["mlflow_run_id"] = run_id
    return report


def find_runs(filter_string: str, experiment: str = EXPERIMENT) -> list:
    c = client()
    return list(c.search_runs([experiment_id(c, experiment)], filter_string=filter_string, max_results=1000))


# ------------------------------------------------------------------------------ Airflow run settings
# Trigger-form fields (Params) of the DAGs that map onto params.yaml keys.
PARAM_KEYS = {"train_epochs": "train.epochs", "train_lr": "train.lr", "n_shards": "cluster.n_shards",
              "champion_margin": "register.champion_margin"}


def resolve(path: str | Path) -> Path:
    """Relative paths of DAG Params are relative to the repository root (tasks may run anywhere)."""
    p = Path(path)
    return (p if p.is_absolute() else REPO_ROOT / p).resolve()


ALLOWED_ROOTS_ENV = "TWINV2_ALLOWED_ROOTS"


class PathNotAllowed(ValueError):
    """A DAG Param names a path outside the data/runs roots and the allow-list."""


def allowed_roots() -> list[Path]:
    """Where the DAG Params `data`, `runs`, `params_file` may point: the repository's data root (the parent
    of params.yaml `airflow.data_dir`, i.e. data/), its runs root (`airflow.runs_dir`), and the roots listed
    in $TWINV2_ALLOWED_ROOTS (os.pathsep-separated absolute folders: the explicit allow-list, set in the
    environment of the Airflow components, never from the trigger form)."""
    from twinv2.config import load_params

    af = load_params(REPO_ROOT / "params.yaml").get("airflow", {})
    data_dir = resolve(af.get("data_dir", "data/world"))
    roots = [data_dir.parent if data_dir.parent != REPO_ROOT else data_dir, resolve(af.get("runs_dir", "runs"))]
    for extra in filter(None, os.environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep)):
        if not Path(extra).is_absolute():
            raise PathNotAllowed(f"{ALLOWED_ROOTS_ENV} entry {extra!r} is not an absolute path")
        roots.append(Path(extra).resolve())
    return roots


def confine(path: str | Path, name: str) -> Path:
    """`path` resolved (relative to the repository; `..` and symlinks resolved) when it lies inside one of
    allowed_roots(), else PathNotAllowed naming the roots and the allow-list setting."""
    p = resolve(path)
    roots = allowed_roots()
    if any(p == r or r in p.parents for r in roots):
        return p
    raise PathNotAllowed(f"DAG Param {name}={str(path)!r} resolves to {p}, outside the allowed roots "
                         f"{[str(r) for r in roots]}; add its folder to ${ALLOWED_ROOTS_ENV} in the environment "
                         "of the Airflow components to allow it")


def dag_settings(dag_params: dict) -> dict:
    """params.yaml (or the `params_file` Param, confined to the allowed roots; the repository's own
    params.yaml is always allowed) with the trigger form's values applied on top."""
    from twinv2.config import load_params

    overrides = dict(dag_params.get("overrides") or {})
    for field, dotted in PARAM_KEYS.items():
        if dag_params.get(field) is not None:
            overrides[dotted] = dag_params[field]
    pf = dag_params.get("params_file")
    path = None
    if pf:
        path = resolve(pf)
        if path != (REPO_ROOT / "params.yaml").resolve():
            path = confine(pf, "params_file")
    return load_params(path if path else REPO_ROOT / "params.yaml", overrides)


def run_dir(runs: str | Path, ctx: dict, model: str) -> Path:
    """RUNDIR of one model in one DAG run: <runs>/<dag_id>/<run_id>/<model> (runs confined)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in ctx["run_id"])
    return confine(runs, "runs") / ctx["dag_id"] / safe / model


def close_parent(parent_id: str, runs: dict[str, str] | None = None) -> None:
    """Mark the parent run finished; copy each model's test metrics onto it as <model>.<metric>."""
    from twinv2.io import read_json

    c = client()
    for model, run in (runs or {}).items():
        m = Path(run) / "metrics.json"
        if m.exists():
            log_metrics(c, parent_id, read_json(m), prefix=f"{model}.")
    finish(c, parent_id, ok=True)
