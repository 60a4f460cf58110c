"""Reading and parsing the files of a real log: the line grammar, streaming blocks of checked lines.

Every line of an event file is matched against the format's grammar (`LineFormat.regex`, one RE2 regex
over a whole block, in C++); a line that does not match is diagnosed (`LineFormat.diagnose`) and
quarantined; the good lines are parsed by pyarrow.csv (`LineFormat.parse`). `Block` holds the parsed
good lines of one block, with helpers that quarantine rows found bad after parsing.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from twinv2.errors import DataError

if TYPE_CHECKING:
    from twinv2.data.adapters.quarantine import Quarantine

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


def plain(x) -> str:
    """A number as a user reads it: 1649412013, 3.5, 1e+30 (never a numpy repr such as np.float64(...))."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if v.is_integer() and abs(v) < 1e18:
        return str(int(v))
    return repr(v)


def shorten(text: str, n: int = 200) -> str:
    """Cut a text shown in a message (e.g. a header that holds a whole file) to n characters."""
    return text if len(text) <= n else text[:n] + f"... ({len(text):,} characters)"


def undecodable(text: str) -> bool:
    """Whether text decoded with errors="surrogateescape" held bytes that were not of its encoding."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def cr_only(first: bytes) -> bool:
    """Whether the first line read from a file (up to its first LF) holds CR line breaks and no LF: a file
    with classic Mac OS line endings, which reads as one line."""
    return bool(first) and not first.endswith(b"\n") and b"\r" in first.rstrip(b"\r")


def cr_only_error(path: Path, header: bool) -> DataError:
    what = "no data after the header: " if header else ""
    return DataError(f"{path}: {what}the file's lines end in CR alone (\\r, classic Mac OS line endings) and it "
                     f"holds no LF (\\n), so all of it reads as one line; expected lines ending in \\n or "
                     f"\\r\\n (convert it, e.g. `tr '\\r' '\\n'`)")


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
    labels: dict[str, str] | None = None     # name used here -> the column's name in the file (its header)

    def label(self, name: str) -> str:
        return (self.labels or {}).get(name, name)

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
            text, enc = raw.decode("utf-8"), None
        except UnicodeDecodeError as e:
            text, enc = raw.decode("utf-8", errors="surrogateescape"), f"{e.reason} at byte {e.start}"
        text = text.rstrip("\r\n")
        if not text.strip():
            return "empty_line", "empty line"
        if self.quoted:
            fields = next(csv.reader(io.StringIO(text), delimiter=self.delimiter), [])
        else:
            fields = text.split(self.delimiter)
        if len(fields) != len(self.names):
            if enc is not None:
                return "bad_encoding", f"not UTF-8 text ({enc})"
            return "field_count", (f"expected {len(self.names)} fields separated by {self.delimiter!r} "
                                   f"({', '.join(self.label(n) for n in self.names)}), got {len(fields)}")
        if enc is not None:     # a byte that is not UTF-8 in a field that is read; in an unused field it is fine
            bad = [n for n, v in zip(self.names, fields) if n in self.kinds and undecodable(v)]
            if bad:
                return "bad_encoding", f"field {self.label(bad[0])!r} is not UTF-8 text ({enc})"
        for name, value in zip(self.names, fields):
            k = self.kinds.get(name)
            name = self.label(name)
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
    if cr_only(raw):
        raise cr_only_error(path, True)
    try:
        text = raw.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError(f"{path}: line 1 (the header) is not UTF-8 text") from None
    return [c.strip() for c in text.split(delimiter)]


def require_columns(path: Path, names: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}: header lacks columns {missing}; found {shorten(repr(list(names)))}, "
                        f"expected at least {list(required)}")



@dataclass
class Block:
    """Parsed good lines of one block: the table, their raw text and their 1-based line numbers."""

    table: pa.Table
    raw: pa.BinaryArray
    lines: np.ndarray
    labels: dict[str, str] | None = None     # column name here -> its name in the file (for details)

    def label(self, name: str) -> str:
        return (self.labels or {}).get(name, name)

    def reject(self, mask: np.ndarray, quarantine: Quarantine, file: Path, reason: str, details) -> "Block":
        """Quarantine the rows in mask (details: one string or one per rejected row); keep the rest."""
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return self
        quarantine.add_many(file, self.lines[mask], self.raw.filter(pa.array(mask)), reason, details)
        keep = pa.array(~mask)
        return Block(self.table.filter(keep), self.raw.filter(keep), self.lines[~mask], self.labels)


    def reject_negative(self, columns: Sequence[str], quarantine: Quarantine, file: Path) -> "Block":
        """Quarantine rows with a negative id in any of `columns` (reason negative_id)."""
        b = self
        for c in columns:
            v = b.table.column(c).to_numpy(zero_copy_only=False)
            bad = v < 0
            if bad.any():
                b = b.reject(bad, quarantine, file, "negative_id",
                             [f"field {self.label(c)!r}: {plain(x)} is negative; ids must be >= 0" for x in v[bad]])
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
                           [f"field {self.label(column)!r}: {x:.0f} does not fit the 32-bit {target} (at most {INT32_MAX})"
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
                           [f"field {self.label(column)!r}: {plain(x)} ({unit}) is not a time in [1970-01-01, 2100-01-01), the "
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
        first = f.readline()
        if cr_only(first):
            raise cr_only_error(path, header)
        pending = [] if header or not first else [first]
        if header:
            if not first:
                raise DataError(f"{path}: file is empty; expected a header line")
            lineno, count.header = 1, 1
        fmt = make_format(first if header else None)
        pattern = fmt.regex()
        first_block = not header
        while True:
            lines = pending + f.readlines(chunk_bytes)
            pending = []
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
            yield Block(fmt.parse(good), good, nums[ok], fmt.labels)


def read_small_lines(path: Path, encoding: str, quarantine: Quarantine, count: FileCount,
                     header: bool) -> Iterator[tuple[int, str]]:
    """Lines of a small side file (items), decoded. A byte that is not of the encoding does not reject the
    line here: it is decoded with errors="surrogateescape" (`undecodable` tells), and the caller quarantines
    the line only when such a byte is in a field it reads (a title is not read)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if i == 1 and cr_only(raw):
                raise cr_only_error(path, header)
            if i == 1 and raw.startswith(BOM):          # a UTF-8 byte-order mark is not part of the line
                raw = raw[len(BOM):]
            if header and i == 1:
                count.header = 1
                continue
            count.lines += 1
            text = raw.decode(encoding, errors="surrogateescape").rstrip("\r\n")
            if not text.strip():
                quarantine.add(path, i, raw, "empty_line", "empty line")
                continue
            yield i, text


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

