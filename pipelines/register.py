"""Register a trained run's model in MLflow as `twinv2`; the `challenger` / `champion` aliases.

    run(run, data=None, params=None)

- The registered version is the training run's logged pyfunc model (`model`, logged by `pipelines.train`;
  logged here when the run was trained without MLflow): source `models:/<model_id>`, `model_id` set, so
  `mlflow.pyfunc.load_model("models:/twinv2@champion")` and `mlflow models serve -m models:/twinv2@champion`
  work. The run directory's files (model.pt, config, item_embeddings.npz, metrics.json, plots) are also
  logged under `registry_model/` of the training run (found by its `run_dir` tag; created when the run was
  trained outside a DAG); the version's `files` tag points there.
- Idempotent: a run already registered reuses its version (no duplicate versions on retry / re-run).
- `challenger` always points at the newest registered version. `champion` moves to it only when its test
  GAUC beats the champion's GAUC *on the same test data* by `register.champion_margin`. When the champion
  was evaluated on other data (another data hash or cluster version), it is re-evaluated here on `data`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from twinv2.config import load_params
from twinv2.io import read_json

from pipelines import tracking

MODEL_ARTIFACTS = "registry_model"


def test_gauc(metrics: dict) -> float:
    """The test-split GAUC of a metrics.json (evaluate's report)."""
    for path in (("test", "gauc"), ("overall", "gauc"), ("gauc",), ("metrics", "gauc")):
        node: Any = metrics
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, (int, float)):
            return float(node)
    raise ValueError(f"metrics.json has no test GAUC: expected a key 'gauc' (top level or under 'test'), "
                     f"got keys {sorted(metrics)}")


def eval_key(data: str | Path | None) -> str:
    """What 'the same test data' means: the raw data hash and the cluster version models read."""
    if data is None:
        return "unknown"
    current = Path(data) / "clusters" / "CURRENT"
    clusters = current.read_text().strip() if current.exists() else "none"
    return f"{tracking.data_hash(data)}|{clusters}"


def checkpoint_hash(run: Path) -> str:
    model = run / "model.pt"
    if not model.exists():
        raise FileNotFoundError(f"{model} not found: register expects a trained run directory holding "
                                "model.pt (written by `twinv2 train --out RUN`)")
    return tracking._file_md5(model)


def _training_run_id(c, run: Path, data: str | Path | None) -> str:
    exp = tracking.experiment_id(c)
    newest = c.search_runs([exp], f"tags.run_dir = {tracking._quote(str(run))} and tags.stage = 'train'",
                           max_results=1, order_by=["attributes.start_time DESC"])   # the latest training
    found = newest[0] if newest else None
    if found is None:
        found = tracking._find_run(c, exp, {"run_dir": str(run), "role": "register-cli"})
    if found is not None:
        return found.info.run_id
    tags = {"run_dir": str(run), "role": "register-cli", "mlflow.runName": f"register:{run.name}",
            "git_commit": tracking.git_commit()}
    if data is not None:
        tags["dvc_data_hash"] = tracking.data_hash(data)
    run_id = c.create_run(tracking.experiment_id(c), tags=tags).info.run_id
    tracking.log_metrics(c, run_id, read_json(run / "metrics.json"))
    tracking.finish(c, run_id)
    return run_id


def _log_model_files(c, run_id: str, run: Path) -> None:
    files = [p for p in sorted(run.iterdir()) if p.is_file() and not p.name.startswith(".")]
    files += [p for p in (run / "plots",) if p.is_dir()]
    tracking.log_paths(c, run_id, files, MODEL_ARTIFACTS)


def champion_dir(version, dest: Path) -> Path:
    """A local directory holding the files of a registered version (its run_dir, else downloaded: the
    `files` tag's registry_model/ folder, else the logged model's run directory)."""
    local = Path(version.tags.get("run_dir", ""))
    if local.is_dir() and (local / "model.pt").exists():
        return local
    import mlflow

    dest.mkdir(parents=True, exist_ok=True)
    got = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.tags.get("files") or version.source,
                                                   dst_path=str(dest)))
    found = sorted(got.rglob("model.pt"))
    return found[0].parent if found else got


