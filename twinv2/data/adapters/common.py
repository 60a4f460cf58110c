"""What every real-log adapter shares: line-checked streaming, quarantine, the time split, the writer.

An adapter (kuairand.py, movielens.py, taobao.py) only says how its files look and how a parsed row
becomes a canonical *event*; this module does the rest in two passes, memory bounded:

pass 1  stream each event file in blocks of lines (`read_lines`). Every line is first matched against
        the format's line grammar (one RE2 regex over the whole block, in C++); lines that do not
        match are diagnosed one by one (bad encoding, empty line, wrong field count, empty field,
        not a number, an integer beyond int64, unknown value) and go to the quarantine with file,
        line number, raw text and reason. The good lines are parsed by pyarrow.csv, turned into
        events by the adapter (which may reject more rows: negative id, int32 overflow, a time
        outside the hard range, unknown item, out-of-range value), sorted by user and spilled to a
        temporary Parquet directory. Rows are counted per user and a sample of the times is kept.
between the plausible time range (`ts_window`: configured, else the robust range of the log itself) and,
        over the events inside it, the span and the split bounds (`split_bounds`).
pass 2  users are cut into ranges of at most `sort_budget_rows` events; each range is read back
        (row-group statistics skip most of the spill), sorted by (user, ts, line); events outside the
        time range and repeated events are quarantined (line text read back at the end), the rest
        written: behaviours through `BehaviorWriter`, impressions (ts >= history_end) with their split
        (global time slices, or per user: `assign_split_per_user`).
Everything is written into a work folder in DIR and switched in only when the run succeeded.

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
from twinv2.errors import ConfigError, DataError
from twinv2.io import _fsync_dir, atomic_path, write_json

# ---------------------------------------------------------------- line grammar

NUM = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
INT64 = r"-?0*(?:\d{1,18}|[0-8]\d{18})"      # every integer of at most 18 digits, and 19-digit ones < 9e18
KIND_RE = {"int": INT64, "num": NUM, "num?": f"(?:{NUM})?",
           "ids?": r'(?:"-?\d+(?:,-?\d+)*"|-?\d+)?'}    # a list of ids, quoted when it holds a comma
MAX_TEXT = 4096      # quarantined line text is cut to this many characters
BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark: ignored at the start of any file (header or not)
INT32_MAX = 2**31 - 1
# No behaviour log has events before 1970-01-01 or from 2100-01-01 on: outside this hard range a timestamp
# is never plausible (whatever the configured or robust range); it also keeps ms within int64.
HARD_TS_MS = (0, 4_102_444_800_000)


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
            elif k == "int" and not re.fullmatch(INT64, value) and re.fullmatch(r"-?\d+", value):
                return "overflow", (f"field {name!r}: {value[:80]} does not fit a 64-bit integer (expected at most "
                                    f"18 digits, or 19 below 9000000000000000000)")
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


    def reject_negative(self, columns: Sequence[str], quarantine: Quarantine, file: Path) -> "Block":
        """Quarantine rows with a negative id in any of `columns` (reason negative_id)."""
        b = self
        for c in columns:
            v = b.table.column(c).to_numpy(zero_copy_only=False)
            bad = v < 0
            if bad.any():
                b = b.reject(bad, quarantine, file, "negative_id",
                             [f"field {c!r}: {x} is negative; ids must be >= 0" for x in v[bad]])
        return b

    def reject_int32(self, column: str, values: np.ndarray, quarantine: Quarantine, file: Path,
                     target: str) -> "Block":
        """Quarantine rows whose `values` (of field `column`, one per row) do not fit the int32 `target`
        (reason overflow)."""
        v = np.asarray(values, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            bad = np.isfinite(v) & (np.abs(v) > INT32_MAX)
        if not bad.any():
            return self
        return self.reject(bad, quarantine, file, "overflow",
                           [f"field {column!r}: {x:.0f} does not fit the 32-bit {target} (at most {INT32_MAX})"
                            for x in v[bad]])

    def reject_bad_ts(self, column: str, ms: np.ndarray, quarantine: Quarantine, file: Path,
                      unit: str = "ms") -> "Block":
        """Quarantine rows whose time (`ms`, float, one per row, from field `column` in `unit`) is not
        finite or outside the hard range HARD_TS_MS (reason ts_out_of_range)."""
        ms = np.asarray(ms, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(ms) | (ms < HARD_TS_MS[0]) | (ms >= HARD_TS_MS[1])
        if not bad.any():
            return self
        raw = self.table.column(column).to_numpy(zero_copy_only=False)[bad]
        return self.reject(bad, quarantine, file, "ts_out_of_range",
                           [f"field {column!r}: {x!r} ({unit}) is not a time in [1970-01-01, 2100-01-01), the "
                            f"hard range of any log" for x in raw])


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
        first_block = not header
        while True:
            lines = f.readlines(chunk_bytes)
            if not lines:
                break
            if first_block and lines[0].startswith(BOM):     # a byte-order mark is not part of the first line
                lines[0] = lines[0][len(BOM):]
            first_block = False
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
            if i == 1 and raw.startswith(BOM):          # a UTF-8 byte-order mark is not part of the line
                raw = raw[len(BOM):]
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

SPLIT_MODES = ("global", "per_user")


def split_mode(params: dict) -> str:
    mode = params.get("split") or "global"
    if mode not in SPLIT_MODES:
        raise ConfigError(f"params ingest.split: expected one of {list(SPLIT_MODES)}, got {mode!r}")
    return mode


def split_bounds(t0: int, t1: int, params: dict) -> dict[str, int]:
    """Bounds (ms) of the time split over the log's span [t0, t1] (fractions of the whole span):
    history [t0, history_end) | train [history_end, valid_start) | valid [.., test_start) | test [.., t1].
    With `split: per_user` only history_start/history_end/end: train/valid/test are cut per user."""
    span = t1 - t0
    h = float(params.get("history_frac", 0.7))
    if split_mode(params) == "per_user":
        if not 0 < h < 1:
            raise ConfigError(f"params ingest.history_frac: expected a fraction in (0, 1), got {h}")
        return {"history_start_ms": int(t0), "history_end_ms": int(t0 + round(h * span)), "end_ms": int(t1)}
    v, t = (float(params.get(k, d)) for k, d in (("valid_frac", 0.1), ("test_frac", 0.1)))
    if min(h, v, t) <= 0 or h + v + t >= 1:
        raise ConfigError(f"params ingest: need history_frac, valid_frac, test_frac > 0 with a sum below 1 "
                         f"(the rest is train), got {h}, {v}, {t}")
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


def per_user_spec(params: dict) -> dict[str, int | float]:
    """params ingest.per_user {valid, test}: a float in (0, 1) is a fraction of each user's impression
    events from history_end on (rounded up), an int >= 0 a count of them (test >= 1)."""
    pu = params.get("per_user") or {}
    unknown = set(pu) - {"valid", "test"}
    if unknown:
        raise ConfigError(f"params ingest.per_user: unknown keys {sorted(unknown)}; expected valid, test")
    spec = {}
    for key in ("valid", "test"):
        v = pu.get(key, 0.1)
        ok = (isinstance(v, int) and not isinstance(v, bool) and v >= (1 if key == "test" else 0)) or \
             (isinstance(v, float) and 0 < v < 1)
        if not ok:
            raise ConfigError(f"params ingest.per_user.{key}: expected a fraction in (0, 1) or a count "
                             f"(an integer >= {1 if key == 'test' else 0}), got {v!r}")
        spec[key] = v
    return spec


def _take(spec: int | float, n: np.ndarray) -> np.ndarray:
    if isinstance(spec, int):
        return np.minimum(spec, n)
    return np.minimum(np.ceil(spec * n - 1e-9).astype(np.int64), n)


def assign_split_per_user(user: np.ndarray, spec: dict[str, int | float]) -> np.ndarray:
    """Per-user split of impression events sorted by (user, ts, line): each user's last `test` events are
    test, the `valid` before them valid, the earlier ones train (docs/data.md)."""
    n = len(user)
    out = np.full(n, "train", dtype=object)
    if n == 0:
        return out
    user = np.asarray(user)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    counts = np.diff(np.r_[starts, n])
    from_end = np.repeat(starts + counts, counts) - 1 - np.arange(n)
    n_test = _take(spec["test"], counts)
    n_valid = np.minimum(_take(spec["valid"], counts), counts - n_test)
    t, v = np.repeat(n_test, counts), np.repeat(n_valid, counts)
    out[from_end < t + v] = "valid"
    out[from_end < t] = "test"
    return out


# ---------------------------------------------------------------- plausible timestamps


class TsSketch:
    """Event times seen in pass 1, for the robust range: per block, at most `per_block` evenly spaced order
    statistics, each weighted by the rows it stands for (exact while blocks hold fewer events)."""

    def __init__(self, per_block: int = 4096):
        self.per_block = per_block
        self.values: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.n = 0

    def add(self, ts: np.ndarray) -> None:
        n = len(ts)
        if n == 0:
            return
        s = np.sort(np.asarray(ts, dtype=np.int64))
        if n > self.per_block:
            s = s[np.linspace(0, n - 1, self.per_block).round().astype(np.int64)]
        self.values.append(s)
        self.weights.append(np.full(len(s), n / len(s)))
        self.n += n

    def robust_range(self, q: float, margin: float, min_margin_ms: int) -> tuple[int, int, int, int] | None:
        """(lo, hi, q_lo, q_hi): [lo, hi) = [q_lo - m, q_hi + m] with q_lo / q_hi the times below / above
        which a share q of the events lie (at least one event each), m = max(margin * (q_hi - q_lo),
        min_margin_ms). None when there are too few events to tell (< 3)."""
        if self.n < 3:
            return None
        v, w = np.concatenate(self.values), np.concatenate(self.weights)
        o = np.argsort(v, kind="stable")
        v, cum = v[o], np.cumsum(w[o])
        k = max(1, int(np.ceil(q * self.n - 1e-9)))
        if self.n < 2 * k + 1:
            return None
        q_lo = int(v[min(np.searchsorted(cum, k + 1e-6, side="left"), len(v) - 1)])
        q_hi = int(v[min(np.searchsorted(cum, self.n - k - 1e-6, side="left"), len(v) - 1)])
        m = max(int(margin * (q_hi - q_lo)), int(min_margin_ms))
        return max(q_lo - m, HARD_TS_MS[0]), min(q_hi + m + 1, HARD_TS_MS[1]), q_lo, q_hi


def _iso(ms: int) -> str:
    return pd.Timestamp(int(ms), unit="ms", tz="UTC").strftime("%Y-%m-%d %H:%M:%S")


def ts_window(adapter: "Adapter", params: dict, sketch: TsSketch) -> dict:
    """The plausible event times [lo, hi) (ms): the adapter's or params' `ts_range_ms` when configured,
    else the robust range of the log itself (params ingest.ts_robust), always within HARD_TS_MS."""
    conf = adapter.ts_range if adapter.ts_range is not None else params.get("ts_range_ms")
    if conf is not None:
        lo, hi = int(conf[0]), int(conf[1])
        if not lo < hi:
            raise ConfigError(f"params ingest ts_range_ms: expected [lo, hi) with lo < hi, got {conf}")
        return {"source": "configured", "lo_ms": lo, "hi_ms": hi,
                "detail": f"ts outside [{_iso(lo)}, {_iso(hi)}) UTC, the configured range of the log (ts_range_ms)"}
    rp = params.get("ts_robust") or {}
    q, margin = float(rp.get("quantile", 0.01)), float(rp.get("margin", 1.0))
    min_margin = int(rp.get("min_margin_ms", 86_400_000))
    r = sketch.robust_range(q, margin, min_margin)
    if r is None:
        lo, hi = HARD_TS_MS
        return {"source": "hard", "lo_ms": lo, "hi_ms": hi,
                "detail": "ts outside [1970-01-01, 2100-01-01), the hard range of any log"}
    lo, hi, q_lo, q_hi = r
    return {"source": "robust", "lo_ms": lo, "hi_ms": hi, "quantile_lo_ms": q_lo, "quantile_hi_ms": q_hi,
            "detail": (f"ts outside [{_iso(lo)}, {_iso(hi)}) UTC, the robust range of the log itself (its "
                       f"{q:g} and {1 - q:g} quantiles {_iso(q_lo)} and {_iso(q_hi)} widened by {margin:g} x "
                       f"their distance, at least {min_margin} ms)")}


# ---------------------------------------------------------------- the adapter interface and driver


class Adapter:
    """One public log format. Subclasses fill `discover`, `read_items`, `event_files`, `to_events`."""

    name = "?"
    cross: tuple[str, ...] = ()            # optional behaviour cross features it fills (schema names)
    dup_key: tuple[str, ...] = ("user_id", "item_id", "ts")   # two event lines with this key are one event
    ts_range: tuple[int, int] | None = None                  # configured plausible [lo, hi) ms, if any

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
        """Last touch on one user range of accepted events, sorted by (user_id, ts, seq) (e.g. labels
        from later events)."""
        return ev

    def items_from_events(self) -> pd.DataFrame:
        """The item table of adapters without an item file, from the accepted events (after pass 2)."""
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


LINE_BITS = 40                     # seq = file index << 40 | line number
WORK_PREFIX = ".ingest-work."      # DIR/.ingest-work.@<host>@<pid>@<random>/: what a run writes before the switch


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


def clean_stale(out: Path) -> list[str]:
    """Remove the work folders of ingest runs that were killed (twinv2.io.is_stale: this user's, and the
    owner process named in the folder is gone). A run killed between the two renames of the switch left
    DIR/raw missing and the previous raw/ in its work folder: that raw/ is put back first."""
    from twinv2.io import is_stale

    removed = []
    for d in sorted(Path(out).glob(WORK_PREFIX + "*")):
        if not is_stale(d):
            continue
        raw = Path(out) / "raw"
        if not raw.exists() and (d / "old-raw").is_dir():
            os.replace(d / "old-raw", raw)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    return removed


def _switch_dir(new: Path, dest: Path, work: Path) -> None:
    """Put `new` in place of `dest` (two renames on one file system; a reader sees the old or the new
    directory, never a mix)."""
    if dest.exists():
        old = work / "old-raw"
        os.replace(dest, old)
        try:
            os.replace(new, dest)
        except BaseException:
            os.replace(old, dest)
            raise
    else:
        os.replace(new, dest)
    _fsync_dir(dest.parent)


def ingest(adapter: Adapter, out: Path, params: dict, progress: bool = False) -> dict:
    """Run an adapter: write out/raw/{items.parquet, behaviors/, impressions.parquet, meta.json},
    out/quarantine/ingest.parquet; return the report (the caller writes it).

    All-or-nothing: everything is written into DIR/.ingest-work.@<host>@<pid>@*/ first; only a run that succeeds
    replaces DIR/raw (a rename) and then DIR/quarantine/ingest.parquet. A failed run leaves the previous
    raw/ untouched (and its quarantine in DIR/quarantine/ingest.failed.parquet when it got that far)."""
    out = Path(out)
    split_mode(params)
    spec = per_user_spec(params) if split_mode(params) == "per_user" else None
    adapter.discover()
    out.mkdir(parents=True, exist_ok=True)
    stale = clean_stale(out)
    from twinv2.io import owner_tag

    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{owner_tag()}", dir=out))
    try:
        report = _ingest(adapter, out, work, params, spec, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if stale:
        report["stale_work_removed"] = stale
    return report


def _ingest(adapter: Adapter, out: Path, work: Path, params: dict, spec: dict | None, progress: bool) -> dict:
    paths = DatasetPaths(out)
    chunk_bytes = int(params.get("chunk_bytes", 32 << 20))
    budget = int(params.get("sort_budget_rows", 4_000_000))
    new_raw = work / "raw"
    spill = work / "spill"
    new_raw.mkdir()
    spill.mkdir()
    qpath = work / "ingest.parquet"
    quarantine = Quarantine(qpath)
    counts: dict[str, FileCount] = {}
    files = [p for p, _, _ in adapter.event_files()]

    def no_events(why: str) -> DataError:
        quarantine.close()
        failed = paths.quarantine / "ingest.failed.parquet"
        failed.parent.mkdir(parents=True, exist_ok=True)
        os.replace(qpath, failed)
        return DataError(f"{adapter.src}: no valid event line in {[str(p) for p in files]} ({why}); "
                         f"{quarantine.total} lines quarantined by reason {dict(sorted(quarantine.by_reason.items()))} "
                         f"(see {failed}); {paths.stage('raw')} is unchanged")

    try:
        items = adapter.read_items(quarantine, counts)
        if items is not None:
            items = adapter.after_events(items)
        user_counts = pd.Series(dtype=np.int64)
        n_events, n_part = 0, 0
        sketch = TsSketch()
        bar = _bar(progress, adapter.name)
        for fi, (path, header, make_format) in enumerate(adapter.event_files()):
            fc = counts.setdefault(str(path), FileCount())
            for block in read_lines(path, make_format, header, quarantine, fc, chunk_bytes):
                block, ev = adapter.to_events(block, path, quarantine)
                if bar is not None:
                    bar.update(len(block.lines))
                if len(ev) == 0:
                    continue
                ev["seq"] = (np.int64(fi) << LINE_BITS) + block.lines
                ev = ev.sort_values("user_id", kind="stable")
                pq.write_table(pa.Table.from_pandas(ev, preserve_index=False),
                               spill / f"part-{n_part:06d}.parquet", row_group_size=65_536)
                n_part += 1
                n_events += len(ev)
                vc = ev["user_id"].value_counts()
                user_counts = user_counts.add(vc, fill_value=0) if len(user_counts) else vc
                sketch.add(ev["ts"].to_numpy())
        if bar is not None:
            bar.close()
        if n_events == 0:
            raise no_events("every line was quarantined")

        # the plausible time range, then the split bounds over the events inside it
        window = ts_window(adapter, params, sketch)
        lo, hi = window["lo_ms"], window["hi_ms"]
        spill_ds = ds.dataset(str(spill), format="parquet")
        inside = (ds.field("ts") >= lo) & (ds.field("ts") < hi)
        t0 = t1 = None
        for batch in spill_ds.to_batches(columns=["ts"], filter=inside):
            if batch.num_rows:
                mm = pc.min_max(batch.column(0))
                a, b = mm["min"].as_py(), mm["max"].as_py()
                t0, t1 = (a, b) if t0 is None else (min(t0, a), max(t1, b))
        if t0 is None:
            raise no_events(f"no event time inside the plausible range: {window['detail']}")
        bounds = split_bounds(t0, t1, params)
        W = bounds["history_end_ms"]

        # pass 2: user ranges, sorted, cleaned (time range, duplicates), split, written
        deferred = _Deferred()
        roles = {"behavior_only": 0, "impression_only": 0, "both": 0, "unused": 0}
        by_split = {"train": 0, "valid": 0, "test": 0}
        seen = {s: [None, None] for s in by_split}
        th = {"test_impressions": 0, "test_no_history": 0, "test_no_history_before_watermark": 0,
              "test_users": 0, "test_users_no_history": 0, "test_users_no_history_before_watermark": 0}
        labels_pos, n_kept, n_users = 0, 0, 0
        beh_cols = ["user_id", "item_id", "ts", "play_ms", "duration_ms", *adapter.cross]
        key = list(adapter.dup_key)
        imp_writer = None
        with BehaviorWriter(new_raw / "behaviors") as bw:
            for ulo, uhi in _user_ranges(user_counts.sort_index().astype(np.int64), budget):
                t = spill_ds.to_table(filter=(ds.field("user_id") >= ulo) & (ds.field("user_id") <= uhi))
                ev = t.to_pandas().sort_values(["user_id", "ts", "seq"], kind="stable").reset_index(drop=True)
                ts = ev["ts"].to_numpy()
                bad = (ts < lo) | (ts >= hi)
                if bad.any():
                    deferred.add(ev["seq"].to_numpy()[bad], "ts_out_of_range",
                                 [f"{x} ms ({_iso(x) if HARD_TS_MS[0] <= x < HARD_TS_MS[1] else '?'}): "
                                  f"{window['detail']}" for x in ts[bad]])
                    ev = ev.loc[~bad].reset_index(drop=True)
                dup = ev.duplicated(key, keep="first").to_numpy()
                if dup.any():
                    first = ev.groupby(key, sort=False)["seq"].transform("first").to_numpy()[dup]
                    deferred.add(ev["seq"].to_numpy()[dup], "duplicate_event",
                                 [f"same {', '.join(key)} as line {int(s) & ((1 << LINE_BITS) - 1)} of "
                                  f"{files[int(s) >> LINE_BITS].name} (the first line is kept)" for s in first])
                    ev = ev.loc[~dup].reset_index(drop=True)
                if len(ev) == 0:
                    continue
                ev = adapter.finalize(ev, bounds)
                n_kept += len(ev)
                n_users += int(ev["user_id"].nunique())
                beh = ev["beh"].to_numpy(bool)
                imp = ev["imp"].to_numpy(bool) & (ev["ts"].to_numpy() >= W)
                roles["behavior_only"] += int((beh & ~imp).sum())
                roles["impression_only"] += int((~beh & imp).sum())
                roles["both"] += int((beh & imp).sum())
                roles["unused"] += int((~beh & ~imp).sum())
                bw.write(pa.Table.from_pandas(ev.loc[beh, beh_cols], preserve_index=False))
                im = ev.loc[imp, ["user_id", "item_id", "ts", "label"]].copy()
                im["split"] = (assign_split(im["ts"].to_numpy(), bounds) if spec is None
                               else assign_split_per_user(im["user_id"].to_numpy(), spec))
                for s, g in im.groupby("split")["ts"]:
                    by_split[s] += len(g)
                    a, b = int(g.min()), int(g.max())
                    seen[s] = [a, b] if seen[s][0] is None else [min(seen[s][0], a), max(seen[s][1], b)]
                _test_history(ev.loc[beh, ["user_id", "ts"]], im[im["split"] == "test"], W, th)
                labels_pos += int(im["label"].sum())
                tab = conform(pa.Table.from_pandas(im, preserve_index=False), "impressions")
                if imp_writer is None:
                    imp_writer = pq.ParquetWriter(new_raw / "impressions.parquet", tab.schema)
                imp_writer.write_table(tab)
            n_beh = bw.n_rows
        if imp_writer is None:
            from twinv2.data.schema import IMPRESSIONS_SCHEMA
            imp_writer = pq.ParquetWriter(new_raw / "impressions.parquet", IMPRESSIONS_SCHEMA)
        imp_writer.close()
        n_late = deferred.flush(quarantine, files)
        if items is None:
            items = adapter.after_events(adapter.items_from_events())
        items_tab = conform(pa.Table.from_pandas(items.reset_index(drop=True), preserve_index=False), "items")
        pq.write_table(items_tab, new_raw / "items.parquet")
        for f, fc in counts.items():
            fc.quarantined = quarantine.by_file.get(f, 0)
            fc.accepted = fc.lines - fc.quarantined

        n_imp = sum(by_split.values())
        lines_read = sum(fc.lines for fc in counts.values())
        accepted_lines = sum(fc.accepted for fc in counts.values())
        accepted_events = sum(counts[str(p)].accepted for p in files)
        mode = "global" if spec is None else "per_user"
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
            "n_users": n_users,
            "bounds": bounds,
            "ts_range": {k: v for k, v in window.items() if k != "detail"} | {"rule": window["detail"]},
            "split": mode,
            **({"per_user": spec} if spec is not None else {}),
            "test_no_history": th["test_no_history"],
            "test_history": th,
            **adapter.notes,
        }
        # counts add up
        assert lines_read == accepted_lines + quarantine.total, report
        assert all(fc.lines == fc.accepted + fc.quarantined for fc in counts.values()), report
        assert n_events - n_late == n_kept == accepted_events == sum(roles.values()), (n_events, n_late, n_kept,
                                                                                     accepted_events, roles)
        assert n_beh == roles["behavior_only"] + roles["both"], report
        assert n_imp == roles["impression_only"] + roles["both"], report
        assert th["test_impressions"] == by_split["test"], report

        meta = {"source": adapter.name, **bounds, "split": mode,
                "src": str(adapter.src),
                "cross_features": list(adapter.cross),
                "ts_range_ms": [lo, hi], "ts_range_source": window["source"],
                **adapter.meta}
        if spec is None:
            meta["splits_ms"] = {"train": [bounds["history_end_ms"], bounds["valid_start_ms"]],
                                 "valid": [bounds["valid_start_ms"], bounds["test_start_ms"]],
                                 "test": [bounds["test_start_ms"], bounds["end_ms"]]}
        else:
            meta["per_user_split"] = {
                **spec, "rule": "per user, over its impression events with ts >= history_end_ms: the last `test` "
                                "are test, the `valid` before them valid, the earlier ones train; behaviours "
                                "before history_end_ms are history only (docs/data.md)",
                "observed_ms": seen}
        write_json(new_raw / "meta.json", meta)
        quarantine.close()
        # the switch: raw/ first (one rename), then the quarantine that goes with it
        _switch_dir(new_raw, paths.stage("raw"), work)
        paths.quarantine.mkdir(parents=True, exist_ok=True)
        os.replace(qpath, paths.quarantine / "ingest.parquet")
        (paths.quarantine / "ingest.failed.parquet").unlink(missing_ok=True)
        _fsync_dir(paths.quarantine)
    except BaseException:
        quarantine.abort()
        raise
    return report


def _test_history(beh: pd.DataFrame, test: pd.DataFrame, W: int, th: dict) -> None:
    """Count test impressions (and users, at their first test impression) whose user has no behaviour
    strictly before the impression, and those whose user has none before the watermark W."""
    if len(test) == 0:
        return
    first = beh.groupby("user_id")["ts"].min()
    fb = test["user_id"].map(first).to_numpy(dtype=np.float64)       # NaN: no behaviour at all
    ts = test["ts"].to_numpy()
    with np.errstate(invalid="ignore"):
        none = ~(fb < ts)
        none_w = ~(fb < W)
    th["test_impressions"] += len(test)
    th["test_no_history"] += int(none.sum())
    th["test_no_history_before_watermark"] += int(none_w.sum())
    firsts = ~test["user_id"].duplicated(keep="first").to_numpy()    # sorted by (user, ts): the first one
    th["test_users"] += int(firsts.sum())
    th["test_users_no_history"] += int((none & firsts).sum())
    th["test_users_no_history_before_watermark"] += int((none_w & firsts).sum())


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

