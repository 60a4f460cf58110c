"""Choices on the valid split only (issue 30): which row (lever setting, rate, variant) of a set of candidates to
adopt, from the cells of bench/bench_levers.py. A cell stores valid AND test figures; this module reads only the
valid ones (`valid_auc`, `valid_gauc`, the run's figures on the valid split at the epoch it kept) and the cell's
identity (`row`, `model`, `seed`). The test figures are for the report, never for a choice.

    choose(cells, ["id_bias", "user_bias", "user_bias_ulr10"], "twinv2")
        -> {"chosen": "user_bias_ulr10", "criterion": "auc+gauc", "seeds": [0, 1, 2], "score": {row: mean}, ...}

Criterion (fixed before the cells were read): the mean over the seeds that every candidate has of the valid
score, "auc+gauc" = (valid AUC + valid GAUC) / 2 (both goals of the project; a per-user constant such as the
user bias moves AUC and not GAUC), or "auc" / "gauc" alone. Ties go to the first candidate (list the incumbent
first: a new setting must beat it).
"""
from __future__ import annotations

import math

VALID_KEYS = ("valid_auc", "valid_gauc")
CRITERIA = ("auc+gauc", "auc", "gauc")


def valid_score(cell, criterion: str = "auc+gauc") -> float:
    """The valid-split score of one cell; reads cell['valid_auc'] / cell['valid_gauc'] only."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r}: expected one of {list(CRITERIA)}")
    need = {"auc+gauc": VALID_KEYS, "auc": ("valid_auc",), "gauc": ("valid_gauc",)}[criterion]
    vals = []
    for k in need:
        v = cell.get(k)
        if v is None or not math.isfinite(float(v)):
            raise ValueError(f"cell row {cell.get('row')!r} model {cell.get('model')!r} seed {cell.get('seed')!r} "
                             f"has no valid figure {k!r} (computed before valid figures were stored: delete its "
                             f"folder and rerun bench/bench_levers.py)")
        vals.append(float(v))
    return sum(vals) / len(vals)


def choose(cells, candidates: list[str], model: str, criterion: str = "auc+gauc") -> dict:
    """The candidate row with the best mean valid score for `model`, over the seeds every candidate has."""
    if not candidates:
        raise ValueError("choose: no candidate rows")
    seeds: dict[str, set] = {r: set() for r in candidates}
    by = {}
    for c in cells:
        if c["model"] == model and c["row"] in seeds:
            seeds[c["row"]].add(c["seed"])
            by[c["row"], c["seed"]] = c
    common = sorted(set.intersection(*seeds.values()))
    if not common:
        raise ValueError(f"choose: no seed has a {model} cell in every candidate row {candidates} "
                         f"(seeds per row: { {r: sorted(s) for r, s in seeds.items()} })")
    score = {r: sum(valid_score(by[r, s], criterion) for s in common) / len(common) for r in candidates}
    chosen = candidates[0]
    for r in candidates[1:]:
        if score[r] > score[chosen]:
            chosen = r
    per_seed = {r: [valid_score(by[r, s], criterion) - valid_score(by[candidates[0], s], criterion) for s in common]
                for r in candidates}
    return {"chosen": chosen, "model": model, "criterion": criterion, "seeds": common, "score": score,
            "vs_first": per_seed, "first": candidates[0]}
