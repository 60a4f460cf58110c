"""Which life-cycle statistics the gbdt anchor leans on: refit it without each feature in turn (drop-column
importance) and print the change of its test AUC / GAUC (docs/results.md, "Four more levers").

    python -m bench.bench_gbdt_drop --data D [--out bench/results/bench_gbdt_drop.json]

Every fit is exactly `twinv2 train --model gbdt`'s (twinv2.models.gbdt.fit with params.yaml's gbdt section,
early stopping on the valid split); the features are computed once (Featurizer over the train, valid and test
samples) and a column is left out of train, valid and test alike. A negative change: the tree loses that much
without the feature (what the other features cannot stand in for).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twinv2.config import load_params  # noqa: E402
from twinv2.io import write_json  # noqa: E402


def drop_columns(data: str, params: dict) -> dict:
    from twinv2.metrics.ctr import auc, gauc
    from twinv2.models.gbdt import Featurizer, fit, gbdt_params
    from twinv2.training.world import load_world

    gp = gbdt_params(params)
    seed = int(params.get("train", {}).get("seed", 0))
    world = load_world(data, need_clusters=False, features=params.get("train", {}).get("features"))
    tr, va, te = world.samples("train"), world.samples("valid"), world.samples("test")
    feat = Featurizer.from_world(world, gp["recent_n"], gp["recent_frac"], bool(gp["user_feedback"]))
    X = {"tr": feat(tr), "va": feat(va), "te": feat(te)}

    def score(cols: list[int]) -> tuple[float, float]:
        est = fit(X["tr"][:, cols], tr.label, X["va"][:, cols], va.label, gp, seed=seed)
        p = est.predict_proba(X["te"][:, cols])[:, 1]
        return auc(te.label, p), gauc(te.user, te.label, p)["gauc"]

    every = list(range(len(feat.names)))
    a0, g0 = score(every)
    rows = []
    for j, name in enumerate(feat.names):
        a, g = score([c for c in every if c != j])
        rows.append({"feature": name, "auc": a, "gauc": g, "d_auc": a - a0, "d_gauc": g - g0})
    return {"data": data, "n_test": len(te), "auc": a0, "gauc": g0, "drop": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_gbdt_drop.json"))
    a = ap.parse_args(argv)
    res = drop_columns(a.data, load_params())
    print(f"gbdt, every feature: test AUC {res['auc']:.4f}  GAUC {res['gauc']:.4f}  ({res['n_test']:,} impressions)")
    print(f"{'without':<28} {'AUC':>7} {'GAUC':>7} {'d AUC':>8} {'d GAUC':>8}")
    for r in sorted(res["drop"], key=lambda r: r["d_auc"]):
        print(f"{r['feature']:<28} {r['auc']:.4f} {r['gauc']:.4f} {r['d_auc']:+.4f} {r['d_gauc']:+.4f}")
    write_json(a.out, res)
    print(json.dumps(res, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