def logged_model_id(c, run_id: str, run: Path) -> str:
    """The model_id of the pyfunc model the training run logged (logged now when it has none)."""
    r = c.get_run(run_id)
    if r.data.tags.get("logged_model_id"):
        return r.data.tags["logged_model_id"]
    outputs = getattr(getattr(r, "outputs", None), "model_outputs", None) or []
    if outputs:
        return outputs[-1].model_id
    import mlflow

    from pipelines.train_tracking import log_pyfunc
    from twinv2.training.scoring import RunScorer

    world = RunScorer(run).world
    saved = os.environ.pop("MLFLOW_RUN_ID", None)     # the register stage's own bound run, if any
    try:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            return log_pyfunc(mlflow, run, world).model_id
    finally:
        if saved is not None:
            os.environ["MLFLOW_RUN_ID"] = saved


def champion_eval_run(c, version, challenger_run: str | None) -> str:
    """The MLflow run the champion's re-evaluation logs into: a child run (stage evaluate, key champion-v<N>) in
    the register's context. In a DAG task (register's own run bound as MLFLOW_RUN_ID) it hangs under the DAG
    run's parent with its dag_id / run_id / try_number; from the CLI under the challenger's training run, with
    dag_id 'cli'. Found again on a retry (tracking.child_run), never a stray run without a parent."""
    bound = os.environ.get("MLFLOW_RUN_ID")
    if bound:
        t = c.get_run(bound).data.tags
        ctx = {"dag_id": t.get("dag_id", "cli"), "run_id": t.get("run_id", "cli"), "try_number": t.get("try_number", 1)}
        parent = t.get("mlflow.parentRunId") or bound
    else:
        ctx = tracking.airflow_context(None)
        parent = challenger_run or tracking.parent_run(ctx)
    run_id = tracking.child_run(ctx, parent, "evaluate", key=f"champion-v{version.version}")
    c.set_tag(run_id, "role_in_register", "champion re-evaluation")
    return run_id


def champion_gauc_on(c, version, data: str | Path | None, key: str, scratch: Path, params: dict,
                     challenger_run: str | None = None) -> float:
    """The champion's test GAUC on the same test data as the challenger (re-evaluated if needed; that
    evaluation logs into champion_eval_run when MLflow tracking is on)."""
    if version.tags.get("eval_key") == key and "gauc" in version.tags:
        return float(version.tags["gauc"])
    if data is None:
        raise ValueError("the champion was evaluated on other data; pass data=DIR so that register can "
                         "re-evaluate it on the challenger's test data")
    from pipelines import evaluate

    src = champion_dir(version, scratch / "download")
    work = scratch / f"champion_v{version.version}"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src, work, ignore=shutil.ignore_patterns("metrics.json", "plots"))
    eval_run = champion_eval_run(c, version, challenger_run) if tracking.tracking_wanted() else None
    ok = False
    try:
        with tracking.bound_run(eval_run):                  # evaluate logs into it
            evaluate.run(data=data, run=work, params=params)
        ok = True
    finally:
        if eval_run:
            tracking.finish(c, eval_run, ok=ok)
    gauc = test_gauc(read_json(work / "metrics.json"))
    c.set_model_version_tag(version.name, version.version, "eval_key", key)
    c.set_model_version_tag(version.name, version.version, "gauc", repr(gauc))
    return gauc


def _link_logged_model(c, model_id: str, name: str, version) -> None:
    """The logged model lists its registered versions (tag mlflow.modelVersions, as mlflow.register_model
    sets it): the UI's logged-model page links to the registry. (The SQL registry keeps the link as the
    version's source `models:/<model_id>`; it does not return ModelVersion.model_id.)"""
    import json

    tag = "mlflow.modelVersions"
    have = json.loads(c.get_logged_model(model_id).tags.get(tag) or "[]")
    entry = {"name": name, "version": str(version)}
    if entry not in have:
        c.set_logged_model_tags(model_id, {tag: json.dumps(have + [entry])})


