"""`twinv2 train --data DIR --model gbdt --out RUNDIR`: the boosted-trees anchor (twinv2/models/gbdt.py).

Called by `pipelines.train.run` for model "gbdt" (no torch model, no DDP, no clusters needed). Reads
DIR/validated/, computes the life-cycle statistics of the train and valid samples (the same samples the
neural models train on: rows before the CURRENT cluster version's watermark are excluded for every model
when one exists), fits scikit-learn's HistGradientBoostingClassifier (params.yaml `gbdt:`, seed
`train.seed`; early stopping on the valid split's loss), keeps the prefix of trees with the best valid GAUC
(`gbdt.select_on_valid`, as the neural path keeps its best epoch), and writes RUNDIR/:

    config.json          model "gbdt", params (gbdt, train), data, feature names and formulas, vocabulary sizes
    vocab.npz            the vocabulary (target attributes; evaluation and serving rebuild samples with it)
    model.pt             the trees as a dict of tensors (torch.load(weights_only=True); no pickle)
    train_metrics.json   the report (best_valid_gauc, best_epoch = trees kept, epochs_run = trees fitted, ...)

MLflow exactly as the neural path (pipelines.train_tracking.training_run): params, per-iteration valid metrics,
the artifacts and the pyfunc model (scored by RunScorer).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from twinv2.io import write_json
from twinv2.metrics.ctr import auc, gauc, logloss
from twinv2.training.world import load_world

from pipelines.train_tracking import Tracking, flat, save_state_dict, training_run


def run(data: str | Path, out: str | Path, params: dict, resume: bool = False,
        warm_start: str | Path | None = None) -> dict:
    from twinv2.models.gbdt import FEATURES, FEEDBACK_FEATURES, Featurizer, GBDTModel, fit, gbdt_params

    if warm_start:
        raise ValueError(f"--warm-start {warm_start}: not supported for --model gbdt (the trees are refitted "
                         "from scratch; drop the flag)")
    tp = dict(params.get("train", {}))
    gp = gbdt_params(params)
    seed = int(tp.get("seed", 0))
    out = Path(out)
    t0 = time.perf_counter()
    world = load_world(data, need_clusters=False, features=tp.get("features"))
    tr, va = world.samples("train"), world.samples("valid")
    if len(tr) == 0:
        raise ValueError(f"{data}: the validated impressions hold no 'train' rows; expected split train/valid/test")
    if len(np.unique(tr.label)) < 2:
        raise ValueError(f"{data}: the train split holds only label {tr.label[0]:g}; expected both 0 and 1")
    tf = time.perf_counter()
    feat = Featurizer.from_world(world, gp["recent_n"], gp["recent_frac"], bool(gp["user_feedback"]))
    names = feat.names
    X_tr, X_va = feat(tr), feat(va)
    feat_s = time.perf_counter() - tf
    config = {"model": "gbdt", "data": str(Path(data).resolve()), "params": {"gbdt": gp, "train": tp},
              "long_source": "none", "long_len": 0, "short_len": 0, "vocab": world.vocab.sizes(),
              "cluster_version": None, "watermark": None, "n_train": len(tr), "n_valid": len(va), "device": "cpu",
              "sample_floor": world.sample_floor, "excluded_before_watermark": world.excluded or {}, "world_size": 1,
              "warm_start": None, "data_source": world.meta.get("source"),
              "feature_names": list(names), "features": {**FEATURES, **(FEEDBACK_FEATURES if feat.user_feedback else {})},
              "model_format": "model.pt: dict of tensors (trees as arrays), torch.load(weights_only=True)"}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    world.vocab.save(out / "vocab.npz")
    with training_run(out, config, params, True) as ml:
        if isinstance(ml, Tracking):
            existing = ml.mlflow.get_run(ml.mlflow.active_run().info.run_id).data.params
            ml.mlflow.log_params({k: v for k, v in flat({"gbdt": gp}).items() if k not in existing})
        tf = time.perf_counter()
        est = fit(X_tr, tr.label, X_va, va.label, gp, seed=seed)
        fit_s = time.perf_counter() - tf
        history, best, best_k = [], None, est.n_iter_
        if len(va):
            for k, raw in enumerate(est.staged_decision_function(X_va), start=1):
                prob = 1.0 / (1.0 + np.exp(-np.ravel(raw)))
                rec = {"epoch": k, "valid_auc": auc(va.label, prob), "valid_gauc": gauc(va.user, va.label, prob)["gauc"],
                       "valid_logloss": logloss(va.label, prob)}
                history.append(rec)
                ml.epoch(k, rec)
                if rec["valid_gauc"] is not None and (best is None or rec["valid_gauc"] > best):
                    best, best_k = rec["valid_gauc"], k
        if not gp["select_on_valid"]:
            best_k = est.n_iter_
            best = history[-1]["valid_gauc"] if history else None
        model = GBDTModel.from_sklearn(est, best_k, gp["recent_n"], gp["recent_frac"])
        save_state_dict(out / "model.pt", model.to_state())
        gain = np.zeros(len(names))
        for pred in est._predictors[:best_k]:
            nodes = pred[0].nodes
            inner = nodes["is_leaf"] == 0
            np.add.at(gain, nodes["feature_idx"][inner], nodes["gain"][inner])
        wall = time.perf_counter() - t0
        report = {"model": "gbdt", "best_epoch": int(best_k), "best_valid_gauc": best, "epochs_run": int(est.n_iter_),
                  "early_stopped": bool(est.n_iter_ < int(gp["max_iter"])), "history": history,
                  "steps": int(est.n_iter_), "resumed_from_epoch": None, "wall_s": fit_s, "featurize_s": feat_s,
                  "samples_per_s": len(tr) / fit_s if fit_s > 0 else None, "n_train": len(tr), "n_valid": len(va),
                  "world_size": 1, "device": "cpu", "excluded_before_watermark": world.excluded or {},
                  "cluster_version": None, "embedding_version": None, "trees": int(best_k),
                  "feature_gain": {n: float(g) for n, g in sorted(zip(names, gain), key=lambda x: -x[1])},
                  "total_wall_s": wall}
        if resume:
            report["resume"] = "gbdt has no checkpoints: refitted from scratch (deterministic for a seed)"
        report["summary"] = (f"trained gbdt on {len(tr):,} samples: {best_k} of {est.n_iter_} trees kept, best valid "
                             f"GAUC {best if best is None else round(best, 4)}, features {feat_s:.1f}s, "
                             f"{wall:.1f}s -> {out}")
        write_json(out / "train_metrics.json", report)
        ml.finish(report, model, world)
    return report
