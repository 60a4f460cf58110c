"""Reading the raw tables with clear errors, and the table-level checks that need no rows.

Unreadable input (missing table, truncated Parquet, a CSV where Parquet was expected) raises
`DataError` with one paragraph naming the file and what was expected.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twinv2.data.schema import OPTIONAL_BEHAVIOR_COLUMNS, SCHEMAS
from twinv2.errors import DataError

META_KEYS = ("history_start_ms", "history_end_ms", "end_ms")


def _unreadable(path: Path, what: str, err: Exception) -> DataError:
    return DataError(f"{path}: cannot read the {what} as Parquet ({type(err).__name__}: {err}). Expected an "
                     f"intact Parquet file written by `twinv2 generate` or `twinv2 ingest`; the file may be "
                     f"truncated, still being written, or of another type. Regenerate or re-ingest it.")


def _missing(path: Path, what: str) -> DataError:
    siblings = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
    return DataError(f"{path}: the {what} is missing. Expected it inside {path.parent} (found there: "
                     f"{siblings or 'nothing'}); run `twinv2 generate` or `twinv2 ingest` first.")


def read_meta(path: Path) -> dict:
    if not path.is_file():
        raise _missing(path, "dataset metadata meta.json")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected the dataset metadata object with keys "
                        f"{list(META_KEYS)}.") from None
    missing = [k for k in META_KEYS if not isinstance(meta.get(k), int)] if isinstance(meta, dict) else META_KEYS
    if missing:
        raise DataError(f"{path}: dataset metadata lacks integer fields {list(missing)}; expected "
                        f"{{'source', 'history_start_ms', 'history_end_ms', 'end_ms', ...}} in ms since epoch.")
    if not meta["history_start_ms"] <= meta["history_end_ms"] <= meta["end_ms"]:
        raise DataError(f"{path}: expected history_start_ms <= history_end_ms <= end_ms, got "
                        f"{[meta[k] for k in META_KEYS]}.")
    if meta["history_start_ms"] == meta["end_ms"]:
        raise DataError(f"{path}: the dataset spans zero time (history_start_ms = end_ms = {meta['end_ms']}): "
                        f"every event has the same time, so there is no history / train / valid / test split; "
                        f"expected event times spread over the log's period.")
    return meta


def read_parquet_file(path: Path, what: str) -> pa.Table:
    """A whole single-file table (items, impressions)."""
    if not path.exists():
        raise _missing(path, what)
    if not path.is_file():
        raise DataError(f"{path}: is a directory; expected the {what} as one Parquet file.")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, what, e) from None


def behavior_parts(path: Path) -> list[tuple[Path, pq.ParquetFile]]:
    """Open every part file of the behaviours (footers only), so a broken file fails before any work."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise DataError(f"{path}: the behaviours directory is empty; expected part-*.parquet files "
                            f"sorted by (user_id, ts).")
    else:
        raise _missing(path, "behaviours table (a directory of part-*.parquet files)")
    out = []
    for f in files:
        try:
            out.append((f, pq.ParquetFile(f)))
        except (pa.ArrowException, OSError) as e:
            raise _unreadable(f, "behaviours part file", e) from None
    return out


def _type_ok(t: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_null(t):
        return True        # an all-null column: the not-null rules decide
    if pa.types.is_integer(want):
        return pa.types.is_integer(t)
    if pa.types.is_floating(want):
        return pa.types.is_floating(t) or pa.types.is_integer(t)
    if pa.types.is_string(want):
        if pa.types.is_dictionary(t):
            t = t.value_type
        return pa.types.is_string(t) or pa.types.is_large_string(t)
    return t == want


def schema_problems(schema: pa.Schema, table: str) -> list[str]:
    """What is wrong with a table's columns/dtypes; [] when it matches the canonical schema.

    Integer columns accept any integer width (conform casts them), float columns accept integers,
    string columns accept dictionary-encoded strings. Extra columns pass through untouched, except the
    known optional behaviour cross features, which must be numeric."""
    want = SCHEMAS[table]
    problems = []
    for f in want:
        if f.name not in schema.names:
            if table == "impressions" and f.name == "p_true":
                continue
            problems.append(f"column {f.name!r} is missing (expected {f.type})")
        elif not _type_ok(schema.field(f.name).type, f.type):
            problems.append(f"column {f.name!r} has dtype {schema.field(f.name).type}, expected {f.type}")
    if table == "behaviors":
        for name in OPTIONAL_BEHAVIOR_COLUMNS:
            if name in schema.names:
                t = schema.field(name).type
                if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
                        or pa.types.is_null(t)):
                    problems.append(f"cross feature {name!r} has dtype {t}, expected a number")
    return problems


def unsorted_users(user_id: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """User ids (sorted, unique) whose rows, taken in file order, have a ts decrease or are not contiguous."""
    if len(user_id) < 2:
        return np.zeros(0, dtype=np.int64)
    same = user_id[1:] == user_id[:-1]
    bad = np.unique(user_id[1:][same & (ts[1:] < ts[:-1])])
    back = user_id[1:] < user_id[:-1]        # a user order break: both sides are out of place
    if back.any():
        bad = np.union1d(bad, np.union1d(user_id[1:][back], user_id[:-1][back]))
    return bad.astype(np.int64)
