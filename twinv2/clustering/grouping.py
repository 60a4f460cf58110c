"""Rule-based grouping of behaviours by play completion ratio (TWIN-V2, step 1).

p = play_ms / duration_ms puts a behaviour in group g when edges[g] <= p < edges[g+1]; the last group
[edges[-1], inf) holds replays (p >= 1 with the default edges). Values below edges[0] go to group 0.
A cluster never mixes groups: the recursive k-means runs inside each (user, group) set.
"""
from __future__ import annotations

import numpy as np


def completion(play_ms: np.ndarray, duration_ms: np.ndarray) -> np.ndarray:
    """(n,) float64 play completion ratio; a zero/negative duration counts as 1 ms."""
    return np.asarray(play_ms, np.float64) / np.maximum(np.asarray(duration_ms, np.float64), 1.0)


def check_edges(edges) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or len(e) < 1 or np.any(np.diff(e) <= 0) or not np.all(np.isfinite(e)):
        raise ValueError(f"params cluster.group_edges must be a strictly increasing list of finite numbers, "
                         f"got {edges!r}")
    if len(e) > 127:
        raise ValueError(f"params cluster.group_edges: at most 127 groups fit the int8 group column, got {len(e)}")
    return e


def n_groups(edges) -> int:
    return len(check_edges(edges))


def group_of(comp: np.ndarray, edges) -> np.ndarray:
    """(n,) int8 group of each completion ratio."""
    e = check_edges(edges)
    g = np.searchsorted(e, np.asarray(comp, np.float64), side="right") - 1
    return np.clip(g, 0, len(e) - 1).astype(np.int8)
