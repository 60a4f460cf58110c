"""
# twinv2_recluster

Weekly full re-clustering of every user's life-cycle history with the **champion's item embeddings**
(the `champion` alias of the registered model `twinv2`; the bootstrap SVD embedding when there is none).

1. **start**: MLflow parent run; fetch the champion's `item_embeddings.npz`.
2. **cluster_shard** x N (dynamic task mapping over user shards): full build (`incremental=False`).
3. **finalize_clusters**: publish the new immutable version as DIR/clusters/CURRENT.

The new version is an event of the `twinv2_cluster_version` Asset: it triggers the daily DAG, whose
incremental clustering then continues from this version.
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from airflow.sdk import dag, task

if str(Path(__file__).resolve().parent) not in sys.path:  # the DAG folder is not on sys.path in every parser
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import twinv2_common as common  # noqa: E402

PARAMS = common.params(data_doc="validated/", models=False, training=False,
                       overrides_example='{"cluster.gamma": 30}')


# weekly, Sunday 00:00 UTC (the first time after unpausing: no run for a past Sunday, common.cron)
@dag(dag_id="twinv2_recluster", schedule=common.cron("0 0 * * 0"), catchup=False,
     max_active_runs=1, default_args=common.DEFAULT_ARGS, params=PARAMS, doc_md=__doc__, tags=["twinv2"],
     dagrun_timeout=timedelta(hours=12))
def twinv2_recluster():
    @task(retries=0, inlets=[common.CHAMPION])
    def start() -> dict:
        """Open the MLflow parent run; find the champion's item embeddings."""
        from pipelines import register

        _, params = common.ctx()
        return common.start_info({"embeddings": register.champion_embeddings(params)})

    @task
    def plan_shards(info: dict) -> list[str]:
        return common.shards()

    @task(doc_md="Full clustering of one shard of users with the champion's item embeddings.",
          map_index_template="{{ label }}")
    def cluster_shard(info: dict, shard: str) -> dict:
        return common.cluster_shard(info, shard, incremental=False, embeddings=info["embeddings"])

    @task(doc_md="Publish the new cluster version (DIR/clusters/CURRENT): an event of the cluster-version "
                 "asset, which schedules the daily DAG.", outlets=[common.CLUSTER_VERSION])
    def finalize_clusters(info: dict, shards) -> dict:
        from pipelines import tracking

        out = common.finalize_clusters(info, shards, asset=common.CLUSTER_VERSION)
        tracking.close_parent(info["parent"])
        return out

    info = start()
    parts = cluster_shard.partial(info=info).expand(shard=plan_shards(info))
    finalize_clusters(info, parts)


twinv2_recluster()
