"""What both twinv2 DAG files share: settings read from params.yaml, the trigger-form Params, the Assets,
and the tasks' common steps (MLflow context, shard planning, publishing a cluster version).

Imported by dags/twinv2_daily.py and dags/twinv2_recluster.py at parse time, so it stays light: yaml and
airflow.sdk only; pipelines/twinv2 (torch, MLflow, GX) are imported inside the task bodies. Listed in
dags/.airflowignore: the DAG processor does not parse it as a DAG file of its own.
"""
from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from airflow.sdk import Asset, CronTriggerTimetable, Param, get_current_context

REPO = Path(__file__).resolve().parent.parent
SETTINGS: dict[str, Any] = yaml.safe_load((REPO / "params.yaml").read_text()) or {}
AF: dict[str, Any] = SETTINGS.get("airflow", {})

DEFAULT_ARGS = {
    "owner": "twinv2",
    "retries": int(AF.get("retries", 2)),
    # params.yaml airflow.retry_delay_s; TWINV2_RETRY_DELAY_S (seconds) overrides it for one deployment (a test
    # or dev cluster whose failover should not wait 30 s), read where the DAGs are parsed
    "retry_delay": timedelta(seconds=float(os.environ.get("TWINV2_RETRY_DELAY_S") or AF.get("retry_delay_s", 30))),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}



def cron(expression: str) -> CronTriggerTimetable:
    """A cron timetable (UTC) whose first scheduled run is the next cron time after the DAG is unpaused, never
    one already past, so that unpausing from the trigger form makes no scheduled run beside the triggered one.
    Airflow 3.3 with catchup=False schedules the latest past cron time at once when the DAG has a start_date
    (restriction.earliest), and without one when the last cron time is within run_immediately of now
    (False acts like None there: 10% of the period). So the DAGs have no start_date and run_immediately is 0
    (the first run waits for the next cron time; DagModel.next_dagrun is recomputed at every parse)."""
    return CronTriggerTimetable(expression, timezone="UTC", run_immediately=timedelta(0))


# Assets: the weekly re-clustering publishes a cluster version, the daily DAG consumes it (it is scheduled
# daily *or* when a new version is published, AssetOrTimeSchedule); register updates the champion model,
# which the weekly re-clustering reads (its item embeddings). Both show in the UI's Assets view.
CLUSTER_VERSION = Asset(name="twinv2_cluster_version", uri="twinv2://clusters/current", group="twinv2",
                        extra={"what": "DIR/clusters/CURRENT: a complete, immutable cluster version"})
CHAMPION = Asset(name="twinv2_champion", uri="twinv2://models/twinv2@champion", group="twinv2",
                 extra={"what": "MLflow registered model twinv2, alias champion"})

PATH_NOTE = ("relative to the repository; must lie under its data/ or runs/ root, or under a folder of "
             "$TWINV2_ALLOWED_ROOTS set for the Airflow components")


def _default(section: str, key: str):
    return SETTINGS.get(section, {}).get(key)


def params(*, data_doc: str, models: bool, training: bool, overrides_example: str) -> dict[str, Param]:
    """The trigger form. Every Param validates with its default (nothing required is left empty: fields that
    may stay empty accept null), so the form's Trigger button is enabled as it opens."""
    p = {
        "data": Param(AF.get("data_dir", "data/world"), type="string", minLength=1,
                      description=f"dataset directory holding {data_doc} ({PATH_NOTE})"),
    }
    if models:
        p["runs"] = Param(AF.get("runs_dir", "runs"), type="string", minLength=1,
                          description=f"where run directories go ({PATH_NOTE})")
        p["models"] = Param(list(AF.get("models", ["twinv2", "twin"])), type="array", minItems=1,
                            items={"type": "string"}, description="models to train and evaluate (TWIN-V2 is registered)")
    p["params_file"] = Param(None, type=["null", "string"],
                             description=f"another params.yaml (empty: the repository's; {PATH_NOTE})")
    if training:
        p["train_epochs"] = Param(_default("train", "epochs"), type=["null", "integer"], minimum=1,
                                  description="train.epochs")
        p["train_lr"] = Param(_default("train", "lr"), type=["null", "number"], exclusiveMinimum=0,
                              description="train.lr")
        p["train_nodes"] = Param(1, type="integer", minimum=1, maximum=64,
                                 description="torchrun nodes of each model's training: 1 trains in the task's "
                                             "process; N > 1 launches N local torchrun nodes (c10d rendezvous "
                                             "on 127.0.0.1, DDP) from the task (docs/scaling.md, Multi-node "
                                             "training)")
    p["n_shards"] = Param(_default("cluster", "n_shards"), type=["null", "integer"], minimum=1,
                          description="cluster.n_shards: parallel clustering tasks")
    if training:
        p["champion_margin"] = Param(_default("register", "champion_margin"), type=["null", "number"],
                                     description="register.champion_margin (GAUC)")
    p["overrides"] = Param({}, type=["null", "object"],
                           description=f"more params.yaml overrides, e.g. {overrides_example}")
    return p


