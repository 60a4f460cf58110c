"""Quarantine: rejected rows, exactly as they came, plus `reason` and `expectation`, never dropped.

`expectation` is the first rule (in suite order) the row breaks; `reason` lists every broken rule's
text, joined by "; ". One DIR/quarantine/<table>.parquet per table, streamed and written atomically
(an empty file with the right columns when nothing was quarantined).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twinv2.io import make_temp_file
from twinv2.validation.rules import Rule


def label_rows(masks: dict[str, np.ndarray], rules: list[Rule], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bad (n,) bool, expectation (n_bad,) str, reason (n_bad,) str) from the per-rule masks."""
    bad = np.zeros(n, dtype=bool)
    for m in masks.values():
        bad |= m
    idx = np.nonzero(bad)[0]
    first = np.full(len(idx), "", dtype=object)
    reason = np.full(len(idx), "", dtype=object)
    for r in rules:
        if r.name not in masks:
            continue
        hit = masks[r.name][idx]
        first[hit & (first == "")] = r.name
        reason[hit] = np.where(reason[hit] == "", r.text, reason[hit] + "; " + r.text)
    return bad, first, reason


class QuarantineWriter:
    """Append quarantined rows of one table; `close()` renames the file into place."""

    def __init__(self, dest: str | Path, raw_schema: pa.Schema):
        self.dest = Path(dest)
        self._tmp = make_temp_file(self.dest)       # owner in the name, umask permissions
        self.schema = raw_schema.append(pa.field("reason", pa.string())).append(pa.field("expectation", pa.string()))
        self._writer = pq.ParquetWriter(self._tmp, self.schema)
        self.n_rows = 0

    def write(self, rows: pa.Table, expectation: np.ndarray, reason: np.ndarray) -> None:
        if len(rows) == 0:
            return
        rows = rows.append_column("reason", pa.array(reason.tolist(), pa.string()))
        rows = rows.append_column("expectation", pa.array(expectation.tolist(), pa.string()))
        self._writer.write_table(rows.select(self.schema.names).cast(self.schema))
        self.n_rows += len(rows)

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.dest)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "QuarantineWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Publish the quarantine file on success; leave nothing behind on any error."""
        if exc_type is None:
            self.close()
        else:
            self.abort()
