"""A small synthetic validated world written directly (independent of the generator), for clustering."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twinv2.data.store import BehaviorWriter, write_table
from twinv2.io import write_json

DAY = 86_400_000
T0 = 1_700_000_000_000


def make_world(root: Path, n_users: int = 30, n_items: int = 400, n_interests: int = 8, seed: int = 0,
               lengths=(20, 400), days: int = 30, history_days: int = 25) -> Path:
    """DIR/validated/ with items, behaviours (+ liked, true_interest) and meta.json.

    Items belong to one interest each; every user watches items of 2-3 interests, in sessions of one
    interest, so item co-occurrence carries the interest structure."""
    rng = np.random.default_rng(seed)
    item_interest = rng.integers(0, n_interests, n_items)
    items = pd.DataFrame({"item_id": np.arange(1, n_items + 1), "author_id": rng.integers(1, 60, n_items),
                          "category": item_interest + 1, "duration_ms": rng.integers(5_000, 120_000, n_items)})
    val = root / "validated"
    write_table(val / "items.parquet", items, "items")
    by_interest = [np.flatnonzero(item_interest == k) for k in range(n_interests)]
    with BehaviorWriter(val / "behaviors") as w:
        for u in range(1, n_users + 1):
            L = int(rng.integers(*lengths))
            mine = rng.choice(n_interests, size=3, replace=False)
            interest = np.repeat(rng.choice(mine, size=L // 5 + 1), 5)[:L]        # sessions of 5
            it = np.array([rng.choice(by_interest[k]) for k in interest]) + 1
            ts = np.sort(T0 + rng.integers(0, days * DAY, L))
            dur = items["duration_ms"].to_numpy()[it - 1]
            play = (dur * rng.uniform(0, 1.3, L)).astype(np.int64)
            w.write(pd.DataFrame({"user_id": u, "item_id": it, "ts": ts, "play_ms": play, "duration_ms": dur,
                                  "liked": (rng.random(L) < 0.1).astype(np.int8),
                                  "true_interest": interest.astype(np.int32)}))
    write_json(val / "meta.json", {"source": "test", "history_start_ms": T0,
                                   "history_end_ms": T0 + history_days * DAY, "end_ms": T0 + days * DAY})
    return root


@pytest.fixture()
def world(tmp_path) -> Path:
    return make_world(tmp_path / "w")


@pytest.fixture()
def cparams(params):
    import copy

    p = copy.deepcopy(params)
    p["cluster"]["n_jobs"] = 1
    p["cluster"]["chunk_rows"] = 3000
    return p
