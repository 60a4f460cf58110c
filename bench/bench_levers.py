"""Ablation of the life-cycle levers (docs/results.md): train + evaluate cells of (row, model, seed) on a
validated, clustered dataset and print the valid AND test AUC / GAUC table (mean +- std over seeds, paired
difference against a reference model per seed). Choices are made on valid only (bench/choose.py: `--choose
ROW,ROW,...` prints, per model, the candidate row with the best mean valid score; it never reads a test figure).

    python -m bench.bench_levers --data D [--rows paper,pop,...] [--models twinv2,twin] [--seeds 0,1,2]
                                 [--ref twin] [--ref-row ROW] [--out bench/results/bench_levers.json]
                                 [--choose INCUMBENT,ROW,... [--choose ...]] [--criterion auc+gauc]
    python -m bench.bench_levers --data D --coverage     # how much of each cluster its top-J ids cover

A row is a named set of `--set`-style overrides applied on top of params.yaml (ROWS below, cumulative in the
order the levers were tried, so each row measures one lever alone on top of the previous one). A cell is
exactly `twinv2 --set ... train --data D --model M --out R` then the test AUC/GAUC that `twinv2 evaluate`
reports (pipelines.train.run + RunScorer.predict_frame on the test split: `auc`, `gauc`) and the valid AUC/GAUC
of the epoch the run kept (its training history at best_epoch, the figures early stopping chose on: `valid_auc`,
`valid_gauc`). Cells are written to
OUT_DIR/<row>/<model>/s<seed>/cell.json with their params key (pipelines.benchmark.cell_key) and not recomputed
when present (delete the folder to rerun); a present cell whose key differs from what params.yaml + the row give
now is an error, not a silent reuse; so is a present cell without valid figures (computed before they were
stored: delete it to recompute; --report-only shows it with "-" for valid).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twinv2.config import load_params  # noqa: E402
from twinv2.io import write_json  # noqa: E402

PAPER = {"model.target_pop": False, "model.item_init": "random", "model.frozen_tables": [],
         "model.match_counts": [], "model.match_mass": False, "model.target_match": [], "model.watermark_gap": False,
         "model.item_bias": False, "model.author_bias": False, "model.virtual_mix": 0, "model.target_stats": False,
         "model.user_bias": False, "model.user_feedback": False, "gbdt.user_feedback": False}
NO_USER = {"model.user_bias": False, "train.user_bias_lr": None, "model.user_feedback": False,
           "gbdt.user_feedback": False}
NO_BIAS = {"model.item_bias": False, "model.author_bias": False, **NO_USER}
COUNTS = {"model.target_pop": True, "model.item_init": "cooc", "model.match_counts": ["category", "author", "item"]}
ROWS = {
    "paper": PAPER,                                                         # the papers' models, nothing added
    "mass": {**PAPER, "model.match_mass": True},                            # + soft match mass of each ESU head
    "target_match": {**PAPER, "model.match_mass": True, "model.target_match": ["category", "author", "item"]},
    "pop": {**PAPER, "model.target_pop": True},                             # + target popularity bucket alone
    "pop_cooc": {**PAPER, "model.target_pop": True, "model.item_init": "cooc"},
    "pop_cooc_counts": {**PAPER, **COUNTS},
    "freeze_item": {**PAPER, **COUNTS, "model.frozen_tables": ["item"]},
    "freeze_item_author": {**PAPER, **COUNTS, "model.frozen_tables": ["item", "author"]},
    "default": {},                                                          # params.yaml as committed
    "no_mix": {"model.virtual_mix": 0},                                     # default, paper's nearest-member ids
    "no_stats": {"model.target_stats": False},                              # default without the target stats
    "no_mix_no_stats": {"model.virtual_mix": 0, "model.target_stats": False},   # the default before both
    # the id biases, measured against the params of their time (both off; on in params.yaml since 2026-12-04)
    "no_id_bias": NO_BIAS,
    "item_bias": {**NO_BIAS, "model.item_bias": True},                      # a learned scalar per target item
    "author_bias": {**NO_BIAS, "model.author_bias": True},                  # a learned scalar per target author
    "id_bias": {"model.item_bias": True, "model.author_bias": True, **NO_USER},   # both (default 2026-12-04 morning)
    "author_free": {**NO_BIAS, "model.frozen_tables": ["item"]},            # the author table trained
    # the user's own labels, measured against id_bias (= the params of 2026-12-04 morning: no user bias, gbdt on
    # life-cycle statistics only); user_bias_ulr10 = default since 2026-12-04 afternoon
    "user_bias": {**NO_USER, "model.user_bias": True},                      # + a learned scalar per user
    "user_feedback": {**NO_USER, "model.user_feedback": True, "gbdt.user_feedback": True},   # + earlier train labels
    "bias_lr10": {**NO_USER, "train.bias_lr": 0.01},                        # the id biases learn 10x faster
    "user_bias_lr10": {**NO_USER, "model.user_bias": True, "train.bias_lr": 0.01},   # + user bias, all biases 10x
    "user_bias_ulr10": {**NO_USER, "model.user_bias": True, "train.user_bias_lr": 0.01},   # + user bias, it alone 10x
    "user_bias_ulr30": {**NO_USER, "model.user_bias": True, "train.user_bias_lr": 0.03},   # + user bias, it alone 30x
    # measured against user_bias_ulr10 (= default for the neural models since 2026-12-04 afternoon)
    "default_fb": {"model.user_feedback": True},                            # default + the head's feedback features
    "num_emb": {"model.numeric_embed": 8},                                  # default + periodic numeric embeddings
    "by_size": {"model.cluster_order": "size"},                             # TWIN-V2 keeps its largest clusters
    "num_emb_s01": {"model.numeric_embed": 8, "model.numeric_sigma": 0.1},  # smoother frequencies
    "epochs8": {"train.epochs": 8, "train.patience": 3},                    # twice the epochs (best is often the last)
    "lr2": {"train.lr": 0.002},                                             # twice the dense learning rate
    "adamw": {"train.optimizer": "adamw", "train.weight_decay": 0.01},      # decoupled weight decay (every parameter)
    "recency": {"model.match_recency": True},                               # + how long ago each target id was last read
    # large batches (issue 29): every rate scaled with the batch by the square-root rule (sqrt(1024/256) = 2) or
    # the linear one (4), against default (batch 256); chosen on valid (--choose default,bs1024_sqrt,bs1024_lin)
    "bs1024_sqrt": {"train.batch_size": 1024, "train.lr": 0.002, "train.user_bias_lr": 0.02},
    "bs1024_lin": {"train.batch_size": 1024, "train.lr": 0.004, "train.user_bias_lr": 0.04},
    "bs1024_same": {"train.batch_size": 1024},                              # the rates of batch 256 unchanged
    # the older rounds' adopted levers, each taken out of today's default alone (issue 30 item 1: re-checked on
    # valid; --choose default,ROW keeps the default unless ROW's mean valid score is higher)
    "train_author": {"model.frozen_tables": ["item"]},                      # the author table trained
    "train_tables": {"model.frozen_tables": []},                            # item and author tables trained
    "random_init": {"model.item_init": "random"},                           # item table from N(0, std), not cooc
    "no_item_author_bias": {"model.item_bias": False, "model.author_bias": False},   # user bias kept
    "no_match_counts": {"model.match_counts": []},                          # no id-match counts in the head
    "no_target_pop": {"model.target_pop": False},                           # no target popularity bucket
}


def apply(params: dict, overrides: dict) -> dict:
    p = copy.deepcopy(params)
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        p.setdefault(section, {})[name] = value
    return p


def cell_path(out: Path, row: str, model: str, seed: int) -> Path:
    return Path(out) / row / model / f"s{seed}" / "cell.json"


def cell(data: str, row: str, model: str, seed: int, out: Path) -> dict:
    from pipelines.benchmark import cell_key

    path = cell_path(out, row, model, seed)
    params = apply(load_params(), {**ROWS[row], "train.seed": seed, "train.progress": False})
    key = cell_key(model, params)           # the result-relevant params (pipelines.benchmark's cell key)
    if path.exists():
        res = json.loads(path.read_text())
        if res.get("key", key) != key:      # cells written before keys were stored are read as they are
            raise ValueError(f"{path}: computed under other params (key {res['key']}, params.yaml + row {row!r} "
                             f"now give {key}); delete {path.parent} to recompute it, or use another --cells folder")
        if "valid_auc" not in res:
            raise ValueError(f"{path}: computed before cells stored their valid figures (issue 30: choices are made "
                             f"on valid); delete {path.parent} to recompute it")
        if "groups" not in res and (path.parent / "run" / "model.pt").exists():   # cells written before groups
            res["groups"] = _groups(data, path.parent / "run")[1]
            write_json(path, res)
        return res
    from pipelines import train
    from twinv2.metrics.ctr import auc, gauc

    t0 = time.perf_counter()
    rep = train.run(data, model, path.parent / "run", params)
    pred, groups = _groups(data, path.parent / "run")
    va = valid_at_best(rep)
    res = {"row": row, "model": model, "seed": seed, "overrides": ROWS[row], "key": key,
           "valid_auc": va["valid_auc"], "valid_gauc": va["valid_gauc"],
           "auc": auc(pred["label"], pred["prob"]), "gauc": gauc(pred["user"], pred["label"], pred["prob"])["gauc"],
           "best_epoch": rep.get("best_epoch"), "wall_s": time.perf_counter() - t0, "groups": groups}
    write_json(path, res)
    return res


def valid_at_best(report: dict) -> dict:
    """The valid figures of the epoch (neural) / tree count (gbdt) a run kept: its history record at best_epoch."""
    hist = [h for h in report.get("history") or [] if h.get("epoch") == report.get("best_epoch")]
    if len(hist) != 1:
        raise ValueError(f"train report: no single history record at best_epoch {report.get('best_epoch')!r} "
                         f"(epochs {[h.get('epoch') for h in report.get('history') or []]})")
    return {"valid_auc": float(hist[0]["valid_auc"]), "valid_gauc": float(hist[0]["valid_gauc"])}


def _groups(data: str, run: Path, n_groups: int = 4):
    """Test predictions of a run and its AUC / GAUC per life-cycle length quartile (twinv2 evaluate's
    by_group: users cut into quantile groups by behaviours before the history end)."""
    from twinv2.metrics.groups import by_group

    world, _, pred = split_predictions(data, run)
    return pred, by_group(pred["user"], pred["label"], pred["prob"], world.user_lengths(), n_groups)


def split_predictions(data: str, run: str | Path):
    """(the run's World, its test-split impressions in stored order, the reference path's predictions of them)."""
    from twinv2.training.scoring import RunScorer

    scorer = RunScorer(run, data=data)
    test = scorer.world.impressions[scorer.world.impressions["split"] == "test"].reset_index(drop=True)
    return scorer.world, test, scorer.predict_frame(test)


def _series(cells: list[dict]):
    """Cells by (row, model, seed), and for each (row, model) in first-seen order its sorted seeds."""
    by = {(c["row"], c["model"], c["seed"]): c for c in cells}
    seeds = {}
    for r, m, s in by:
        seeds.setdefault((r, m), []).append(s)
    return by, {k: sorted(v) for k, v in seeds.items()}


def _paired(by: dict, row: str, model: str, ref: str, seeds: list, figure) -> list[float] | None:
    """figure(cell of model) - figure(cell of ref), per seed both have; None for the reference itself or no pair."""
    both = [s for s in seeds if (row, ref, s) in by]
    if model == ref or not both:
        return None
    return [float(figure(by[row, model, s]) - figure(by[row, ref, s])) for s in both]


def group_table(cells: list[dict], ref: str) -> list[dict]:
    """Per (row, model, quartile): mean AUC / GAUC over seeds and the mean paired difference vs ref."""
    by, series = _series([c for c in cells if c.get("groups")])
    out = []
    for (row, model), seeds in series.items():
        for k in range(len(by[row, model, seeds[0]]["groups"])):
            g = [by[row, model, s]["groups"][k] for s in seeds]
            line = {"row": row, "model": model, "group": k, "max_len": g[0]["max_len"],
                    "auc": float(np.mean([x["auc"] for x in g])), "gauc": float(np.mean([x["gauc"] for x in g]))}
            for key in ("auc", "gauc"):
                d = _paired(by, row, model, ref, seeds, lambda c: c["groups"][k][key])
                if d is not None:
                    line[f"d_{key}"] = float(np.mean(d))
            out.append(line)
    return out


FIGURES = ("valid_auc", "valid_gauc", "auc", "gauc")       # valid (for choices), then test (for the report)


def _get(c: dict, key: str) -> float:
    v = c.get(key)
    return float("nan") if v is None else float(v)


def table(cells: list[dict], ref: str) -> list[dict]:
    """Per (row, model): mean +- std over seeds of the valid and test figures, paired differences vs model ref."""
    by, series = _series(cells)
    out = []
    for (row, model), seeds in series.items():
        line = {"row": row, "model": model, "seeds": seeds}
        for key in FIGURES:
            v = np.array([_get(by[row, model, s], key) for s in seeds])
            line[key], line[f"{key}_std"] = float(v.mean()), float(v.std(ddof=1) if len(v) > 1 else 0.0)
            d = _paired(by, row, model, ref, seeds, lambda c: _get(c, key))
            if d is not None:
                line[f"d_{key}"] = d
        out.append(line)
    return out


def row_table(cells: list[dict], ref_row: str) -> list[dict]:
    """Per (row, model): the paired difference per seed against the same model's cells in row ref_row."""
    by, series = _series(cells)
    out = []
    for (row, model), seeds in series.items():
        both = [s for s in seeds if (ref_row, model, s) in by]
        if row == ref_row or not both:
            continue
        out.append({"row": row, "model": model, "ref_row": ref_row, "seeds": both,
                    **{f"d_{k}": [_get(by[row, model, s], k) - _get(by[ref_row, model, s], k) for s in both]
                       for k in FIGURES}})
    return out


