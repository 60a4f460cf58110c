"""Taobao UserBehavior.csv -> the canonical model (docs/data.md, "Taobao").

--src is UserBehavior.csv or a directory holding it: no header, five fields per line
    user_id, item_id, category_id, behavior_type in {pv, buy, cart, fav}, timestamp (seconds)
Mapping:
    items        item_id, category = category_id as given (large ids: models re-index), author_id = 0,
                 duration_ms = nominal_duration_ms (Taobao has no durations); an item's category is
                 the first one seen (conflicts are counted)
    behaviours   every event; cross feature liked = 1 for fav/cart/buy, 0 for pv; completion proxy =
                 depth of the action: play_ms = {pv .25, fav .5, cart .75, buy 1.0} * duration_ms
    impressions  pv events with ts >= history_end; label = 1 when the same user fav/cart/buys the same
                 item at or after the pv and within label_window_h hours
Events outside params ingest.taobao.ts_range_ms (the dataset's documented 9 days) are quarantined
(common.ingest, reason ts_out_of_range).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from twinv2.data.adapters.common import Adapter, Block, LineFormat, Quarantine

NAMES = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
ACTIONS = ("pv", "fav", "cart", "buy")                     # action code = index
DEPTH = np.array([0.25, 0.5, 0.75, 1.0])


class Taobao(Adapter):
    name = "taobao"
    cross = ("liked",)
    # a pv and a buy of one item in one second are two events: behaviours keep `action` (0 pv, 1 fav, 2 cart,
    # 3 buy) and meta.json event_key names it, so that validate applies the same rule (schema.repeated_events)
    dup_key = ("user_id", "item_id", "ts", "action")
    ts_field, ts_unit_ms, item_what = "timestamp", 1000, "item_id"

    def discover(self) -> None:
        src = self.src
        if src.is_dir():
            files = sorted(src.glob("UserBehavior*.csv"))
            if not files:
                raise FileNotFoundError(f"{src}: no UserBehavior*.csv found (Taobao user behaviour log)")
            self.files = files
        elif src.is_file():
            self.files = [src]
        else:
            raise FileNotFoundError(f"{src}: no such file or directory (Taobao UserBehavior.csv)")
        p = self.params.get("taobao", {}) or {}
        self.duration_ms = int(p.get("nominal_duration_ms", 60_000))
        self.window_ms = int(float(p.get("label_window_h", 24)) * 3_600_000)
        rng = p.get("ts_range_ms")
        self.ts_range = None if rng is None else (int(rng[0]), int(rng[1]))   # applied by common.ingest
        self._items: list[pd.DataFrame] = []
        self.meta.update({
            "label": f"pv followed by fav/cart/buy of the same item within {self.window_ms // 3_600_000} h",
            "behaviors": "every event (pv, fav, cart, buy); liked = action != pv",
            "completion_proxy": f"duration_ms = {self.duration_ms}; play_ms = depth * duration_ms with depth "
                                "pv 0.25, fav 0.5, cart 0.75, buy 1.0",
            "category": "category_id as given (large ids; models re-index)",
            "author": "author_id = 0 (Taobao has no author)",
            "ts_range_ms": list(self.ts_range) if self.ts_range else None,
        })

    def event_files(self):
        def make_format(first, path):
            return LineFormat(path, NAMES, {"user_id": "int", "item_id": "int", "category_id": "int",
                                            "behavior_type": ACTIONS, "timestamp": "int"}, ",")

        return [(p, False, lambda first, p=p: make_format(first, p)) for p in self.files]

    def to_events(self, block: Block, file: Path, quarantine: Quarantine):
        block = block.reject_negative(["user_id", "item_id", "category_id"], quarantine, file)
        block = block.reject_int32("category_id", block.table.column("category_id").to_numpy(), quarantine, file,
                                   "items.category")
        block = block.reject_bad_ts("timestamp", block.table.column("timestamp").to_numpy().astype(np.float64) * 1000,
                                    quarantine, file, unit="s")
        t = block.table
        ts = t.column("timestamp").to_numpy() * 1000          # checked above: no overflow
        action = pd.Categorical(t.column("behavior_type").to_pylist(), categories=ACTIONS).codes.astype(np.int8)
        item = t.column("item_id").to_numpy()
        ev = pd.DataFrame({
            "user_id": t.column("user_id").to_numpy(),
            "item_id": item,
            "ts": ts,
            "play_ms": np.round(DEPTH[action] * self.duration_ms).astype(np.int32),
            "duration_ms": np.int32(self.duration_ms),
            "liked": (action > 0).astype(np.int8),
            "action": action,
            "category": t.column("category_id").to_numpy().astype(np.int32),
            "beh": True,
            "imp": action == 0,
            "label": np.int8(0),
        })
        return block, ev

    def items_from_events(self) -> pd.DataFrame:
        """Items of the accepted events; an item seen with two categories keeps the one of its earliest line."""
        pairs = (pd.concat(self._items, ignore_index=True) if self._items
                 else pd.DataFrame({"item_id": np.zeros(0, np.int64), "category": np.zeros(0, np.int32),
                                    "seq": np.zeros(0, np.int64)}))
        pairs = pairs.sort_values("seq", kind="stable").drop_duplicates(["item_id", "category"])
        conflicts = pairs.duplicated("item_id", keep="first")
        self.notes["items_category_conflicts"] = int(conflicts.sum())
        items = pairs.loc[~conflicts].sort_values("item_id", kind="stable")
        return pd.DataFrame({"item_id": items["item_id"].to_numpy(), "author_id": 0,
                             "category": items["category"].to_numpy(), "duration_ms": self.duration_ms})

    def finalize(self, ev: pd.DataFrame, bounds: dict[str, int]) -> pd.DataFrame:
        """label of a pv: a fav/cart/buy of the same (user, item) at ts in [pv ts, pv ts + window]; the
        items (with their category) are collected here, from accepted events only."""
        ev = ev.copy()
        g = ev.groupby(["item_id", "category"], sort=False)["seq"].min().reset_index()
        self._items.append(g)
        order = np.lexsort((ev["action"].to_numpy() > 0, ev["ts"].to_numpy(),
                            ev["item_id"].to_numpy(), ev["user_id"].to_numpy()))
        s = ev.iloc[order]
        conv_ts = s["ts"].where(s["action"] > 0)
        # next conversion at or after each row, within the same (user, item): conversions sort after
        # a pv of the same ts, so a backward fill within the group finds it
        nxt = conv_ts.groupby([s["user_id"].to_numpy(), s["item_id"].to_numpy()]).bfill()
        hit = (s["action"].to_numpy() == 0) & nxt.notna().to_numpy() & \
              ((nxt.to_numpy() - s["ts"].to_numpy()) <= self.window_ms)
        label = np.zeros(len(ev), np.int8)
        label[order] = hit.astype(np.int8)
        ev["label"] = label
        return ev