def ctx() -> tuple[dict, dict]:
    """(the MLflow identity of this task instance, params.yaml with the trigger form applied)."""
    from pipelines import tracking

    context = get_current_context()
    return tracking.airflow_context(context), tracking.dag_settings(context["params"])


def label(text: str) -> None:
    """The mapped task instance's name in the UI (map_index_template="{{ label }}")."""
    get_current_context()["label"] = text  # type: ignore[index]


@contextlib.contextmanager
def stdout_progress():
    """Airflow 3 logs what a task writes to stderr at ERROR level (red in the log view). The stages' progress
    bars (tqdm) write to sys.stderr, so while a stage runs in a task, sys.stderr is the task's stdout (INFO).
    Exceptions still fail the task and are logged by Airflow with their traceback."""
    with contextlib.redirect_stderr(sys.stdout):
        yield


def run_stage(*args, **kwargs):
    """pipelines.tracking.run_stage with the stage's progress lines on stdout (stdout_progress)."""
    from pipelines import tracking

    with stdout_progress():
        return tracking.run_stage(*args, **kwargs)


def start_info(extra: dict | None = None) -> dict:
    """Open (or find again) the MLflow parent run; the confined data/runs paths of this DAG run."""
    from pipelines import tracking

    c, settings = ctx()
    p = get_current_context()["params"]
    data = tracking.confine(p["data"], "data")
    info = {"data": str(data)}
    if "runs" in p:
        info["runs"] = str(tracking.confine(p["runs"], "runs"))
    if "models" in p:
        info["models"] = list(p["models"])
    info["parent"] = tracking.parent_run(c, data=data, params=settings)
    return {**info, **(extra or {})}


def shards() -> list[str]:
    """One clustering task per user shard (cluster.n_shards)."""
    _, settings = ctx()
    n = int(settings["cluster"].get("n_shards", 1))
    return [f"{i}/{n}" for i in range(n)]


def cluster_shard(info: dict, shard: str, incremental: bool, embeddings: str | None = None) -> dict:
    from pipelines import cluster as stage

    label(f"shard {shard}")
    c, settings = ctx()
    tags: dict[str, Any] = {"incremental": incremental}
    kwargs: dict[str, Any] = {"data": info["data"], "incremental": incremental, "shard": shard, "params": settings}
    if not incremental:
        tags["embeddings"] = embeddings or "bootstrap"
        kwargs["embeddings"] = embeddings
    rep = run_stage(c, info["parent"], "cluster", stage.run, key=shard, data=info["data"],
                             params=settings, tags=tags, kwargs=kwargs)
    return {"shard": shard, "incremental": incremental, "version": rep["version"], "summary": rep.get("summary", "")}


def finalize_clusters(info: dict, parts, asset: Asset | None = None) -> dict:
    """Publish the version the shard tasks built (DIR/clusters/CURRENT); its id goes on the asset event."""
    from pipelines import cluster as stage

    parts = list(parts)
    c, settings = ctx()
    versions = {s["version"] for s in parts}
    if len(versions) != 1:
        raise RuntimeError(f"shard tasks built different cluster versions {sorted(versions)}: inputs changed "
                           "between shards; clear the run and retry")
    reports = Path(info["data"]) / "reports"
    rep = run_stage(c, info["parent"], "cluster_finalize", stage.finalize, data=info["data"],
                             params=settings, artifacts=[reports / "cluster.json"],
                             kwargs={"data": info["data"], "version": versions.pop(), "params": settings})
    if asset is not None:
        get_current_context()["outlet_events"][asset].extra = {"version": str(rep.get("version")),
                                                               "data": info["data"]}
    return {"summary": rep.get("summary", ""), "version": rep.get("version"), "shards": len(parts)}