def _fmt_mean(x: dict, key: str) -> str:
    return f"{'-':>16}" if np.isnan(x[key]) else f"{x[key]:.4f} +- {x[key + '_std']:.4f}"


def _fmt_paired(v: list[float]) -> str:
    sd = f" +- {np.std(v, ddof=1):.4f}" if len(v) > 1 else ""
    return " ".join(f"{d:+.4f}" for d in v) + f" ({np.mean(v):+.4f}{sd})"


def coverage(data: str, slots=(1, 2, 4, 8, 16)) -> list[dict]:
    """Share of the CURRENT cluster version's members whose id is among their cluster's J most frequent ids
    (virtual_mix J), per field, and for J = 1 the share carried by the paper's nearest-member id instead."""
    from twinv2.training.samples import MIX_FIELDS
    from twinv2.training.world import load_world

    w = load_world(data, need_clusters=True)
    out = []
    for J in slots:
        w.clusters.mix = None
        w.attach_mix(J)
        total = float(np.exp(w.clusters.log_n).sum())
        line = {"slots": J}
        for f in MIX_FIELDS:
            line[f] = float(w.clusters.mix[f][1].sum() / total)
            if J == max(slots):
                ids, n, _ = w.clusters.mix[f]
                rep = getattr(w.clusters, f)[:, None]
                line[f"{f}_nearest_member"] = float((n * (ids == rep)).sum() / total)
        out.append(line)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--models", default="twinv2,twin")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ref", default="twin")
    ap.add_argument("--ref-row", default=None, help="also print each row's paired difference per seed against "
                    "this row (same model)")
    ap.add_argument("--cells", default=str(ROOT / "bench" / "results" / "levers"), help="cell folder")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_levers.json"))
    ap.add_argument("--coverage", action="store_true", help="print the virtual_mix coverage table and exit")
    ap.add_argument("--report-only", action="store_true", help="tables of the finished cells only (train nothing)")
    ap.add_argument("--choose", action="append", default=[], help="candidate rows, the incumbent first "
                    "(repeatable): print per model the row with the best mean valid score (bench/choose.py)")
    ap.add_argument("--criterion", default="auc+gauc", help="valid score of --choose: auc+gauc (mean), auc, gauc")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); float sums "
                    "depend on it, so a figure reproduces exactly with the thread count it was measured with")
    a = ap.parse_args(argv)
    if a.threads > 0:
        import torch

        torch.set_num_threads(a.threads)
    if a.coverage:
        lines = coverage(a.data)
        print(f"{'J':>3} " + " ".join(f"{f:>9}" for f in ("category", "author", "item")))
        for x in lines:
            print(f"{x['slots']:>3} " + " ".join(f"{x[f]:>9.3f}" for f in ("category", "author", "item")))
        last = lines[-1]
        print("share carried by the nearest member's id (the paper's virtual item): " +
              ", ".join(f"{f} {last[f + '_nearest_member']:.3f}" for f in ("category", "author", "item")))
        print(json.dumps({"coverage": lines}))
        return 0
    rows = a.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; expected some of {list(ROWS)}")
    todo = [(r, m, int(s)) for r in rows for m in a.models.split(",") for s in a.seeds.split(",")]
    if a.report_only:                                   # the finished cells as stored, nothing is computed
        files = [cell_path(a.cells, *t) for t in todo]
        cells = [json.loads(f.read_text()) for f in files if f.exists()]
    else:
        cells = [cell(a.data, r, m, s, Path(a.cells)) for r, m, s in todo]
    lines = table(cells, a.ref)
    print(f"{'row':<22} {'model':<8} {'valid AUC':>16} {'valid GAUC':>16} {'test AUC':>16} {'test GAUC':>16}  "
          f"paired vs {a.ref} (test AUC / GAUC per seed)")
    for x in lines:
        d = _fmt_paired(x["d_auc"]) + " / " + _fmt_paired(x["d_gauc"]) if "d_auc" in x else ""
        print(f"{x['row']:<22} {x['model']:<8} " + " ".join(_fmt_mean(x, k) for k in FIGURES) + f"  {d}")
    groups = group_table(cells, a.ref)
    print(f"\nby life-cycle length quartile (0 = shortest; mean over seeds; paired vs {a.ref})")
    for x in groups:
        d = f"  {x['d_auc']:+.4f} / {x['d_gauc']:+.4f}" if "d_auc" in x else ""
        print(f"{x['row']:<20} {x['model']:<9} q{x['group']} (<= {x['max_len']:.0f}) {x['auc']:.4f} {x['gauc']:.4f}{d}")
    rowd = row_table(cells, a.ref_row) if a.ref_row else []
    if a.ref_row:
        print(f"\npaired vs row {a.ref_row} (same model, per seed)")
        for x in rowd:
            print(f"{x['row']:<22} {x['model']:<8} valid {_fmt_paired(x['d_valid_auc'])} / "
                  f"{_fmt_paired(x['d_valid_gauc'])}   test {_fmt_paired(x['d_auc'])} / {_fmt_paired(x['d_gauc'])}")
    choices = []
    if a.choose:
        from bench.choose import choose

        print(f"\nchoices on valid (criterion {a.criterion}; mean over the seeds every candidate has)")
        for group in a.choose:
            cand = group.split(",")
            for model in a.models.split(","):
                c = choose(cells, cand, model, a.criterion)
                choices.append(c)
                scores = " | ".join(f"{r} {c['score'][r]:.4f}" for r in cand)
                print(f"{model:<8} {scores}  -> {c['chosen']} (seeds {c['seeds']})")
    write_json(a.out, {"data": a.data, "cells": cells, "table": lines, "groups": groups, "vs_row": rowd,
                       "choices": choices})
    print(json.dumps({"table": lines, "groups": groups, "vs_row": rowd, "choices": choices}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
