"""
# twinv2_daily

The daily TWIN-V2 pipeline on one dataset directory (`data`, default from params.yaml `airflow.data_dir`):

1. **validate** the day's data (`twinv2 validate`): a table-level failure fails the run here
   (AirflowFailException, no retries) and nothing downstream runs; the MLflow run shows why.
2. **cluster_shard** x N (dynamic task mapping over user shards): incremental clustering when a cluster
   version exists, a full build otherwise; **finalize_clusters** publishes the new version.
3. **train** each model (TWIN-V2 and the TWIN baseline), TWIN-V2 warm-started from the `champion`.
4. **evaluate** each model on the test split (AUC, GAUC, logloss, oracle gap, diversity).
5. **register** the TWIN-V2 run as `challenger`; `champion` moves only when it beats the champion's GAUC
   on the same test data by `register.champion_margin`.

Every task logs a child run under one MLflow parent run per DAG run (experiment `twinv2`).
Parameters of the trigger form default to params.yaml. This file stays thin: no heavy imports here.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import yaml
from airflow.sdk import Param, dag, get_current_context, task

_PARAMS = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text()) or {}
_AF = _PARAMS.get("airflow", {})

DEFAULT_ARGS = {
    "owner": "twinv2",
    "retries": int(_AF.get("retries", 2)),
    "retry_delay": timedelta(seconds=float(_AF.get("retry_delay_s", 30))),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}

PARAMS = {
    "data": Param(_AF.get("data_dir", "data/world"), type="string",
                  description="dataset directory (relative to the repository), holding raw/"),
    "runs": Param(_AF.get("runs_dir", "runs"), type="string", description="where run directories go"),
    "models": Param(list(_AF.get("models", ["twinv2", "twin"])), type="array",
                    description="models to train and evaluate (TWIN-V2 is registered)"),
    "params_file": Param("", type="string", description="another params.yaml (empty: the repository's)"),
    "train_epochs": Param(_PARAMS.get("train", {}).get("epochs"), type=["null", "integer"],
                          description="train.epochs"),
    "train_lr": Param(_PARAMS.get("train", {}).get("lr"), type=["null", "number"], description="train.lr"),
    "n_shards": Param(_PARAMS.get("cluster", {}).get("n_shards"), type=["null", "integer"], minimum=1,
                      description="cluster.n_shards: parallel clustering tasks"),
    "champion_margin": Param(_PARAMS.get("register", {}).get("champion_margin"), type=["null", "number"],
                             description="register.champion_margin (GAUC)"),
    "overrides": Param({}, type="object", description='more params.yaml overrides, e.g. {"model.topk": 20}'),
}


def _ctx() -> tuple[dict, dict]:
    from pipelines import tracking

    context = get_current_context()
    return tracking.airflow_context(context), tracking.dag_settings(context["params"])


@dag(dag_id="twinv2_daily", schedule="@daily", start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, params=PARAMS, doc_md=__doc__, tags=["twinv2"],
     dagrun_timeout=timedelta(hours=6))
def twinv2_daily():
    @task(retries=0)
    def start() -> dict:
        """Open (or find again) the MLflow parent run of this DAG run."""
        from pipelines import tracking

        ctx, params = _ctx()
        p = get_current_context()["params"]
        data = tracking.resolve(p["data"])
        parent = tracking.parent_run(ctx, data=data, params=params)
        return {"parent": parent, "data": str(data), "runs": p["runs"], "models": list(p["models"])}

    @task(retries=0, doc_md="Validate DIR/raw into validated/ + quarantine/. A table-level failure stops "
                            "the DAG run here (AirflowFailException): nothing is clustered or trained.")
    def validate(info: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines import tracking, validate as stage
        from twinv2.errors import ValidationFailed

        ctx, params = _ctx()
        reports = Path(info["data"]) / "reports"
        try:
            rep = tracking.run_stage(ctx, info["parent"], "validate", stage.run, data=info["data"],
                                     params=params, artifacts=[reports / "validation.json",
                                                               reports / "data_docs"],
                                     kwargs={"data": info["data"], "params": params})
        except ValidationFailed as e:
            raise AirflowFailException(f"validation failed for {info['data']}: {e}") from e
        return {k: v for k, v in rep.items() if k in ("summary", "mlflow_run_id")}

    @task
    def plan_shards(info: dict, validated: dict) -> list[str]:
        """One clustering task per user shard (cluster.n_shards)."""
        _, params = _ctx()
        n = int(params["cluster"].get("n_shards", 1))
        return [f"{i}/{n}" for i in range(n)]

    @task(doc_md="Cluster one shard of users: incremental when a cluster version exists, else full.")
    def cluster_shard(info: dict, shard: str) -> dict:
        from pipelines import cluster as stage, tracking

        ctx, params = _ctx()
        incremental = (Path(info["data"]) / "clusters" / "CURRENT").exists()
        rep = tracking.run_stage(ctx, info["parent"], "cluster", stage.run, key=shard, data=info["data"],
                                 tags={"incremental": incremental},
                                 kwargs={"data": info["data"], "incremental": incremental, "shard": shard,
                                    "params": params})
        return {"shard": shard, "incremental": incremental, "version": rep["version"],
                "summary": rep.get("summary", "")}

    @task(doc_md="Publish the cluster version built by the shard tasks (DIR/clusters/CURRENT).")
    def finalize_clusters(info: dict, shards) -> dict:
        shards = list(shards)
        from pipelines import cluster as stage, tracking

        ctx, params = _ctx()
        versions = {s["version"] for s in shards}
        if len(versions) != 1:
            raise RuntimeError(f"shard tasks built different cluster versions {sorted(versions)}: inputs changed "
                               "between shards; clear the run and retry")
        reports = Path(info["data"]) / "reports"
        rep = tracking.run_stage(ctx, info["parent"], "cluster_finalize", stage.finalize, data=info["data"],
                                 artifacts=[reports / "cluster.json"],
                                 kwargs={"data": info["data"], "version": versions.pop(), "params": params})
        return {"summary": rep.get("summary", ""), "version": rep.get("version"), "shards": len(shards)}

    @task
    def plan_models(info: dict, clusters: dict) -> list[str]:
        return list(info["models"])

    @task(doc_md="Train one model; TWIN-V2 starts from the champion's checkpoint when there is one.")
    def train(info: dict, model: str) -> dict:
        from pipelines import register, tracking, train as stage

        ctx, params = _ctx()
        out = tracking.run_dir(info["runs"], ctx, model)
        warm = register.champion_checkpoint(params, model)
        resume = (out / "model.pt").exists() or any(out.glob("checkpoint*"))
        tracking.run_stage(ctx, info["parent"], "train", stage.run, key=model, data=info["data"],
                           params=params, tags={"model": model, "run_dir": out, "warm_start": warm or "none"},
                           bind_run=True,
                           kwargs={"data": info["data"], "model": model, "out": out, "params": params,
                              "resume": resume, "warm_start": warm})
        return {"model": model, "run": str(out)}

    @task(doc_md="Offline metrics of one model on the test split (same metric names for every model).")
    def evaluate(info: dict, trained: dict) -> dict:
        from pipelines import evaluate as stage, tracking

        ctx, params = _ctx()
        run = Path(trained["run"])
        rep = tracking.run_stage(ctx, info["parent"], "evaluate", stage.run, key=trained["model"],
                                 data=info["data"], tags={"model": trained["model"], "run_dir": run},
                                 artifacts=[run / "metrics.json", run / "plots"],
                                 bind_run=True,
                                 kwargs={"data": info["data"], "run": run, "params": params})
        return {**trained, "summary": rep.get("summary", "")}

    @task(doc_md="Register TWIN-V2 as `challenger`; move `champion` only on a GAUC improvement.")
    def register(info: dict, evaluated: list[dict]) -> dict:
        from pipelines import register as stage, tracking

        ctx, params = _ctx()
        name = params.get("register", {}).get("model_name", "twinv2")
        runs = [e for e in evaluated if e["model"] == name]
        if not runs:
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException(f"model {name!r} was not trained in this run: nothing to register")
        rep = tracking.run_stage(ctx, info["parent"], "register", stage.run, data=info["data"],
                                 kwargs={"run": runs[0]["run"], "data": info["data"], "params": params})
        tracking.close_parent(info["parent"], {e["model"]: e["run"] for e in evaluated})
        from twinv2.io import write_json

        write_json(Path(runs[0]["run"]).parent / "register.json", rep)
        return rep

    info = start()
    validated = validate(info)
    parts = cluster_shard.partial(info=info).expand(shard=plan_shards(info, validated))
    clusters = finalize_clusters(info, parts)
    trained = train.partial(info=info).expand(model=plan_models(info, clusters))
    evaluated = evaluate.partial(info=info).expand(trained=trained)
    register(info, evaluated)


twinv2_daily()