def run(run: str | Path, data: str | Path | None = None, params: dict | None = None) -> dict:
    params = params or load_params()
    cfg = params.get("register", {})
    name = cfg.get("model_name", "twinv2")
    margin = float(cfg.get("champion_margin", 0.0))
    run = Path(run).resolve()
    metrics_path = run / "metrics.json"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{metrics_path} not found: register needs an evaluated run "
                                "(run `twinv2 evaluate --data DIR --run RUN` first)")
    metrics = read_json(metrics_path)
    gauc = test_gauc(metrics)
    ckpt = checkpoint_hash(run)
    key = eval_key(data)

    c = tracking.client()
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="TWIN-V2 CTR model (aliases: champion, challenger)")

    # 1. the version of this run (reused when it exists: idempotent)
    mlflow_run = _training_run_id(c, run, data)
    existing = [v for v in c.search_model_versions(f"name = '{name}' and run_id = '{mlflow_run}'")
                if v.tags.get("checkpoint") == ckpt]
    if existing:
        version = sorted(existing, key=lambda v: int(v.version))[0]
        created = False
    else:
        art = c.list_artifacts(mlflow_run, MODEL_ARTIFACTS)
        if not any(a.path.endswith("model.pt") for a in art):
            _log_model_files(c, mlflow_run, run)
        files = f"{c.get_run(mlflow_run).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACTS}"
        model_id = logged_model_id(c, mlflow_run, run)
        version = c.create_model_version(
            name, source=f"models:/{model_id}", run_id=mlflow_run, model_id=model_id,
            tags={"checkpoint": ckpt, "run_dir": str(run), "gauc": repr(gauc), "eval_key": key,
                  "model": str(metrics.get("model", run.name)), "files": files, "model_id": model_id})
        _link_logged_model(c, model_id, name, version.version)
        created = True
    c.set_registered_model_alias(name, "challenger", version.version)

    # 2. the champion moves only on a real improvement on the same test data
    try:
        champ = c.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champ = None
    champion_gauc = None
    if champ is None:
        promoted, reason = True, "no champion yet"
    elif champ.version == version.version:
        promoted, reason = False, "this version already is the champion"
        champion_gauc = gauc
    else:
        scratch = run.parent / f".register-{hashlib.md5(str(run).encode()).hexdigest()[:8]}"
        champion_gauc = champion_gauc_on(c, champ, data, key, scratch, params, challenger_run=mlflow_run)
        shutil.rmtree(scratch, ignore_errors=True)
        promoted = gauc > champion_gauc + margin
        reason = (f"challenger GAUC {gauc:.4f} {'>' if promoted else '<='} champion v{champ.version} "
                  f"GAUC {champion_gauc:.4f} + margin {margin}")
    if promoted:
        c.set_registered_model_alias(name, "champion", version.version)
    final_champion = version.version if promoted else (champ.version if champ else None)
    report = {
        "model_name": name, "version": int(version.version), "created": created,
        "mlflow_run_id": mlflow_run, "challenger_gauc": gauc, "champion_gauc": champion_gauc,
        "previous_champion": int(champ.version) if champ else None, "champion": int(final_champion),
        "promoted": promoted, "reason": reason, "eval_key": key,
    }
    report["summary"] = (f"registered {name} v{version.version} ({'new' if created else 'existing'}) as "
                         f"challenger; champion = v{final_champion} ({reason})")
    return report


def champion_version(params: dict | None = None):
    """The registered version the `champion` alias points at, or None."""
    params = params or load_params()
    name = params.get("register", {}).get("model_name", "twinv2")
    from mlflow.exceptions import MlflowException

    try:
        return tracking.client().get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def champion_files(params: dict | None = None, dest: str | Path | None = None) -> Path | None:
    """A local directory with the champion's files (model.pt, item_embeddings.npz), or None."""
    version = champion_version(params)
    if version is None:
        return None
    import tempfile

    return champion_dir(version, Path(dest) if dest else Path(tempfile.mkdtemp(prefix="twinv2-champion-")))


def champion_checkpoint(params: dict | None = None, model: str | None = None) -> str | None:
    """The champion's model.pt for warm-starting `model` (only the registered model kind), else None."""
    params = params or load_params()
    name = params.get("register", {}).get("model_name", "twinv2")
    if model is not None and model != name:
        return None
    files = champion_files(params)
    return str(files / "model.pt") if files is not None and (files / "model.pt").exists() else None


def champion_embeddings(params: dict | None = None) -> str | None:
    """The champion's item_embeddings.npz (for full re-clustering), else None."""
    files = champion_files(params)
    if files is None or not (files / "item_embeddings.npz").exists():
        return None
    return str(files / "item_embeddings.npz")
