"""What every real-log adapter shares: line-checked streaming, quarantine, the time split, the writer.

An adapter (kuairand.py, movielens.py, taobao.py) only says how its files look and how a parsed row
becomes a canonical *event*; this module does the rest in two passes, memory bounded:

pass 1  stream each event file in blocks of lines (`read_lines`). Every line is first matched against
        the format's line grammar (one RE2 regex over the whole block, in C++); lines that do not
        match are diagnosed one by one (bad encoding, empty line, wrong field count, empty field,
        not a number, unknown value) and go to the quarantine with file, line number, raw text and
        reason. The good lines are parsed by pyarrow.csv, turned into events by the adapter (which
        may reject more rows for semantic reasons: unknown item, out-of-range value), sorted by user
        and spilled to a temporary Parquet directory. Rows are counted per user and the time span
        is tracked.
pass 2  the time span gives the split bounds (`split_bounds`); users are cut into ranges of at most
        `sort_budget_rows` events; each range is read back (row-group statistics skip most of the
        spill), sorted by (user, ts, line) and written: behaviours through `BehaviorWriter`,
        impressions (ts >= history_end) with their split.

Events carry three role columns besides the canonical fields: `beh` (is a behaviour), `imp` (may
become an impression when ts >= history_end) and `label`. The report's counts must add up: every
data line read is accepted or quarantined, and every accepted event line is a behaviour, an
impression, both, or unused (asserted in `ingest`).
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from twinv2.data.schema import DatasetPaths, conform
from twinv2.data.store import BehaviorWriter
from twinv2.errors import DataError
from twinv2.io import atomic_path, write_json

# ---------------------------------------------------------------- line grammar

NUM = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
KIND_RE = {"int": r"-?\d+", "num": NUM, "num?": f"(?:{NUM})?",
           "ids?": r'(?:"-?\d+(?:,-?\d+)*"|-?\d+)?'}    # a list of ids, quoted when it holds a comma
MAX_TEXT = 4096      # quarantined line text is cut to this many characters


@dataclass
class LineFormat:
    """The grammar of one delimited file: column names in file order and the kind of each.

    kinds: "int", "num" (any decimal), "num?" (decimal or empty), "ids?" (comma-separated ids, quoted,
    or empty), a tuple of allowed strings, or absent = any text (unused columns are not checked beyond
    the field count). quoted: fields may be wrapped in double quotes (CSV written by pandas).
    """

    path: Path
    names: list[str]
    kinds: dict[str, str | tuple[str, ...]]
    delimiter: str = ","
    quoted: bool = False

    def regex(self) -> str:
        d = re.escape(self.delimiter)
        if self.quoted:
            anything = f'(?:"[^"\\r\\n]*"|[^{d}"\\r\\n]*)'
        elif len(self.delimiter) == 1:
            anything = f"[^{d}\\r\\n]*"
        else:
            c = re.escape(self.delimiter[0])      # RE2 has no look-ahead: a char, or c + another char
            anything = f"(?:[^{c}\\r\\n]|{c}[^{c}\\r\\n])*"
        parts = []
        for n in self.names:
            k = self.kinds.get(n)
            if k is None:
                parts.append(anything)
            elif isinstance(k, tuple):
                parts.append("(?:" + "|".join(re.escape(v) for v in k) + ")")
            else:
                parts.append(KIND_RE[k])
        return "^" + d.join(parts) + r"\r?\n?$"

    def used(self) -> list[str]:
        return [n for n in self.names if n in self.kinds]

    def diagnose(self, raw: bytes) -> tuple[str, str]:
        """(reason, detail) of a line that failed the grammar."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return "bad_encoding", f"not UTF-8 text ({e.reason} at byte {e.start})"
        text = text.rstrip("\r\n")
        if not text.strip():
            return "empty_line", "empty line"
        if self.quoted:
            fields = next(csv.reader(io.StringIO(text), delimiter=self.delimiter), [])
        else:
            fields = text.split(self.delimiter)
        if len(fields) != len(self.names):
            return "field_count", (f"expected {len(self.names)} fields separated by {self.delimiter!r} "
                                   f"({', '.join(self.names)}), got {len(fields)}")
        for name, value in zip(self.names, fields):
            k = self.kinds.get(name)
            if k == "ids?":
                if value and not re.fullmatch(r"-?\d+(?:,-?\d+)*", value):
                    return "not_numeric", f"field {name!r}: expected comma-separated integer ids, got {value[:80]!r}"
                continue
            if k is None or k == "num?":
                if k == "num?" and value and not re.fullmatch(NUM, value):
                    return "not_numeric", f"field {name!r}: expected a number or nothing, got {value[:80]!r}"
                continue
            if value == "":
                return "empty_field", f"field {name!r} is empty"
            if isinstance(k, tuple):
                if value not in k:
                    return "bad_value", f"field {name!r}: expected one of {list(k)}, got {value[:80]!r}"
            elif not re.fullmatch(KIND_RE[k], value):
                what = "an integer" if k == "int" else "a number"
                return "not_numeric", f"field {name!r}: expected {what}, got {value[:80]!r}"
        return "malformed", "line does not match the expected layout"   # e.g. a stray quote

    def parse(self, good: pa.BinaryArray) -> pa.Table:
        """Parse lines that matched the grammar (so parsing cannot fail) into the used columns."""
        if len(good) == 0:
            return pa.table({n: pa.array([], _arrow_type(self.kinds[n])) for n in self.used()})
        offsets = np.frombuffer(good.buffers()[1], dtype=np.int32)[good.offset: good.offset + len(good) + 1]
        data = good.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        delim = self.delimiter
        if len(delim) > 1:               # ml-1m "::": the grammar guarantees no lone ':' inside a used field
            data = pa.py_buffer(data.to_pybytes().replace(delim.encode(), b"\x1f"))
            delim = "\x1f"
        names = [f"c{i}" for i in range(len(self.names))]   # duplicate-proof names
        used = {f"c{i}": n for i, n in enumerate(self.names) if n in self.kinds}
        t = pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(column_names=names, use_threads=True, block_size=1 << 24),
            parse_options=pcsv.ParseOptions(delimiter=delim, quote_char='"' if self.quoted else False, ignore_empty_lines=False),
            convert_options=pcsv.ConvertOptions(
                include_columns=list(used),
                column_types={c: _arrow_type(self.kinds[n]) for c, n in used.items()},
                strings_can_be_null=False),
        )
        if len(t) != len(good):      # cannot happen for lines that matched the grammar
            raise DataError(f"{self.path}: parsed {len(t)} rows from {len(good)} checked lines")
        return t.rename_columns([used[c] for c in t.column_names])


