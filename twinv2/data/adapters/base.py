"""The interface of one public log format (an adapter); the driver is common.ingest."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from twinv2.data.adapters.lines import Block, FileCount, LineFormat
from twinv2.data.adapters.quarantine import Quarantine
from twinv2.data.schema import EVENT_KEY


class Adapter:
    """One public log format. Subclasses fill `discover`, `read_items`, `event_files`, `to_events`."""

    name = "?"
    cross: tuple[str, ...] = ()            # optional behaviour cross features it fills (schema names)
    dup_key: tuple[str, ...] = EVENT_KEY   # two event lines with this key are one event (meta.json event_key)
    ts_range: tuple[int, int] | None = None                  # configured plausible [lo, hi) ms, if any
    ts_field: str = "ts"                   # the time field as the files name it, and its unit (ms per unit)
    ts_unit_ms: int = 1
    item_what: str = "item"                # how details name an item id ("movie id", "video_id")

    def __init__(self, src: Path, params: dict):
        self.src = Path(src)
        self.params = params
        self.meta: dict = {}                # extra meta.json entries
        self.notes: dict = {}               # extra report entries
        self.item_files: list[Path] = []    # the files read_items reads (for messages)

    def discover(self) -> None: ...

    def read_items(self, quarantine: Quarantine, counts: dict[str, FileCount]) -> pd.DataFrame | None:
        """The item table from side files (None: built from the events by `items_from_events`)."""
        return None

    def event_files(self) -> list[tuple[Path, bool, Callable[[bytes | None], LineFormat]]]:
        raise NotImplementedError

    def to_events(self, block: Block, file: Path, quarantine: Quarantine) -> tuple[Block, pd.DataFrame]:
        """Parsed lines -> (the block minus rejected rows, events with user_id, item_id, ts, play_ms,
        duration_ms, cross..., beh, imp, label), one event per remaining row, same order."""
        raise NotImplementedError

    def finalize(self, ev: pd.DataFrame, bounds: dict[str, int]) -> pd.DataFrame:
        """Last touch on one user range of accepted events, sorted by (user_id, ts, seq) (e.g. labels
        from later events)."""
        return ev

    def items_from_events(self) -> pd.DataFrame:
        """The item table of adapters without an item file, from the accepted events (after pass 2)."""
        raise NotImplementedError

    def after_events(self, items: pd.DataFrame) -> pd.DataFrame:
        return items

    def reject_unknown_items(self, block: Block, column: str, quarantine: Quarantine, file: Path) -> Block:
        """Quarantine events whose item is not in the item table, with a reason that is true: the item's
        line was quarantined (`quarantined_item`, naming that line and its reason), or no line of the item
        file defines it (`unknown_item`; also saying how many of its quarantined lines had no readable id)."""
        ids = block.table.column(column).to_numpy()
        unknown = ~np.isin(ids, self.items_known)
        if not unknown.any():
            return block
        names = ", ".join(p.name for p in self.item_files)
        rejected = {i: (Path(f).name, ln, r) for f, m in quarantine.rejected_ids.items() for i, (ln, r) in m.items()}
        no_id = [(Path(f).name, ln) for f, lines in quarantine.lines_without_id.items() for ln in lines]
        was_rejected = unknown & np.isin(ids, np.fromiter(rejected, dtype=np.int64, count=len(rejected)))
        block = block.reject(was_rejected, quarantine, file, "quarantined_item",
                             [f"{self.item_what} {int(i)}: its line {rejected[int(i)][1]} of {rejected[int(i)][0]} "
                              f"was quarantined ({rejected[int(i)][2]}), so its events are too"
                              for i in ids[was_rejected]])
        ids = block.table.column(column).to_numpy()
        unknown = ~np.isin(ids, self.items_known)
        tail = ""
        if no_id:
            shown = ", ".join(f"{f} line {ln}" for f, ln in no_id[:5]) + (", ..." if len(no_id) > 5 else "")
            tail = (f" (or on one of the {len(no_id)} quarantined lines of the item file whose id could not be "
                    f"read: {shown})")
        return block.reject(unknown, quarantine, file, "unknown_item",
                            [f"{self.item_what} {int(i)} is not in {names}{tail}" for i in ids[unknown]])
