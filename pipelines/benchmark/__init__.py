"""`twinv2 benchmark --data DIR --out OUT [--models ...] [--seeds N] [--variants ...]`: the experiment matrix.

A cell is (model, variant, seed). Its params are params.yaml + the variant's overrides (params.yaml
`benchmark.variants`, dotted keys) + train.seed = seed + train.cluster_version = the cluster version built
with the variant's `cluster` section (content-addressed by pipelines.cluster: two variants with different
clustering params get different versions; the same params the same one). Every cell calls the stage
functions themselves (pipelines.train.run, pipelines.evaluate.run) into OUT/cells/<model>/<variant>/seed<S>/run.

One idea a module (each imports only those above it in this list):

    cost        GSU positions and multiply-adds per candidate (macs_per_candidate, model_macs)
    stats       mean +- std over seeds, paired differences with a 95% t-interval, their printed forms
    planning    settings, plan, select, cell_key, prepare (cluster versions), shown_command
    cells       run_cell (one cell, resumable and idempotent), adopt, is_done
    tabulation  the tables as rows, flat_metrics (dvc metrics)
    figures     the plots
    reporting   report (OUT/results.json, results.md, metrics.json, plots), markdown, publish
    matrix      run (all of it: the CLI; one MLflow parent run with a nested run per cell when tracking is on),
                report_from_dir (the DAG's report task), rerender (the report of a stored results.json again)

Resumable and idempotent: a cell is done when OUT/.../cell.json (written atomically, last) holds the key of
its effective params (sha256 of model, params sections and cluster version); a done cell is never
recomputed. A cell without it (crashed or killed) is re-run: training continues from its newest epoch
checkpoint (`resume=True`) when one exists, a finished training (model.pt + train_metrics.json) is not
redone, only evaluate; a cell whose params changed (another key) starts afresh.
"""
from __future__ import annotations

from pipelines.benchmark.cells import METRIC_KEYS, RECORD_KEYS, adopt, is_done, run_cell
from pipelines.benchmark.cost import gsu_positions, macs_per_candidate, model_macs
from pipelines.benchmark.figures import more_plots, plots
from pipelines.benchmark.matrix import bench_id, build_meta, report_from_dir, rerender, run
from pipelines.benchmark.planning import (DEFAULT_VARIANT, EXECUTION_ONLY, KEY_DEFAULTS, KEY_ONLY_FOR, KEY_SECTIONS,
                                          cell_dir, cell_key, cluster_summary, clusters_of, digest, effective_params,
                                          label, load_params_from, plan, prepare, select, settings, shown_command,
                                          shown_path)
from pipelines.benchmark.reporting import BEGIN, END, markdown, publish, report
from pipelines.benchmark.stats import mean_std, paired
from pipelines.benchmark.tabulation import flat_metrics, tables

__all__ = ["BEGIN", "DEFAULT_VARIANT", "END", "EXECUTION_ONLY", "KEY_DEFAULTS", "KEY_ONLY_FOR", "KEY_SECTIONS",
           "METRIC_KEYS", "RECORD_KEYS", "adopt", "bench_id", "build_meta", "cell_dir", "cell_key",
           "cluster_summary", "clusters_of", "digest", "effective_params", "flat_metrics", "gsu_positions",
           "is_done", "label", "load_params_from", "macs_per_candidate", "markdown", "mean_std", "model_macs",
           "more_plots", "paired", "plan", "plots", "prepare", "publish", "report", "report_from_dir", "rerender", "run",
           "run_cell", "select", "settings", "shown_command", "shown_path", "tables"]