def _arrow_type(kind) -> pa.DataType:
    if isinstance(kind, tuple) or kind == "ids?":
        return pa.string()
    return pa.int64() if kind == "int" else pa.float64()


def split_header(raw: bytes, path: Path, delimiter: str) -> list[str]:
    try:
        text = raw.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError(f"{path}: line 1 (the header) is not UTF-8 text") from None
    return [c.strip() for c in text.split(delimiter)]


def require_columns(path: Path, names: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}: header lacks columns {missing}; found {list(names)}, "
                        f"expected at least {list(required)}")


# ---------------------------------------------------------------- quarantine

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

    def add(self, file: Path | str, line: int, raw: bytes | str, reason: str, detail: str) -> None:
        text = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, bytes) else raw
        text = text.rstrip("\r\n")
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

    def abort(self) -> None:
        self._writer.close()
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass
        if self._tmp.exists():
            self._tmp.unlink()


# ---------------------------------------------------------------- streaming one event file


@dataclass
class Block:
    """Parsed good lines of one block: the table, their raw text and their 1-based line numbers."""

    table: pa.Table
    raw: pa.BinaryArray
    lines: np.ndarray

    def reject(self, mask: np.ndarray, quarantine: Quarantine, file: Path, reason: str, details) -> "Block":
        """Quarantine the rows in mask (details: one string or one per rejected row); keep the rest."""
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return self
        quarantine.add_many(file, self.lines[mask], self.raw.filter(pa.array(mask)), reason, details)
        keep = pa.array(~mask)
        return Block(self.table.filter(keep), self.raw.filter(keep), self.lines[~mask])


@dataclass
class FileCount:
    lines: int = 0            # data lines (header excluded)
    header: int = 0
    accepted: int = 0
    quarantined: int = 0


