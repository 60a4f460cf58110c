"""The ingest quarantine: every rejected line with its file, line number, raw text, reason and detail."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twinv2.data.adapters.lines import MAX_TEXT, fetch_lines
from twinv2.io import atomic_path

LINE_BITS = 40                     # an event's seq = file index << 40 | line number

QUARANTINE_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("text", pa.string()),
                               ("reason", pa.string()), ("detail", pa.string())])


class Quarantine:
    """Rejected lines: file, 1-based line number, raw text, reason code, human detail. Streams to
    one Parquet file (written atomically at close) and counts by reason."""

    def __init__(self, dest: Path, flush_rows: int = 100_000):
        self.dest = Path(dest)
        self._ctx = atomic_path(self.dest)
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, QUARANTINE_SCHEMA)
        self._rows: list[tuple] = []
        self.flush_rows = flush_rows
        self.by_reason: dict[str, int] = {}
        self.by_file: dict[str, int] = {}
        self._watch: dict[str, tuple[str, int]] = {}
        self.rejected_ids: dict[str, dict[int, tuple[int, str]]] = {}   # item file -> {id: (line, reason)}
        self.lines_without_id: dict[str, list[int]] = {}                # item file -> lines whose id is unreadable

    def watch(self, file: Path | str, delimiter: str, id_field: int = 0) -> None:
        """Remember the item id of each line of an item file that gets quarantined (its `id_field`-th field,
        when it reads as an id), so that an event of that item can be told its item's line was quarantined
        (reason quarantined_item) rather than that the item is missing."""
        self._watch[str(file)] = (delimiter, id_field)
        self.rejected_ids.setdefault(str(file), {})
        self.lines_without_id.setdefault(str(file), [])

    def _remember(self, file: str, line: int, text: str, reason: str) -> None:
        delim, k = self._watch[file]
        fields = text.split(delim)
        v = fields[k].strip().strip('"').strip() if k < len(fields) else ""
        if re.fullmatch(r"\d{1,18}", v):
            self.rejected_ids[file].setdefault(int(v), (int(line), reason))
        else:
            self.lines_without_id[file].append(int(line))

    def add(self, file: Path | str, line: int, raw: bytes | str, reason: str, detail: str) -> None:
        if isinstance(raw, str):        # a decoded line may hold undecodable bytes as surrogates: show them as \xNN
            raw = raw.encode("utf-8", errors="surrogateescape")
        text = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
        if str(file) in self._watch and reason != "duplicate_item":
            self._remember(str(file), line, text, reason)
        if len(text) > MAX_TEXT:
            text = text[:MAX_TEXT] + "..."
        self._rows.append((str(file), int(line), text, reason, detail))
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        self.by_file[str(file)] = self.by_file.get(str(file), 0) + 1
        if len(self._rows) >= self.flush_rows:
            self._flush()

    def add_many(self, file: Path, lines: np.ndarray, raws: pa.Array, reason: str, details) -> None:
        raws = raws.to_pylist()
        if isinstance(details, str):
            details = [details] * len(raws)
        for ln, raw, det in zip(lines, raws, details):
            self.add(file, ln, raw, reason, det)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def _flush(self) -> None:
        if self._rows:
            cols = list(zip(*self._rows))
            self._writer.write_table(pa.Table.from_arrays([pa.array(c, f.type) for c, f in
                                                          zip(cols, QUARANTINE_SCHEMA)], schema=QUARANTINE_SCHEMA))
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._ctx.__exit__(None, None, None)
        self.closed = True

    def abort(self) -> None:
        if getattr(self, "closed", False):
            return
        self._writer.close()
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass
        if self._tmp.exists():
            self._tmp.unlink()


class _Deferred:
    """Events rejected in pass 2 (out-of-range time, duplicates): their line text is fetched at the end,
    one sequential read per file."""

    def __init__(self):
        self.rows: list[tuple[np.ndarray, str, list[str]]] = []

    def add(self, seq: np.ndarray, reason: str, details) -> None:
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq):
            self.rows.append((seq, reason, [details] * len(seq) if isinstance(details, str) else list(details)))

    def flush(self, quarantine: Quarantine, files: list[Path]) -> int:
        if not self.rows:
            return 0
        seq = np.concatenate([s for s, _, _ in self.rows])
        reasons = [r for s, r, _ in self.rows for _ in range(len(s))]
        details = [d for _, _, ds_ in self.rows for d in ds_]
        order = np.argsort(seq, kind="stable")
        fi, line = seq >> LINE_BITS, seq & ((1 << LINE_BITS) - 1)
        for f in np.unique(fi):
            idx = order[fi[order] == f]
            texts = fetch_lines(files[int(f)], line[idx])
            for i, text in zip(idx, texts):
                quarantine.add(files[int(f)], int(line[i]), text, reasons[i], details[i])
        self.rows = []
        return len(seq)
