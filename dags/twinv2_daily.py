"""
# twinv2_daily

The daily TWIN-V2 pipeline on one dataset directory (`data`, default from params.yaml `airflow.data_dir`):

1. **validate** the day's data (`twinv2 validate`): a table-level failure fails the run here
   (AirflowFailException, no retries) and nothing downstream runs; the MLflow run shows why.
2. **cluster_shard** x N (dynamic task mapping over user shards): incremental clustering when a cluster
   version exists, a full build otherwise; **finalize_clusters** publishes the new version.
3. **train** each model (TWIN-V2 and the TWIN baseline), TWIN-V2 warm-started from the `champion`; with
   `train_nodes` > 1 as that many local torchrun nodes (docs/scaling.md, "Multi-node training").
4. **evaluate** each model on the test split (AUC, GAUC, logloss, oracle gap, diversity).
5. **register** the TWIN-V2 run as `challenger`; `champion` moves only when it beats the champion's GAUC
   on the same test data by `register.champion_margin`.

Every task logs a child run under one MLflow parent run per DAG run (experiment `twinv2`).
Parameters of the trigger form default to params.yaml. This file stays thin: no heavy imports here.
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from airflow.sdk import AssetOrTimeSchedule, dag, get_current_context, task

if str(Path(__file__).resolve().parent) not in sys.path:  # the DAG folder is not on sys.path in every parser
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import twinv2_common as common  # noqa: E402

PARAMS = common.params(data_doc="raw/", models=True, training=True, overrides_example='{"model.topk": 20}')
# daily at midnight UTC (the first time after unpausing: no run for a past midnight, common.cron), and as soon
# as the weekly re-clustering publishes a new cluster version
SCHEDULE = AssetOrTimeSchedule(timetable=common.cron("0 0 * * *"), assets=common.CLUSTER_VERSION)


@dag(dag_id="twinv2_daily", schedule=SCHEDULE, catchup=False,
     max_active_runs=1, default_args=common.DEFAULT_ARGS, params=PARAMS, doc_md=__doc__, tags=["twinv2"],
     dagrun_timeout=timedelta(hours=6))
def twinv2_daily():
    @task(retries=0)
    def start() -> dict:
        """Open (or find again) the MLflow parent run of this DAG run; check the data/runs paths."""
        return common.start_info()

    @task(retries=0, doc_md="Validate DIR/raw into validated/ + quarantine/. A table-level failure stops "
                            "the DAG run here (AirflowFailException): nothing is clustered or trained.")
    def validate(info: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines import validate as stage
        from twinv2.errors import ValidationFailed

        ctx, params = common.ctx()
        reports = Path(info["data"]) / "reports"
        try:
            rep = common.run_stage(ctx, info["parent"], "validate", stage.run, data=info["data"],
                                     params=params, artifacts=[reports / "validation.json",
                                                               reports / "data_docs"],
                                     kwargs={"data": info["data"], "params": params})
        except ValidationFailed as e:
            raise AirflowFailException(f"validation failed for {info['data']}: {e}") from e
        return {k: v for k, v in rep.items() if k in ("summary", "mlflow_run_id")}

    @task
    def plan_shards(info: dict, validated: dict) -> list[str]:
        """One clustering task per user shard (cluster.n_shards)."""
        return common.shards()

    @task(doc_md="Cluster one shard of users: incremental when a cluster version exists, else full.",
          map_index_template="{{ label }}")
    def cluster_shard(info: dict, shard: str) -> dict:
        return common.cluster_shard(info, shard, incremental=(Path(info["data"]) / "clusters" / "CURRENT").exists())

    @task(doc_md="Publish the cluster version built by the shard tasks (DIR/clusters/CURRENT).")
    def finalize_clusters(info: dict, shards) -> dict:
        return common.finalize_clusters(info, shards)

    @task
    def plan_models(info: dict, clusters: dict) -> list[str]:
        return list(info["models"])

    @task(doc_md="Train one model; TWIN-V2 starts from the champion's checkpoint when there is one. "
                 "`train_nodes` > 1: N local torchrun nodes (DDP over a c10d rendezvous); a retry resumes "
                 "from the newest checkpoint.",
          map_index_template="{{ label }}")
    def train(info: dict, model: str) -> dict:
        from pipelines import register, tracking, train as stage

        common.label(model)
        ctx, params = common.ctx()
        out = tracking.run_dir(info["runs"], ctx, model)
        warm = register.champion_checkpoint(params, model)
        resume = (out / "model.pt").exists() or any(out.glob("checkpoint*"))
        kwargs = {"data": info["data"], "model": model, "out": out, "params": params, "resume": resume,
                  "warm_start": warm}
        nodes = int(get_current_context()["params"].get("train_nodes") or 1)
        fn = stage.run
        if nodes > 1:                                   # rank 0 logs into this task's MLflow run (bind_run)
            from pipelines import multinode

            fn, kwargs = multinode.run_local, {**kwargs, "nodes": nodes}
        common.run_stage(ctx, info["parent"], "train", fn, key=model, data=info["data"], params=params,
                           tags={"model": model, "run_dir": out, "warm_start": warm or "none", "train_nodes": nodes},
                           bind_run=True, kwargs=kwargs)
        return {"model": model, "run": str(out)}

    @task(doc_md="Offline metrics of one model on the test split (same metric names for every model).",
          map_index_template="{{ label }}")
    def evaluate(info: dict, trained: dict) -> dict:
        from pipelines import evaluate as stage

        common.label(trained["model"])
        ctx, params = common.ctx()
        run = Path(trained["run"])
        rep = common.run_stage(ctx, info["parent"], "evaluate", stage.run, key=trained["model"],
                                 data=info["data"], params=params, tags={"model": trained["model"], "run_dir": run},
                                 artifacts=[run / "metrics.json", run / "plots"],
                                 bind_run=True,
                                 kwargs={"data": info["data"], "run": run, "params": params})
        return {**trained, "summary": rep.get("summary", "")}

    @task(doc_md="Register TWIN-V2 as `challenger`; move `champion` only on a GAUC improvement.",
          outlets=[common.CHAMPION])
    def register(info: dict, evaluated: list[dict]) -> dict:
        from pipelines import register as stage, tracking

        ctx, params = common.ctx()
        name = params.get("register", {}).get("model_name", "twinv2")
        runs = [e for e in evaluated if e["model"] == name]
        if not runs:
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException(f"model {name!r} was not trained in this run: nothing to register")
        # bind_run: a re-evaluation of the champion logs as a child of this DAG run (register.champion_eval_run)
        rep = common.run_stage(ctx, info["parent"], "register", stage.run, data=info["data"], params=params,
                               bind_run=True, kwargs={"run": runs[0]["run"], "data": info["data"], "params": params})
        tracking.close_parent(info["parent"], {e["model"]: e["run"] for e in evaluated})
        from twinv2.io import write_json

        write_json(Path(runs[0]["run"]).parent / "register.json", rep)
        get_current_context()["outlet_events"][common.CHAMPION].extra = {
            "champion": rep["champion"], "challenger": rep["version"], "promoted": rep["promoted"]}
        return rep

    info = start()
    validated = validate(info)
    parts = cluster_shard.partial(info=info).expand(shard=plan_shards(info, validated))
    clusters = finalize_clusters(info, parts)
    trained = train.partial(info=info).expand(model=plan_models(info, clusters))
    evaluated = evaluate.partial(info=info).expand(trained=trained)
    register(info, evaluated)


twinv2_daily()
