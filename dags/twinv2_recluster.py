"""
# twinv2_recluster

Weekly full re-clustering of every user's life-cycle history with the **champion's item embeddings**
(the `champion` alias of the registered model `twinv2`; the bootstrap SVD embedding when there is none).

1. **start**: MLflow parent run; fetch the champion's `item_embeddings.npz`.
2. **cluster_shard** x N (dynamic task mapping over user shards): full build (`incremental=False`).
3. **finalize_clusters**: publish the new immutable version as DIR/clusters/CURRENT.

The daily DAG's incremental clustering then continues from this version.
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
                  description="dataset directory (relative to the repository), holding validated/"),
    "params_file": Param("", type="string", description="another params.yaml (empty: the repository's)"),
    "n_shards": Param(_PARAMS.get("cluster", {}).get("n_shards"), type=["null", "integer"], minimum=1,
                      description="cluster.n_shards: parallel clustering tasks"),
    "overrides": Param({}, type="object", description='more params.yaml overrides, e.g. {"cluster.gamma": 30}'),
}


def _ctx() -> tuple[dict, dict]:
    from pipelines import tracking

    context = get_current_context()
    return tracking.airflow_context(context), tracking.dag_settings(context["params"])


@dag(dag_id="twinv2_recluster", schedule="@weekly", start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, params=PARAMS, doc_md=__doc__, tags=["twinv2"],
     dagrun_timeout=timedelta(hours=12))
def twinv2_recluster():
    @task(retries=0)
    def start() -> dict:
        """Open the MLflow parent run; find the champion's item embeddings."""
        from pipelines import register, tracking

        ctx, params = _ctx()
        data = tracking.resolve(get_current_context()["params"]["data"])
        parent = tracking.parent_run(ctx, data=data, params=params)
        emb = register.champion_embeddings(params)
        return {"parent": parent, "data": str(data), "embeddings": emb}

    @task
    def plan_shards(info: dict) -> list[str]:
        _, params = _ctx()
        n = int(params["cluster"].get("n_shards", 1))
        return [f"{i}/{n}" for i in range(n)]

    @task(doc_md="Full clustering of one shard of users with the champion's item embeddings.")
    def cluster_shard(info: dict, shard: str) -> dict:
        from pipelines import cluster as stage, tracking

        ctx, params = _ctx()
        rep = tracking.run_stage(ctx, info["parent"], "cluster", stage.run, key=shard, data=info["data"],
                                 tags={"incremental": False, "embeddings": info["embeddings"] or "bootstrap"},
                                 kwargs={"data": info["data"], "incremental": False, "shard": shard,
                                         "params": params, "embeddings": info["embeddings"]})
        return {"shard": shard, "version": rep["version"], "summary": rep.get("summary", "")}

    @task(doc_md="Publish the new cluster version (DIR/clusters/CURRENT).")
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
        tracking.close_parent(info["parent"])
        return {"summary": rep.get("summary", ""), "version": rep.get("version"), "shards": len(shards)}

    info = start()
    parts = cluster_shard.partial(info=info).expand(shard=plan_shards(info))
    finalize_clusters(info, parts)


twinv2_recluster()
