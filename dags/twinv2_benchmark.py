"""
# twinv2_benchmark

The experiment matrix of `twinv2 benchmark` (docs/results.md, "How to run the benchmark"), manual trigger only:

1. **start**: the MLflow parent run of this benchmark; the data/out paths (confined like the other DAGs).
2. **plan**: the cells (model, variant, seed); builds or finds the cluster version of every variant whose
   `cluster` params differ (content-addressed versions; DIR/clusters/CURRENT is left as it was).
3. **cell** x N (dynamic task mapping, one task per cell, named `model/variant/seed<S>`): train + evaluate
   in a nested MLflow run; a finished cell is not recomputed, a retried one resumes from its checkpoints.
4. **report**: `out/results.json`, `out/results.md` (main, ablations, user groups, diversity, cost) and
   `out/plots/`, logged on the parent run.

Variants are the named override sets of params.yaml `benchmark.variants`. This file stays thin: no heavy
imports here.
"""
from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task

if str(Path(__file__).resolve().parent) not in sys.path:  # the DAG folder is not on sys.path in every parser
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import twinv2_common as common  # noqa: E402

BM = common.SETTINGS.get("benchmark", {}) or {}
_SEEDS = BM.get("seeds", 3)
_DEFAULT = BM.get("default_variant", "default")
_VARIANTS = [_DEFAULT] + [v for v in (BM.get("run_variants") or BM.get("variants") or {}) if v != _DEFAULT]
PARAMS = {
    "data": Param(common.AF.get("data_dir", "data/world"), type="string", minLength=1,
                  description=f"dataset directory holding validated/ ({common.PATH_NOTE})"),
    "out": Param(str(Path(common.AF.get("runs_dir", "runs")) / "benchmark"), type="string", minLength=1,
                 description=f"benchmark directory: cells/, results.json, results.md, plots/ ({common.PATH_NOTE})"),
    "models": Param(list(BM.get("models") or ["twinv2", "twin"]), type="array", minItems=1, items={"type": "string"},
                    description="models (params.yaml benchmark.models)"),
    "seeds": Param(_SEEDS if isinstance(_SEEDS, int) else len(_SEEDS), type="integer", minimum=1,
                   description="number of training seeds: train.seed 0..N-1 (params.yaml benchmark.seeds)"),
    "variants": Param(_VARIANTS, type="array", minItems=1, items={"type": "string"},
                      description="variants of params.yaml benchmark.variants (`default` always runs; the others "
                                  "for benchmark.ablation_models)"),
    "params_file": Param(None, type=["null", "string"],
                         description=f"another params.yaml (empty: the repository's; {common.PATH_NOTE})"),
    "overrides": Param({}, type=["null", "object"],
                       description='more params.yaml overrides, e.g. {"train.epochs": 2}'),
}


@dag(dag_id="twinv2_benchmark", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1,
     default_args=common.DEFAULT_ARGS, params=PARAMS, doc_md=__doc__, tags=["twinv2", "benchmark"],
     dagrun_timeout=timedelta(hours=24))
def twinv2_benchmark():
    @task(retries=0)
    def start() -> dict:
        """Open (or find again) the MLflow parent run of this benchmark; check the data/out paths."""
        from pipelines import tracking

        c, settings = common.ctx()
        p = get_current_context()["params"]
        data = tracking.confine(p["data"], "data")
        out = tracking.confine(p["out"], "out")
        return {"data": str(data), "out": str(out), "parent": tracking.parent_run(c, data=data, params=settings)}

    @task(doc_md="The cells (model, variant, seed) with their effective params; the cluster version of every "
                 "variant is built or found (content-addressed) and pinned in its cells.")
    def plan(info: dict) -> list[dict]:
        from pipelines import benchmark

        _, settings = common.ctx()
        p = get_current_context()["params"]
        cells = benchmark.plan(settings, models=p["models"], seeds=int(p["seeds"]), variants=p["variants"])
        return benchmark.prepare(info["data"], settings, cells)

    @task(doc_md="Train and evaluate one cell in a nested MLflow run; done cells are not recomputed, a retry "
                 "resumes from the cell's checkpoints.", map_index_template="{{ label }}")
    def cell(info: dict, cell: dict) -> dict:
        from pipelines import benchmark

        common.label(cell["label"])
        c, _ = common.ctx()
        with common.stdout_progress():
            rec = benchmark.run_cell(info["data"], info["out"], cell, track=(c, info["parent"]))
        return {"label": cell["label"], "key": cell["key"], "auc": (rec.get("metrics") or {}).get("auc")}

    @task(doc_md="results.json, results.md and plots/ of every cell; logged on the parent run, which closes.")
    def report(info: dict, cells: list[dict], done) -> dict:
        from pipelines import benchmark, tracking

        c, settings = common.ctx()
        rep = benchmark.report_from_dir(info["data"], info["out"], list(cells), settings,
                                        command=f"Airflow DAG twinv2_benchmark, run {c['run_id']}")
        out = Path(info["out"])
        client = tracking.client()
        tracking.log_paths(client, info["parent"], [out / "results.json", out / "results.md", out / "plots"],
                           "benchmark")
        tracking.finish(client, info["parent"], ok=True)
        return {"results": str(out / "results.md"), "plots": rep["plots"]}

    info = start()
    cells = plan(info)
    done = cell.partial(info=info).expand(cell=cells)
    report(info, cells, done)


twinv2_benchmark()
