"""`python -m pipelines.dvc_report RUNDIR OUT`: what DVC shows of one trained and evaluated run, written where
git tracks it (OUT, default dvc_metrics/<model>/), so that `dvc exp show` / `dvc metrics diff` read it from
every commit and experiment:

    metrics.json       evaluate's measurements, one name each (auc, gauc, logloss, ece, oracle_gap,
                       diversity.*, group<i>.auc/gauc) + train's (train.best_valid_gauc, train.epochs_run, ...)
    curves.csv         the training curves per epoch: train_loss, valid_auc, valid_gauc, valid_logloss
    auc_by_group.csv   AUC / GAUC per life-cycle length group (the paper's long-history argument)
    calibration.csv    reliability curve: mean predicted vs observed click rate per bin

The PNGs stay in RUNDIR/plots; these are the data series `dvc plots show/diff` draws (dvc.yaml `plots:`).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from twinv2.io import atomic_path, read_json, write_json

TRAIN_KEYS = ("best_valid_gauc", "best_epoch", "epochs_run", "steps", "total_wall_s")


def _csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})


def write(run: str | Path, out: str | Path) -> dict:
    from pipelines.tracking import report_metrics

    run, out = Path(run), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ev = read_json(run / "metrics.json")
    tr = read_json(run / "train_metrics.json") if (run / "train_metrics.json").exists() else {}
    metrics = {"model": ev.get("model"), **report_metrics(ev)}
    metrics.pop("wall_s", None)
    for k in TRAIN_KEYS:
        if isinstance(tr.get(k), (int, float)) and not isinstance(tr.get(k), bool):
            metrics[f"train.{k}"] = tr[k]
    write_json(out / "metrics.json", metrics)
    _csv(out / "curves.csv", list(tr.get("history") or []),
         ["epoch", "train_loss", "valid_auc", "valid_gauc", "valid_logloss"])
    groups = [{"group": i, **g} for i, g in enumerate(ev.get("by_group") or [])]   # g carries its own group too
    _csv(out / "auc_by_group.csv", groups, ["group", "min_len", "max_len", "auc", "gauc", "n_users", "n_impressions"])
    cal = ev.get("calibration") or {}
    bins = [{"bin": i, "mean_pred": m, "observed": o, "count": c}
            for i, (m, o, c) in enumerate(zip(cal.get("mean_pred", []), cal.get("observed", []), cal.get("count", [])))
            if c]
    _csv(out / "calibration.csv", bins, ["bin", "mean_pred", "observed", "count"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    run = Path(args[0])
    out = Path(args[1]) if len(args) == 2 else Path("dvc_metrics") / run.name
    m = write(run, out)
    print(json.dumps({k: m[k] for k in ("model", "auc", "gauc") if k in m}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
