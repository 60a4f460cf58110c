"""Is the gbdt anchor's lead information or function class? An MLP on the gbdt's own life-cycle statistics.

    python -m bench.bench_stats_mlp --data D [--seeds 0,1] [--bins 16]

The features are exactly the gbdt model's (twinv2.models.gbdt.Featurizer: the same samples, the same leakage
rule). Two MLPs (scikit-learn MLPClassifier, hidden 128-64, early stopping on 10% of train) are fit on the
train split and scored on the test split:
    raw      the statistics standardised on train, NaN -> 0 plus one missing-flag per feature
    binned   the same plus a one-hot of each statistic's train quantile bin (`--bins`; NaN its own bin),
             which gives the MLP the step functions a tree has
and the gbdt figure is the committed `twinv2 train --model gbdt` (printed from a run directory with --gbdt-run,
else left out). Prints a table and JSON. A diagnostic, not a model of the harness.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def encoders(X_train: np.ndarray, n_bins: int):
    mu = np.nanmean(X_train, 0)
    sd = np.nanstd(X_train, 0) + 1e-9

    def raw(x):
        m = np.isnan(x)
        return np.hstack([np.where(m, 0.0, (x - mu) / sd), m.astype(float)])

    edges = [np.unique(np.nanquantile(X_train[:, j], np.linspace(0, 1, n_bins + 1)[1:-1]))
             for j in range(X_train.shape[1])]

    def binned(x):
        cols = []
        for j, e in enumerate(edges):
            b = np.where(np.isnan(x[:, j]), len(e) + 1, np.searchsorted(e, np.nan_to_num(x[:, j]), side="right"))
            oh = np.zeros((len(x), len(e) + 2))
            oh[np.arange(len(x)), b] = 1.0
            cols.append(oh)
        return np.hstack(cols + [raw(x)])

    return {"raw": raw, "binned": binned}


def main() -> None:
    from sklearn.neural_network import MLPClassifier

    from twinv2.metrics.ctr import auc, gauc
    from twinv2.models.gbdt import FEATURE_NAMES, Featurizer
    from twinv2.training.world import load_world

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--bins", type=int, default=16)
    ap.add_argument("--gbdt-run", default=None, help="a `twinv2 train --model gbdt` run evaluated on the same data")
    args = ap.parse_args()
    world = load_world(args.data, need_clusters=False)
    fz = Featurizer.from_world(world)
    S = {s: world.samples(s) for s in ("train", "test")}
    X = {s: fz(S[s]) for s in ("train", "test")}
    enc = encoders(X["train"], args.bins)
    rows = []
    for name, f in enc.items():
        for seed in [int(s) for s in args.seeds.split(",")]:
            clf = MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-4, early_stopping=True, random_state=seed,
                                max_iter=50)
            clf.fit(f(X["train"]), S["train"].label)
            p = clf.predict_proba(f(X["test"]))[:, 1]
            rows.append({"model": f"mlp_{name}", "seed": seed, "auc": auc(S["test"].label, p),
                         "gauc": gauc(S["test"].user, S["test"].label, p)["gauc"]})
    if args.gbdt_run:
        m = json.loads((Path(args.gbdt_run) / "metrics.json").read_text())
        rows.append({"model": "gbdt", "seed": None, "auc": m.get("auc"), "gauc": m.get("gauc")})
    print("| model | seed | AUC | GAUC |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['seed']} | {r['auc']:.4f} | {r['gauc']:.4f} |")
    print(json.dumps({"features": list(FEATURE_NAMES), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
