"""`twinv2 evaluate --data DIR --run RUNDIR` -> RUNDIR/metrics.json and RUNDIR/plots/*.png.

On the test split of DIR/validated: AUC, GAUC (impression-weighted, one-class users skipped), logloss,
the oracle AUC of p_true on the same rows and the gap to it, AUC/GAUC per life-cycle length quantile
group, and diversity with one definition for every model:
  (a) retrieval: categories among the positions the model's GSU retrieves (model.retrieve) per test
      sample: distinct count and entropy;
  (b) ranking: for `diversity_users` test users, a pool of `diversity_pool` catalogue items drawn with a
      fixed seed (the same pool for every model) scored at the user's first test impression time; the
      top `diversity_topn`: category coverage and intra-list diversity.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from twinv2 import progress
from twinv2.config import load_params
from twinv2.io import atomic_path, write_json
from twinv2.metrics.ctr import auc, calibration, gauc, logloss
from twinv2.metrics.diversity import ranking_diversity, retrieval_diversity, top_n_list
from twinv2.metrics.groups import by_group
from twinv2.training.samples import loader, to_device
from twinv2.training.scoring import RunScorer


def run(data: str | Path, run: str | Path, params: dict | None = None) -> dict:
    params = params or load_params()
    ep = dict(params.get("evaluate", {}))
    run = Path(run)
    t0 = time.perf_counter()
    scorer = RunScorer(run, data=data, batch_size=int(ep.get("batch_size", 1024)))
    world, model = scorer.world, scorer.model
    test = world.impressions[world.impressions["split"] == "test"].reset_index(drop=True)
    if len(test) == 0:
        raise ValueError(f"{data}: the validated impressions hold no 'test' rows; expected split train/valid/test")
    bar = progress.bar(total=4, desc="evaluate", unit="step", section=ep,
                       bar_format="{desc}: {n_fmt}/{total_fmt} steps [{elapsed}] {postfix}")
    bar.set_postfix_str(f"scoring {len(test):,} test impressions")
    pred = scorer.predict_frame(test)
    bar.update()
    y, p, u = pred["label"], pred["prob"], pred["user"]
    g = gauc(u, y, p)
    p_true = test["p_true"].to_numpy(np.float64, na_value=np.nan) if "p_true" in test.columns else np.full(len(test), np.nan)
    oracle = auc(y, p_true) if len(p_true) and np.isfinite(p_true).all() else None
    a = auc(y, p)
    n_groups = int(ep.get("n_user_groups", 4))
    groups = by_group(u, y, p, world.user_lengths(), n_groups)
    bar.set_postfix_str("retrieval diversity")
    retrieval = _retrieval_diversity(scorer, test, int(ep.get("batch_size", 1024)))
    bar.update()
    bar.set_postfix_str("ranking diversity")
    diversity = {"retrieval": retrieval, "ranking": _ranking_diversity(scorer, test, ep)}
    bar.update()
    cal = calibration(y, p)
    metrics = {
        "model": scorer.config["model"], "auc": a, "gauc": g["gauc"], "logloss": logloss(y, p),
        "oracle_auc": oracle, "oracle_gap": (oracle - a) if (oracle is not None and a is not None) else None,
        "gauc_users": g["n_users"], "gauc_skipped_users": g["n_skipped"], "n_test": int(len(test)),
        "label_rate": float(y.mean()), "mean_pred": float(p.mean()), "ece": cal["ece"],
        "by_group": groups, "diversity": diversity, "calibration": cal,
        "cluster_version": scorer.config.get("cluster_version"), "data": str(Path(data).resolve()),
    }
    if ep.get("plots", True):
        metrics["plots"] = _plots(run / "plots", y, p, p_true, groups, cal, metrics["model"])
    bar.set_postfix_str("done")
    bar.update()
    bar.close()
    metrics["wall_s"] = time.perf_counter() - t0
    metrics["summary"] = (f"evaluated {metrics['model']} on {len(test):,} test impressions: AUC {_r(a)}, GAUC "
                          f"{_r(g['gauc'])}, logloss {_r(metrics['logloss'])}, oracle AUC {_r(oracle)} -> "
                          f"{run / 'metrics.json'}")
    write_json(run / "metrics.json", metrics)
    _mlflow_log(run, metrics, ep)
    return metrics


def _r(x):
    return None if x is None else round(float(x), 4)


@torch.no_grad()
def _retrieval_diversity(scorer: RunScorer, test: pd.DataFrame, batch_size: int) -> dict:
    """Categories of what the GSU retrieves for each test sample (models without a GSU: their whole long
    sequence capped at k)."""
    model, world = scorer.model, scorer.world
    if model.long_source == "none":
        return {"distinct_categories": None, "entropy": None, "n_rows": 0}
    ds = world.dataset(world.samples(None, test), model)
    cats, valid = [], []
    for batch in loader(ds, batch_size, shuffle=False):
        b = to_device(batch, scorer.device)
        idx, ok = model.retrieve(b)                                       # (B, k)
        cats.append(torch.gather(b["long"]["category"], 1, idx).cpu().numpy())
        valid.append(ok.cpu().numpy())
    k = max(c.shape[1] for c in cats)
    pad = [np.pad(c, ((0, 0), (0, k - c.shape[1]))) for c in cats]
    padv = [np.pad(v, ((0, 0), (0, k - v.shape[1]))) for v in valid]
    out = retrieval_diversity(np.concatenate(pad), np.concatenate(padv))
    out["k"] = int(k)
    return out


def _ranking_diversity(scorer: RunScorer, test: pd.DataFrame, ep: dict) -> dict:
    world = scorer.world
    rng = np.random.default_rng(int(ep.get("seed", 0)))
    users = np.unique(test["user_id"].to_numpy(np.int64))
    n_users = ep.get("diversity_users")
    if n_users is not None and len(users) > int(n_users):
        users = np.sort(rng.choice(users, int(n_users), replace=False))
    items = world.items.sort_values("item_id")
    pool_n = min(int(ep.get("diversity_pool", 200)), len(items))
    top_n = int(ep.get("diversity_topn", 10))
    first_ts = test.groupby("user_id")["ts"].min()
    if len(users) == 0:
        return {"coverage": None, "ild": None, "n_users": 0}
    ids = items["item_id"].to_numpy()
    pools = [np.sort(rng.choice(len(items), pool_n, replace=False)) for _ in users]
    # every user against its pool in one call: the batch path (each user's sequences built once, all users in one
    # gather, broadcast over the pool; tests/training/test_scoring.py holds it equal to one score_user per user)
    flat = scorer.score_many(np.repeat(users, pool_n), np.concatenate([ids[pool] for pool in pools]),
                             np.repeat(first_ts.loc[users].to_numpy(np.int64), pool_n))
    probs = np.split(flat, len(users))
    cat = items["category"].to_numpy()
    lists = [cat[pool[top_n_list(pr, top_n)]] for pool, pr in zip(pools, probs)]
    out = ranking_diversity(lists, n_categories=len(np.unique(cat)))
    out.update(top_n=top_n, pool=pool_n)
    return out


def _plots(folder: Path, y, p, p_true, groups, cal, name) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, fname):
        with atomic_path(folder / fname) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(str(folder / fname))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(y, p):.3f})")
        if np.isfinite(p_true).all():
            fo, to, _ = roc_curve(y, p_true)
            ax.plot(fo, to, "--", label=f"oracle p_true (AUC {auc(y, p_true):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    ax.legend(loc="lower right", fontsize=8)
    save(fig, "roc.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs = np.arange(len(groups))
    ax.bar(xs - 0.2, [g["auc"] or 0 for g in groups], 0.4, label="AUC")
    ax.bar(xs + 0.2, [g["gauc"] or 0 for g in groups], 0.4, label="GAUC")
    ax.set_xticks(xs, [f"{int(g['min_len'])}-{int(g['max_len'])}" for g in groups], fontsize=8)
    ax.set(xlabel="life-cycle length (behaviours)", ylim=(0.4, 1.0), title=f"{name}: AUC by user group")
    ax.legend(fontsize=8)
    save(fig, "auc_by_group.png")

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    cnt = np.asarray(cal["count"])
    m = cnt > 0
    ax.plot(np.asarray(cal["mean_pred"])[m], np.asarray(cal["observed"])[m], "o-", label=name)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="mean predicted", ylabel="observed click rate", title=f"calibration (ECE {cal['ece']:.3f})")
    ax.legend(fontsize=8)
    save(fig, "calibration.png")
    return written


def _mlflow_log(run: Path, metrics: dict, ep: dict | None = None) -> None:
    """Into the active run, the run MLFLOW_RUN_ID names, or an own run when MLFLOW_TRACKING_URI or TWINV2_MLFLOW
    is set: the metrics under one name each (tracking.report_metrics: auc, gauc, ece, group<i>.auc, ...; no
    settings), the evaluate params, the validated data as a dataset input, metrics.json and the plots."""
    from pipelines import tracking
    from pipelines.train_tracking import flat

    if not tracking.tracking_wanted():
        return
    import mlflow

    own = mlflow.active_run() is None
    if own:
        import os

        tracking.use_store()
        rid = os.environ.get("MLFLOW_RUN_ID")
        mlflow.start_run(run_id=rid) if rid else mlflow.start_run(run_name=f"evaluate-{metrics['model']}")
    try:
        run_id = mlflow.active_run().info.run_id
        c = tracking.client()
        mlflow.set_tags({"stage": "evaluate", "model": metrics["model"], "run_dir": str(Path(run).resolve())})
        if ep:
            have = mlflow.get_run(run_id).data.params
            mlflow.log_params({k: v for k, v in flat({"evaluate": ep}).items() if k not in have})
        mlflow.log_metrics(tracking.report_metrics(metrics))
        if metrics.get("data"):
            tracking.log_dataset(c, run_id, metrics["data"], "evaluate")
        mlflow.log_artifact(str(run / "metrics.json"))
        for f in metrics.get("plots", []):
            mlflow.log_artifact(f, artifact_path="plots")
    finally:
        if own:
            mlflow.end_run()
