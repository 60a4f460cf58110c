"""The report's tables as rows (dicts), computed from the cell records, and the flat metrics of `dvc metrics`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.benchmark import cost
from pipelines.benchmark.cells import valid_metrics
from pipelines.benchmark.stats import mean_std, paired


def _by(records, model, variant, fn) -> dict[int, Any]:
    return {r["seed"]: fn(r) for r in records if r["model"] == model and r["variant"] == variant}


def _group(r, i, key):
    g = (r["metrics"].get("by_group") or [])
    return g[i].get(key) if i < len(g) and isinstance(g[i], dict) else None


def _div(r, part, key):
    d = (r["metrics"].get("diversity") or {}).get(part) or {}
    return d.get(key)


def tables(records: list[dict], st: dict, models: list[str], variants: list[str]) -> dict:
    """The five tables as lists of rows (dicts), computed from the cell records."""
    default, ref = st["default"], st["reference"]
    models = [m for m in models if any(r["model"] == m and r["variant"] == default for r in records)]
    t: dict[str, list] = {"main": [], "ablation": [], "groups": [], "group_gain": [], "diversity": [], "cost": []}
    for m in models:
        row = {"model": m, "n": len(_by(records, m, default, lambda r: 1))}
        for k in ("auc", "gauc", "logloss", "oracle_gap"):
            row[k] = mean_std(list(_by(records, m, default, lambda r, k=k: r["metrics"].get(k)).values()))
        for k in ("auc", "gauc"):
            row[f"valid_{k}"] = mean_std(list(_by(records, m, default, lambda r, k=k: valid_metrics(r)[k]).values()))
        for k in ("auc", "gauc"):
            row[f"d_{k}"] = (paired(_by(records, m, default, lambda r, k=k: r["metrics"].get(k)),
                                    _by(records, ref, default, lambda r, k=k: r["metrics"].get(k)))
                             if m != ref else None)
        t["main"].append(row)
    for m in st["ablation_models"]:
        for v in variants:
            if not any(r["model"] == m and r["variant"] == v for r in records):
                continue
            row = {"model": m, "variant": v, "overrides": st["variants"].get(v, {}),
                   "n": len(_by(records, m, v, lambda r: 1))}
            for k in ("auc", "gauc", "logloss", "oracle_gap"):
                row[k] = mean_std(list(_by(records, m, v, lambda r, k=k: r["metrics"].get(k)).values()))
            for k in ("auc", "gauc"):
                row[f"valid_{k}"] = mean_std(list(_by(records, m, v, lambda r, k=k: valid_metrics(r)[k]).values()))
            for k in ("auc", "gauc"):
                row[f"d_{k}"] = (paired(_by(records, m, v, lambda r, k=k: r["metrics"].get(k)),
                                        _by(records, m, default, lambda r, k=k: r["metrics"].get(k)))
                                 if v != default else None)
            t["ablation"].append(row)
    n_groups = max((len(r["metrics"].get("by_group") or []) for r in records), default=0)
    for m in models:
        for i in range(n_groups):
            recs = [r for r in records if r["model"] == m and r["variant"] == default]
            lo = [_group(r, i, "min_len") for r in recs]
            hi = [_group(r, i, "max_len") for r in recs]
            t["groups"].append({"model": m, "group": i, "lengths": (lo[0], hi[0]) if recs else (None, None),
                                "auc": mean_std(list(_by(records, m, default, lambda r: _group(r, i, "auc")).values())),
                                "gauc": mean_std(list(_by(records, m, default, lambda r: _group(r, i, "gauc")).values()))})
    if "twinv2" in models and ref in models and ref != "twinv2":
        for i in range(n_groups):
            t["group_gain"].append({"group": i, **{k: paired(_by(records, "twinv2", default, lambda r: _group(r, i, k)),
                                                         _by(records, ref, default, lambda r: _group(r, i, k)))
                                                   for k in ("auc", "gauc")}})
    for m in models:
        vals = {k: mean_std(list(_by(records, m, default, lambda r, k=k: _div(r, *k)).values()))
                for k in (("retrieval", "distinct_categories"), ("retrieval", "entropy"), ("ranking", "coverage"),
                          ("ranking", "ild"))}
        t["diversity"].append({"model": m, **{f"{a}.{b}": v for (a, b), v in vals.items()}})
        t["cost"].append({"model": m, **{k: mean_std(list(_by(records, m, default,
                                                              lambda r, k=k: _cost(r, k)).values()))
                                         for k in ("train_s", "samples_per_s", "evaluate_s", "peak_rss_mb",
                                                   "gsu_positions", "macs_per_candidate")},
                          "epochs_run": mean_std(list(_by(records, m, default,
                                                          lambda r: r["train"].get("epochs_run")).values()))})
    return t


def _cost(r: dict, k: str):
    """A cost of a cell record; macs_per_candidate of a cell done before it was recorded: from its run."""
    if k == "macs_per_candidate" and k not in r["cost"] and r.get("run_dir") and r.get("model") != "gbdt":
        r["cost"][k] = cost.model_macs(Path(r["run_dir"]))
    return r["cost"].get(k)


def flat_metrics(t: dict, st: dict) -> dict:
    """One level of {name: number} for `dvc metrics` / `dvc exp show`: per model the mean valid AUC / GAUC (the
    kept epoch's), the mean test AUC, GAUC, logloss, oracle gap and the paired AUC/GAUC difference vs the reference; per ablation variant the same."""
    out: dict[str, float] = {}
    for r in t["main"]:
        for k in ("valid_auc", "valid_gauc", "auc", "gauc", "logloss", "oracle_gap"):
            if r.get(k, (None,))[0] is not None:
                out[f"{r['model']}.{k}"] = round(r[k][0], 6)
        for k in ("d_auc", "d_gauc"):
            if r.get(k) and r[k]["mean"] is not None:
                out[f"{r['model']}.{k}_vs_{st['reference']}"] = round(r[k]["mean"], 6)
    for r in t["ablation"]:
        if r["variant"] == st["default"]:
            continue
        for k in ("valid_auc", "valid_gauc", "auc", "gauc"):
            if r.get(k, (None,))[0] is not None:
                out[f"{r['model']}@{r['variant']}.{k}"] = round(r[k][0], 6)
        for k in ("d_auc", "d_gauc"):
            if r.get(k) and r[k]["mean"] is not None:
                out[f"{r['model']}@{r['variant']}.{k}_vs_{st['default']}"] = round(r[k]["mean"], 6)
    return out
