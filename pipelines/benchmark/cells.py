"""One cell of the matrix: computed (train + evaluate), adopted from an earlier report, or read back when done.

    run_cell(data, out, cell, track)   one cell, resumable and idempotent; returns its record (cell.json)
    adopt(out, cells, results_json)    take the cells of an earlier report with the same keys as done
    is_done(out, cell)                 cell.json holds the cell's key

A cell is done when OUT/cells/<model>/<variant>/seed<S>/cell.json (written atomically, last) holds the key of
its effective params; a done cell is never recomputed. A cell without it is re-run: training continues from its
newest epoch checkpoint when one exists, a finished training (model.pt + train_metrics.json) is not redone, only
evaluate; a cell whose params changed (another key) starts afresh.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from twinv2.errors import ConfigError
from twinv2.io import read_json, write_json

from pipelines.benchmark.cost import gsu_positions, model_macs
from pipelines.benchmark.planning import cell_dir, label, shown_path

METRIC_KEYS = ("auc", "gauc", "logloss", "oracle_auc", "oracle_gap", "ece")

RECORD_KEYS = ("model", "variant", "seed", "key", "label", "overrides", "cluster_version", "cluster_params", "metrics",
               "valid", "cost", "train", "curve", "how", "run_dir")


def valid_metrics(record: dict) -> dict:
    """The valid-split metrics of a cell: those of the epoch (gbdt: the tree count) training kept, i.e. the weights
    model.pt holds and evaluate scored on test. From the record's `valid` when it has one, else from its training
    curve at train.best_epoch (cells recorded before `valid` existed); None where neither holds them."""
    v = record.get("valid")
    if isinstance(v, dict):
        return v
    best = (record.get("train") or {}).get("best_epoch")
    row = next((h for h in record.get("curve") or [] if isinstance(h, dict) and h.get("epoch") == best), None)
    if best is None or row is None:
        return {"auc": None, "gauc": None, "epoch": best}
    return {"auc": row.get("valid_auc"), "gauc": row.get("valid_gauc"), "epoch": best}



class _PeakRSS:
    """Peak resident memory of this process (and its children) while a cell runs, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        try:
            import psutil

            proc = psutil.Process()
            rss = proc.memory_info().rss
            for ch in proc.children(recursive=True):
                try:
                    rss += ch.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, rss)
        except Exception:  # noqa: BLE001 - a measurement, never a failure of the cell
            pass

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __enter__(self):
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=2)
        self._sample()

    @property
    def mb(self) -> float | None:
        return self.peak / 2**20 if self.peak else None


def is_done(out: str | Path, cell: dict) -> bool:
    p = cell_dir(out, cell) / "cell.json"
    if not p.exists():
        return False
    try:
        return read_json(p).get("key") == cell["key"]
    except (OSError, ValueError):
        return False


def adopt(out: str | Path, cells: list[dict], results: str | Path) -> dict:
    """Take the finished cells of an earlier report (its results.json) as done: a planned cell that is not done
    in OUT and whose key equals the key of a cell there gets that record as its OUT/.../cell.json (how: "adopted
    from ..."). The key covers the model, every result-relevant params section and the cluster version, which is
    content-addressed over the validated data, the embedding and the clustering params: a cell computed on other
    data or with other params has another key and is computed here instead. What the key does not cover is the
    code: adopt only a report made at a commit whose training and evaluation code equals this one (its commit is
    recorded in the records and in the new report). Returns {"from", "commit", "cells": [labels adopted]}."""
    results = Path(results)
    try:
        old = read_json(results)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--adopt {results}: cannot read it as a benchmark results.json ({e})") from e
    recs = old.get("cells") if isinstance(old, dict) else None
    if not isinstance(recs, list):
        raise ConfigError(f"--adopt {results}: no `cells` list; expected the results.json of `twinv2 benchmark`")
    commit = (old.get("meta") or {}).get("git_commit")
    src = shown_path(str(results))
    by_key: dict[str, dict] = {}
    for i, r in enumerate(recs):
        missing = [k for k in ("model", "variant", "seed", "key", "metrics") if not isinstance(r, dict) or k not in r]
        if missing:
            raise ConfigError(f"--adopt {results}: cells[{i}] lacks {missing}; expected a benchmark cell record")
        by_key[str(r["key"])] = r
    taken = []
    for c in cells:
        r = by_key.get(c["key"])
        if r is None or is_done(out, c):
            continue
        if (r["model"], r["variant"], int(r["seed"])) != (c["model"], c["variant"], int(c["seed"])):
            continue            # the same params under another name: computed here, so that labels stay true
        rec = {k: r.get(k) for k in RECORD_KEYS}
        # provenance: the commit that COMPUTED the cell (a cell adopted there keeps its own origin, so a chain of
        # re-published reports still names where each figure was computed)
        first = r.get("adopted") if isinstance(r.get("adopted"), dict) else None
        computed = first.get("commit") if first else commit
        rec.update(label=label(c), how=f"adopted from {src} (computed at commit {computed})",
                   adopted={"from": src, "commit": computed, **({"via": first.get("from")} if first else {})},
                   finished_s=time.time())
        d = cell_dir(out, c)
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "cell.json", rec)
        taken.append(label(c))
    return {"from": src, "commit": commit, "cells": taken}