def read_lines(path: Path, make_format: Callable[[bytes | None], LineFormat], header: bool,
               quarantine: Quarantine, count: FileCount, chunk_bytes: int = 32 << 20) -> Iterator[Block]:
    """Stream a delimited file in blocks of whole lines, quarantining lines that break the grammar."""
    with open(path, "rb") as f:
        lineno = 0
        first = f.readline() if header else None
        if header:
            if not first:
                raise DataError(f"{path}: file is empty; expected a header line")
            lineno, count.header = 1, 1
        fmt = make_format(first)
        pattern = fmt.regex()
        while True:
            lines = f.readlines(chunk_bytes)
            if not lines:
                break
            n = len(lines)
            nums = np.arange(lineno + 1, lineno + 1 + n, dtype=np.int64)
            lineno += n
            count.lines += n
            arr = pa.array(lines, pa.binary())
            ok = pc.match_substring_regex(arr, pattern).to_numpy(zero_copy_only=False)
            for i in np.flatnonzero(~ok):
                reason, detail = fmt.diagnose(lines[i])
                quarantine.add(path, nums[i], lines[i], reason, detail)
            del lines
            good = arr.filter(pa.array(ok)) if not ok.all() else arr
            yield Block(fmt.parse(good), good, nums[ok])


def read_small_lines(path: Path, encoding: str, quarantine: Quarantine, count: FileCount,
                     header: bool) -> Iterator[tuple[int, str]]:
    """Lines of a small side file (items), decoded; undecodable lines are quarantined."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if header and i == 1:
                count.header = 1
                continue
            count.lines += 1
            try:
                text = raw.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError as e:
                quarantine.add(path, i, raw, "bad_encoding", f"not {encoding} text ({e.reason})")
                continue
            if not text.strip():
                quarantine.add(path, i, raw, "empty_line", "empty line")
                continue
            yield i, text


# ---------------------------------------------------------------- the time split


def split_bounds(t0: int, t1: int, params: dict) -> dict[str, int]:
    """Bounds (ms) of the time split over the log's span [t0, t1] (fractions of the whole span):
    history [t0, history_end) | train [history_end, valid_start) | valid [.., test_start) | test [.., t1]."""
    h, v, t = (float(params.get(k, d)) for k, d in
               (("history_frac", 0.7), ("valid_frac", 0.1), ("test_frac", 0.1)))
    if min(h, v, t) <= 0 or h + v + t >= 1:
        raise ValueError(f"params ingest: need history_frac, valid_frac, test_frac > 0 with a sum below 1 "
                         f"(the rest is train), got {h}, {v}, {t}")
    span = t1 - t0
    return {"history_start_ms": int(t0),
            "history_end_ms": int(t0 + round(h * span)),
            "valid_start_ms": int(t0 + round((1 - v - t) * span)),
            "test_start_ms": int(t0 + round((1 - t) * span)),
            "end_ms": int(t1)}


def assign_split(ts: np.ndarray, b: dict[str, int]) -> np.ndarray:
    """'train' / 'valid' / 'test' for impression times (all >= history_end_ms)."""
    out = np.full(len(ts), "train", dtype=object)
    out[ts >= b["valid_start_ms"]] = "valid"
    out[ts >= b["test_start_ms"]] = "test"
    return out


# ---------------------------------------------------------------- the adapter interface and driver


class Adapter:
    """One public log format. Subclasses fill `discover`, `read_items`, `event_files`, `to_events`."""

    name = "?"
    cross: tuple[str, ...] = ()            # optional behaviour cross features it fills (schema names)

    def __init__(self, src: Path, params: dict):
        self.src = Path(src)
        self.params = params
        self.meta: dict = {}                # extra meta.json entries
        self.notes: dict = {}               # extra report entries

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
        """Last touch on one user range, sorted by (user_id, ts, seq) (e.g. labels from later events)."""
        return ev

    def items_from_events(self) -> pd.DataFrame:
        raise NotImplementedError

    def after_events(self, items: pd.DataFrame) -> pd.DataFrame:
        return items


def _user_ranges(counts: pd.Series, budget: int) -> list[tuple[int, int]]:
    """Cut users (sorted ids with event counts) into [lo, hi] ranges of at most `budget` events
    (a single bigger user gets a range of its own)."""
    ids, c = counts.index.to_numpy(np.int64), counts.to_numpy(np.int64)
    out, start, acc = [], 0, 0
    for i in range(len(ids)):
        if acc and acc + c[i] > budget:
            out.append((int(ids[start]), int(ids[i - 1])))
            start, acc = i, 0
        acc += c[i]
    if len(ids):
        out.append((int(ids[start]), int(ids[-1])))
    return out


def ingest(adapter: Adapter, out: Path, params: dict, progress: bool = False) -> dict:
    """Run an adapter: write out/raw/{items.parquet, behaviors/, impressions.parquet, meta.json},
    out/quarantine/ingest.parquet; return the report (the caller writes it)."""
    paths = DatasetPaths(out)
    chunk_bytes = int(params.get("chunk_bytes", 32 << 20))
    budget = int(params.get("sort_budget_rows", 4_000_000))
    adapter.discover()
    paths.stage("raw").mkdir(parents=True, exist_ok=True)
    paths.quarantine.mkdir(parents=True, exist_ok=True)
    quarantine = Quarantine(paths.quarantine / "ingest.parquet")
    spill = Path(tempfile.mkdtemp(prefix=".ingest-spill.", dir=out))
    counts: dict[str, FileCount] = {}
    try:
        items = adapter.read_items(quarantine, counts)
        user_counts = pd.Series(dtype=np.int64)
        t0, t1 = None, None
        n_events, n_part = 0, 0
        bar = _bar(progress, adapter.name)
        for fi, (path, header, make_format) in enumerate(adapter.event_files()):
            fc = counts.setdefault(str(path), FileCount())
            for block in read_lines(path, make_format, header, quarantine, fc, chunk_bytes):
                block, ev = adapter.to_events(block, path, quarantine)
                if len(ev) == 0:
                    continue
                ev["seq"] = (np.int64(fi) << 40) + block.lines
                ev = ev.sort_values("user_id", kind="stable")
                pq.write_table(pa.Table.from_pandas(ev, preserve_index=False),
                               spill / f"part-{n_part:06d}.parquet", row_group_size=65_536)
                n_part += 1
                n_events += len(ev)
                vc = ev["user_id"].value_counts()
                user_counts = user_counts.add(vc, fill_value=0) if len(user_counts) else vc
                lo, hi = int(ev["ts"].min()), int(ev["ts"].max())
                t0 = lo if t0 is None else min(t0, lo)
                t1 = hi if t1 is None else max(t1, hi)
                if bar is not None:
                    bar.update(len(block.lines))
        if bar is not None:
            bar.close()
        for f, fc in counts.items():
            fc.quarantined = quarantine.by_file.get(f, 0)
            fc.accepted = fc.lines - fc.quarantined
        if n_events == 0:
            raise DataError(f"{adapter.src}: no valid event line in {[str(p) for p, _, _ in adapter.event_files()]}"
                            f"; {quarantine.total} lines quarantined by reason {quarantine.by_reason} "
                            f"(see {quarantine.dest})")
        bounds = split_bounds(t0, t1, params)
        if items is None:
            items = adapter.items_from_events()
        items = adapter.after_events(items)

        # pass 2: user ranges, sorted, written
        roles = {"behavior_only": 0, "impression_only": 0, "both": 0, "unused": 0}
        by_split = {"train": 0, "valid": 0, "test": 0}
        labels_pos = 0
        spill_ds = ds.dataset(str(spill), format="parquet")
        beh_cols = ["user_id", "item_id", "ts", "play_ms", "duration_ms", *adapter.cross]
        imp_path = paths.impressions("raw")
        with atomic_path(imp_path) as imp_tmp:
            imp_writer = None
            with BehaviorWriter(paths.behaviors("raw")) as bw:
                for lo, hi in _user_ranges(user_counts.sort_index().astype(np.int64), budget):
                    t = spill_ds.to_table(filter=(ds.field("user_id") >= lo) & (ds.field("user_id") <= hi))
                    ev = t.to_pandas().sort_values(["user_id", "ts", "seq"], kind="stable")
                    ev = adapter.finalize(ev.reset_index(drop=True), bounds)
                    beh = ev["beh"].to_numpy(bool)
                    imp = ev["imp"].to_numpy(bool) & (ev["ts"].to_numpy() >= bounds["history_end_ms"])
                    roles["behavior_only"] += int((beh & ~imp).sum())
                    roles["impression_only"] += int((~beh & imp).sum())
                    roles["both"] += int((beh & imp).sum())
                    roles["unused"] += int((~beh & ~imp).sum())
                    bw.write(pa.Table.from_pandas(ev.loc[beh, beh_cols], preserve_index=False))
                    im = ev.loc[imp, ["user_id", "item_id", "ts", "label"]].copy()
                    im["split"] = assign_split(im["ts"].to_numpy(), bounds)
                    for s, n in im["split"].value_counts().items():
                        by_split[s] += int(n)
                    labels_pos += int(im["label"].sum())
                    tab = conform(pa.Table.from_pandas(im, preserve_index=False), "impressions")
                    if imp_writer is None:
                        imp_writer = pq.ParquetWriter(imp_tmp, tab.schema)
                    imp_writer.write_table(tab)
                n_beh = bw.n_rows
            if imp_writer is None:
                from twinv2.data.schema import IMPRESSIONS_SCHEMA
                imp_writer = pq.ParquetWriter(imp_tmp, IMPRESSIONS_SCHEMA)
            imp_writer.close()
        items_tab = conform(pa.Table.from_pandas(items.reset_index(drop=True), preserve_index=False), "items")
        from twinv2.io import write_parquet
        write_parquet(paths.items("raw"), items_tab)
        quarantine.close()
    except BaseException:
        quarantine.abort()
        raise
    finally:
        shutil.rmtree(spill, ignore_errors=True)

    n_imp = sum(by_split.values())
    lines_read = sum(fc.lines for fc in counts.values())
    accepted_lines = sum(fc.accepted for fc in counts.values())
    event_files = {str(p) for p, _, _ in adapter.event_files()}
    accepted_events = sum(fc.accepted for f, fc in counts.items() if f in event_files)
    report = {
        "format": adapter.name, "src": str(adapter.src), "out": str(out),
        "files": {f: vars(fc) for f, fc in counts.items()},
        "lines_read": lines_read,
        "lines_accepted": accepted_lines,
        "lines_quarantined": quarantine.total,
        "quarantined": dict(sorted(quarantine.by_reason.items())),
        "event_lines_accepted": accepted_events,
        "event_roles": roles,
        "rows": {"items": len(items_tab), "behaviors": n_beh, "impressions": n_imp,
                 "impressions_by_split": by_split},
        "positive_rate": round(labels_pos / n_imp, 6) if n_imp else None,
        "n_users": int(len(user_counts)),
        "bounds": bounds,
        **adapter.notes,
    }
    # counts add up
    assert lines_read == accepted_lines + quarantine.total, report
    assert all(fc.lines == fc.accepted + fc.quarantined for fc in counts.values()), report
    assert accepted_events == n_events == sum(roles.values()), (accepted_events, n_events, roles)
    assert n_beh == roles["behavior_only"] + roles["both"], report
    assert n_imp == roles["impression_only"] + roles["both"], report

    meta = {"source": adapter.name, **bounds,
            "splits_ms": {"train": [bounds["history_end_ms"], bounds["valid_start_ms"]],
                          "valid": [bounds["valid_start_ms"], bounds["test_start_ms"]],
                          "test": [bounds["test_start_ms"], bounds["end_ms"]]},
            "src": str(adapter.src),
            "cross_features": list(adapter.cross),
            **adapter.meta}
    write_json(paths.stage("raw") / "meta.json", meta)
    return report


def _bar(enabled: bool, name: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc=f"ingest {name}", unit=" lines", unit_scale=True, mininterval=1.0)


def fetch_lines(path: Path, line_numbers: Sequence[int]) -> list[bytes]:
    """The raw text of some 1-based lines of a file (for quarantining rows found bad after parsing)."""
    want = {int(n): i for i, n in enumerate(line_numbers)}
    out: list[bytes] = [b""] * len(want)
    last = max(want) if want else 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n in want:
                out[want[n]] = raw
            if n >= last:
                break
    return out


def as_int(x: pd.Series | np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).round().astype(np.int64)

