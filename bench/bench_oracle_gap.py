"""Where the gap to the oracle goes (issue 30 item 4): the synthetic world's p_true is
sigmoid(label_bias + interest + pop + quality + user_bias + noise) (twinv2/data/synthetic.py); this benchmark
regenerates those parts for every test impression of a generated world and measures, on the test split:

  1. the oracle ladder: the AUC / GAUC of p_true and of the logit with one part taken away at a time (noise is
     drawn per impression and no model can read it: "no noise" is the ceiling of any model);
  2. every run's AUC / GAUC beside them, and per group (the target's interest kind: persistent / drifting /
     dormant / short / none, and the user's life-cycle length quartile) the oracle's, the ceiling's and the
     runs' AUC, so the gap is split by which users and which impressions;
  3. how much of each part a run reads: the least-squares fit of the run's logit on the parts (each in its own
     logit units, so the oracle itself is 1.0 on every part): the coefficient of a part is the share of it the
     run's score carries (scale-free: relative to the run's interest coefficient too).

    python -m bench.bench_oracle_gap --data D --run twinv2=RUN [--run twinv2=RUN2 --run twin=RUN3 ...]

Runs of one name (seeds) are averaged. Writes bench/results/bench_oracle_gap.json and prints the tables. A
world not made by `twinv2 generate` (no raw/meta.json config) is refused. Reads only the test split's labels,
to report, never to choose.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twinv2.io import write_json  # noqa: E402

PARTS = ("interest", "pop", "quality", "user_bias", "noise")
KINDS = {-1: "none", 0: "persistent", 1: "drifting", 2: "dormant", 3: "short"}


def world_parts(data: str | Path) -> pd.DataFrame:
    """Every impression of the generated world at DATA with its logit parts (regenerated from the world's
    config and seed; checked against the stored p_true)."""
    from twinv2.data.synthetic import World, WorldConfig

    meta_path = Path(data) / "raw" / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if "config" not in meta or "seed" not in meta:
        raise SystemExit(f"{meta_path}: no generator config and seed; expected a world made by `twinv2 generate` "
                         f"(the oracle's parts exist only for synthetic worlds)")
    cfg = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    frames = []
    for _, imp, st in World(cfg, int(meta["seed"])).users():
        f = pd.DataFrame({k: imp[k] for k in ("user_id", "item_id", "ts", "p_true")})
        for k, v in st["parts"].items():
            f[k] = v
        frames.append(f)
    out = pd.concat(frames, ignore_index=True)
    out["logit_bias"] = cfg.label_bias
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def oracle_scores(t: pd.DataFrame) -> dict[str, np.ndarray]:
    """Oracle variants on the rows of t (each monotone in its own logit): p_true and one part taken away at a
    time, plus the recent-only interest (what a model reading no dormant interest could know)."""
    full = sum(t[k].to_numpy(np.float64) for k in PARTS)
    out = {"p_true": full}
    for k in PARTS:
        out[f"no {k}"] = full - t[k].to_numpy(np.float64)
    out["no noise, recent interest only"] = (full - t["noise"].to_numpy(np.float64) - t["interest"].to_numpy(np.float64)
                                             + t["interest_recent"].to_numpy(np.float64))
    return out


def read_shares(t: pd.DataFrame, logit: np.ndarray) -> dict[str, float]:
    """Least-squares coefficients of a run's logit on the parts (+ intercept): the oracle's are all 1.0."""
    x = np.column_stack([t[k].to_numpy(np.float64) for k in PARTS] + [np.ones(len(t))])
    coef, *_ = np.linalg.lstsq(x, logit, rcond=None)
    fit = x @ coef
    r2 = 1 - ((logit - fit) ** 2).sum() / max(((logit - logit.mean()) ** 2).sum(), 1e-12)
    return {**{k: float(c) for k, c in zip(PARTS, coef[:-1])}, "r2": float(r2)}


def _metrics(t: pd.DataFrame, score: np.ndarray) -> dict:
    from twinv2.metrics.ctr import auc, gauc

    y, u = t["label"].to_numpy(), t["user_id"].to_numpy()
    ok = len(np.unique(y)) == 2
    return {"n": int(len(t)), "auc": auc(y, score) if ok else None, "gauc": gauc(u, y, score)["gauc"] if ok else None}


def predictions(data: str, run: str) -> tuple[pd.DataFrame, np.ndarray, tuple]:
    """(test rows of World.impressions, a run's probabilities of them (the reference path), user lengths)."""
    from bench.bench_levers import split_predictions

    world, test, pred = split_predictions(data, run)
    return test, pred["prob"], world.user_lengths()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--run", action="append", default=[], help="NAME=RUNDIR (repeatable; one name's runs are "
                    "averaged: seeds)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    runs = []
    for r in a.run:
        if "=" not in r:
            ap.error(f"--run {r!r}: expected NAME=RUNDIR")
        runs.append(tuple(r.split("=", 1)))
    parts = world_parts(a.data)
    test, lengths, probs = None, None, {}
    for name, run in runs:
        t, p, lengths = predictions(a.data, run)
        test = t if test is None else test
        probs.setdefault(name, []).append(np.asarray(p, np.float64))
    if test is None:                                   # no run: the oracle ladder alone, on the stored test split
        from twinv2.training.world import load_world

        w = load_world(a.data, need_clusters=False)
        test = w.impressions[w.impressions["split"] == "test"].reset_index(drop=True)
        lengths = w.user_lengths()
    t = test[["user_id", "item_id", "ts", "label", "p_true"]].merge(
        parts.drop(columns="p_true"), on=["user_id", "item_id", "ts"], how="left", validate="one_to_one")
    logit = t["logit_bias"] + sum(t[k] for k in PARTS)
    if t["interest"].isna().any() or not np.allclose(t["p_true"], 1 / (1 + np.exp(-logit)), atol=1e-5):
        raise SystemExit(f"{a.data}: the regenerated parts do not reproduce the stored p_true of the test rows "
                         f"(a world generated by other code or edited after generation)")
    from twinv2.metrics.groups import length_groups

    uids, lens = lengths
    q, edges = length_groups(lens, 4)
    t["quartile"] = pd.Series(q, index=uids).reindex(t["user_id"].to_numpy()).fillna(0).astype(int).to_numpy()
    t["kind"] = t["top_kind"].map(KINDS)
    oracles = oracle_scores(t)
    ceiling = oracles["no noise"]
    ladder = [{"score": k, **_metrics(t, v)} for k, v in oracles.items()]
    models = []
    for name, ps in probs.items():
        per_seed = [_metrics(t, p) for p in ps]
        shares = [read_shares(t, _logit(p)) for p in ps]
        models.append({"model": name, "seeds": len(ps),
                       "auc": float(np.mean([m["auc"] for m in per_seed])),
                       "gauc": float(np.mean([m["gauc"] for m in per_seed])),
                       "reads": {k: float(np.mean([s[k] for s in shares])) for k in shares[0]}})
    groups = []
    for col, keys in (("kind", [KINDS[k] for k in sorted(KINDS)]), ("quartile", [0, 1, 2, 3])):
        for key in keys:
            m = (t[col] == key).to_numpy()
            if not m.any():
                continue
            sub = t[m]
            line = {"by": col, "group": key, "n": int(m.sum()), "ctr": float(sub["label"].mean()),
                    "oracle_auc": _metrics(sub, oracles["p_true"][m])["auc"],
                    "ceiling_auc": _metrics(sub, ceiling[m])["auc"]}
            if col == "quartile":
                line["max_len"] = float(edges[key + 1])
            for name, ps in probs.items():
                vals = [_metrics(sub, p[m])["auc"] for p in ps]
                line[name] = None if any(v is None for v in vals) else float(np.mean(vals))
                if m.sum() >= 50:             # the share of the interest term the run reads inside the group
                    line[name + " interest"] = float(np.mean([read_shares(sub, _logit(p[m]))["interest"] for p in ps]))
            groups.append(line)
    res = {"data": str(a.data), "test_rows": int(len(t)), "ladder": ladder, "models": models, "groups": groups}
    write_json(Path(a.out) / "bench_oracle_gap.json", res)
    print(table(res))
    print(json.dumps(res, default=float))
    return res


def _f(x) -> str:
    return "   -  " if x is None else f"{x:.4f}"


def _share(x) -> str:
    return "" if x is None else f" ({x:.2f})"


def table(r: dict) -> str:
    lines = [f"test split, {r['test_rows']} rows", "", "| score | AUC | GAUC |", "|---|---|---|"]
    lines += [f"| oracle: {x['score']} | {_f(x['auc'])} | {_f(x['gauc'])} |" for x in r["ladder"]]
    lines += [f"| {m['model']} (mean of {m['seeds']}) | {_f(m['auc'])} | {_f(m['gauc'])} |" for m in r["models"]]
    if r["models"]:
        lines += ["", "share of each logit part a run's logit carries (least squares; the oracle: 1.0 each)", "",
                  "| model | " + " | ".join(PARTS) + " | R^2 |", "|---|" + "---|" * (len(PARTS) + 1)]
        lines += [f"| {m['model']} | " + " | ".join(f"{m['reads'][k]:.2f}" for k in PARTS)
                  + f" | {m['reads']['r2']:.2f} |" for m in r["models"]]
    names = [m["model"] for m in r["models"]]
    lines += ["", "AUC per group (kind: the interest that sets the target's S; quartile: life-cycle length)", "",
              "| by | group | rows | CTR | oracle | no noise | "
              + " | ".join(f"{n} (reads interest)" for n in names) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(names)]
    for g in r["groups"]:
        label = g["group"] if g["by"] == "kind" else f"q{g['group']} (<= {g['max_len']:.0f})"
        lines.append(f"| {g['by']} | {label} | {g['n']} | {g['ctr']:.3f} | {_f(g['oracle_auc'])} | "
                     f"{_f(g['ceiling_auc'])} | "
                     + " | ".join(_f(g.get(n)) + _share(g.get(n + " interest")) for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