def _compute(data: str | Path, out: str | Path, cell: dict) -> dict:
    from pipelines import evaluate, train

    d = cell_dir(out, cell)
    run = d / "run"
    started = d / "started.json"
    if started.exists():
        try:
            old = read_json(started).get("key")
        except (OSError, ValueError):
            old = None
        if old != cell["key"] and run.exists():        # other params: nothing there can be reused
            shutil.rmtree(run)
    elif run.exists():
        shutil.rmtree(run)
    d.mkdir(parents=True, exist_ok=True)
    write_json(started, {"key": cell["key"], "label": label(cell), "started_s": time.time()})
    params = cell["params"]
    bound = os.environ.get("MLFLOW_RUN_ID")
    how = "fresh"
    with _PeakRSS() as rss:
        if (run / "model.pt").exists() and (run / "train_metrics.json").exists():
            trained = read_json(run / "train_metrics.json")
            how = "train reused (evaluate re-run)"
            train_s = float(trained.get("total_wall_s") or trained.get("wall_s") or 0.0)
        else:
            resume = cell["model"] != "gbdt" and any((run / "checkpoints").glob("epoch-*.pt"))
            how = "resumed from checkpoint" if resume else "fresh"
            t0 = time.perf_counter()
            trained = train.run(data=data, model=cell["model"], out=run, params=params, resume=resume)
            train_s = time.perf_counter() - t0
        if bound:            # mlflow's end_run (train's) unsets MLFLOW_RUN_ID: evaluate logs into the same run
            os.environ["MLFLOW_RUN_ID"] = bound
        t0 = time.perf_counter()
        metrics = evaluate.run(data=data, run=run, params=params)
        eval_s = time.perf_counter() - t0
    n_train = trained.get("n_train")
    sps = trained.get("samples_per_s")
    if sps is None and n_train and train_s:          # gbdt: one pass over the training samples
        epochs = 1 if cell["model"] == "gbdt" else trained.get("epochs_run")
        sps = n_train * epochs / train_s if epochs else None
    curve = [{k: h.get(k) for k in ("epoch", "train_loss", "valid_auc", "valid_gauc")}
             for h in trained.get("history") or [] if isinstance(h, dict)]
    record = {
        "model": cell["model"], "variant": cell["variant"], "seed": int(cell["seed"]), "key": cell["key"],
        "label": label(cell), "overrides": cell["overrides"], "cluster_version": cell.get("cluster_version"),
        "metrics": {**{k: metrics.get(k) for k in METRIC_KEYS}, "by_group": metrics.get("by_group"),
                    "diversity": metrics.get("diversity"), "n_test": metrics.get("n_test")},
        "train": {k: trained.get(k) for k in ("best_epoch", "epochs_run", "best_valid_gauc", "resumed_from_epoch",
                                              "n_train")},
        "cost": {"train_s": train_s, "samples_per_s": sps, "evaluate_s": eval_s, "peak_rss_mb": rss.mb,
                 "gsu_positions": gsu_positions(run), "macs_per_candidate": model_macs(run)},
        "valid": valid_metrics({"train": trained, "curve": curve}),
        "curve": curve,
        "cluster_params": {k: params.get("cluster", {}).get(k) for k in ("gamma", "exponent", "group_edges")},
        "how": how, "run_dir": str(run), "finished_s": time.time(),
    }
    write_json(d / "cell.json", record)                  # atomic, last: the done marker
    return record


def run_cell(data: str | Path, out: str | Path, cell: dict, track: tuple[dict, str] | None = None) -> dict:
    """One cell; returns its record (cell.json). A done cell (same key) is read back, not recomputed.
    track = (MLflow identity, parent run id): the cell computes inside a nested run of the parent (params of
    the cell on it; train and evaluate log into it)."""
    if is_done(out, cell):
        rec = read_json(cell_dir(out, cell) / "cell.json")
        return {**rec, "skipped": True}
    if track is None:
        return _compute(data, out, cell)
    from pipelines import tracking

    ctx, parent = track
    rep = tracking.run_stage(ctx, parent, "benchmark_cell", _compute, key=label(cell), data=data,
                             params=cell["params"], bind_run=True,
                             tags={"model": cell["model"], "variant": cell["variant"], "seed": cell["seed"],
                                   "cell_key": cell["key"], "cluster_version": cell.get("cluster_version"),
                                   "overrides": json.dumps(cell["overrides"], sort_keys=True)},
                             artifacts=[cell_dir(out, cell) / "cell.json", cell_dir(out, cell) / "run" / "plots"],
                             kwargs={"data": data, "out": out, "cell": cell})
    return rep
