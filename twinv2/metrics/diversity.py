"""Diversity, with one definition for every model.

(a) retrieval: the categories of the behaviours (or clusters) a model's GSU retrieves for a target:
    number of distinct categories among the top-k and the Shannon entropy (nats) of their distribution.
(b) ranking: for a user, the top-N of a scored pool of candidate items: category coverage (distinct
    categories / min(N, number of categories)) and intra-list diversity (share of item pairs in the
    top-N whose categories differ).
"""
from __future__ import annotations

import numpy as np


def retrieval_diversity(categories: np.ndarray, valid: np.ndarray) -> dict:
    """categories: (B, k) category index of each retrieved element; valid: (B, k) bool.

    Returns the mean over rows with at least one valid element of the distinct count and entropy."""
    c = np.asarray(categories)
    v = np.asarray(valid, dtype=bool)
    distinct, entropy = [], []
    for row, ok in zip(c, v):
        x = row[ok]
        if len(x) == 0:
            continue
        _, cnt = np.unique(x, return_counts=True)
        p = cnt / cnt.sum()
        distinct.append(len(cnt))
        entropy.append(float(-(p * np.log(p)).sum()))
    return {"distinct_categories": float(np.mean(distinct)) if distinct else None,
            "entropy": float(np.mean(entropy)) if entropy else None, "n_rows": len(distinct)}


def top_n_list(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n best scores (ties broken by index, deterministic)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(s)), -s))
    return order[:n]


def list_diversity(categories: np.ndarray, n_categories: int) -> dict:
    """Coverage and intra-list diversity of one recommended list given its items' categories."""
    c = np.asarray(categories)
    n = len(c)
    distinct = len(np.unique(c))
    same_pairs = sum(k * (k - 1) / 2 for k in np.unique(c, return_counts=True)[1]) if n else 0
    all_pairs = n * (n - 1) / 2
    return {"coverage": distinct / max(min(n, n_categories), 1),
            "ild": float(1 - same_pairs / all_pairs) if all_pairs else 0.0, "distinct": distinct}


def ranking_diversity(lists_categories: list[np.ndarray], n_categories: int) -> dict:
    """Mean coverage / intra-list diversity over users' top-N lists, plus the catalogue coverage of
    all lists together."""
    per = [list_diversity(c, n_categories) for c in lists_categories if len(c)]
    union = np.unique(np.concatenate(lists_categories)) if lists_categories else np.zeros(0)
    return {"coverage": float(np.mean([p["coverage"] for p in per])) if per else None,
            "ild": float(np.mean([p["ild"] for p in per])) if per else None,
            "distinct_categories": float(np.mean([p["distinct"] for p in per])) if per else None,
            "catalogue_coverage": len(union) / max(n_categories, 1), "n_users": len(per)}
