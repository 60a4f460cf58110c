"""The behaviour store: sharded Parquet written once, read back by user, never copied per sample.

Writing: `BehaviorWriter` appends whole users, in user order, to part-NNNNN.parquet files inside a
temporary directory that replaces the destination only when `close()` succeeds.

Reading: `iter_user_chunks` streams complete users (a user's rows are never split between chunks),
optionally only the users of one shard; `UserHistories` keeps a set of users in CSR form
(offsets + flat columns) so a sample's history is a slice `(user, position)`: the user's behaviours
with ts strictly before the sample's ts.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from twinv2.data.schema import conform

# ---------------------------------------------------------------- sharding

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def stable_hash(user_ids: np.ndarray | Sequence[int]) -> np.ndarray:
    """splitmix64 of the user id: the same on every machine, process and Python version."""
    x = np.asarray(user_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        x = x ^ (x >> np.uint64(31))
    return x


def run_starts(values: np.ndarray) -> np.ndarray:
    """Start index of each run of equal consecutive values (e.g. each user's rows in a user-sorted column)."""
    v = np.asarray(values)
    return np.flatnonzero(np.r_[True, v[1:] != v[:-1]]) if len(v) else np.zeros(0, np.int64)


def shard_of(user_ids: np.ndarray | Sequence[int], n_shards: int) -> np.ndarray:
    """Shard index in [0, n_shards) of each user id (stable hash)."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    return (stable_hash(user_ids) % np.uint64(n_shards)).astype(np.int64)


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N) with 0 <= I < N; None -> None."""
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (for example 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: need 0 <= I < N")
    return i, n


# ---------------------------------------------------------------- writing


class BehaviorWriter:
    """Write behaviours (sorted by user_id, ts; whole users per call) into part files, atomically."""

    def __init__(self, dest: str | Path, rows_per_file: int = 2_000_000):
        self.dest = Path(dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        from twinv2.io import make_temp_dir

        self._tmp = make_temp_dir(self.dest)   # owner in the name (stale ones are swept), umask permissions
        self.rows_per_file = rows_per_file
        self._buf: list[pa.Table] = []
        self._buf_rows = 0
        self._n_files = 0
        self.n_rows = 0
        self._last_user: int | None = None

    def write(self, table: pa.Table | pd.DataFrame) -> None:
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        table = conform(table, "behaviors")
        if len(table) == 0:
            return
        users = table.column("user_id").to_numpy()
        if self._last_user is not None and users[0] < self._last_user:
            raise ValueError("BehaviorWriter.write: users must arrive in increasing user_id order "
                             f"(got user {users[0]} after user {self._last_user})")
        if not _sorted_df(pd.DataFrame({"user_id": users, "ts": table.column("ts").to_numpy()})):
            raise ValueError("BehaviorWriter.write: rows must be sorted by (user_id, ts)")
        # a file ends only between users, so a user never spans two part files
        if self._buf_rows >= self.rows_per_file and users[0] != self._last_user:
            self._flush()
        self._last_user = int(users[-1])
        self._buf.append(table)
        self._buf_rows += len(table)
        self.n_rows += len(table)

    def _flush(self) -> None:
        if not self._buf:
            return
        table = pa.concat_tables(self._buf)
        pq.write_table(table, self._tmp / f"part-{self._n_files:05d}.parquet", row_group_size=256_000)
        self._n_files += 1
        self._buf, self._buf_rows = [], 0

    def close(self) -> None:
        self._flush()
        if self._n_files == 0:   # keep the schema even for an empty table
            pq.write_table(conform(_empty("behaviors"), "behaviors"), self._tmp / "part-00000.parquet")
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old.{os.getpid()}")
            os.replace(self.dest, old)
            os.replace(self._tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self._tmp, self.dest)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "BehaviorWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _empty(name: str) -> pa.Table:
    from twinv2.data.schema import SCHEMAS

    return SCHEMAS[name].empty_table()


# ---------------------------------------------------------------- reading


def behavior_files(path: str | Path) -> list[Path]:
    """The Parquet files of a behaviours table: one file, or a directory of part files (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if not f.name.startswith("."))
        if files:
            return files
        raise FileNotFoundError(f"{p}: directory holds no .parquet files; expected behaviour part files")
    raise FileNotFoundError(f"{p}: no such behaviours table; expected a Parquet file or a directory of them")


def open_behaviors(path: str | Path) -> ds.Dataset:
    """The behaviours as a pyarrow dataset (for scans and filters)."""
    return ds.dataset([str(f) for f in behavior_files(path)], format="parquet")


def iter_user_chunks(path: str | Path, columns: Sequence[str] | None = None,
                     shard: tuple[int, int] | None = None, batch_rows: int = 1_000_000,
                     users: np.ndarray | None = None) -> Iterator[pa.Table]:
    """Stream the behaviours as tables of complete users, in file order.

    Memory is bounded by batch_rows plus the largest single user. `shard=(i, n)` keeps only the users
    whose stable hash falls in shard i of n; `users` keeps only those user ids."""
    cols = None if columns is None else list(dict.fromkeys(["user_id", *columns]))
    carry: pa.Table | None = None
    keep_users = None if users is None else np.unique(np.asarray(users, dtype=np.int64))
    for f in behavior_files(path):
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            t = pa.Table.from_batches([batch])
            if carry is not None:
                t = pa.concat_tables([carry, t])
                carry = None
            if len(t) == 0:
                continue
            uid = t.column("user_id").to_numpy()
            last = uid[-1]
            cut = int(np.searchsorted(uid, last, side="left")) if _is_sorted(uid) else len(t)
            carry = t.slice(cut)
            done = t.slice(0, cut)
            out = _filter(done, shard, keep_users)
            if out is not None and len(out):
                yield out
        # users never span files: flush at each file end
        if carry is not None and len(carry):
            out = _filter(carry, shard, keep_users)
            carry = None
            if out is not None and len(out):
                yield out
        carry = None


def _is_sorted(a: np.ndarray) -> bool:
    return bool(len(a) < 2 or np.all(a[1:] >= a[:-1]))


def _filter(t: pa.Table, shard: tuple[int, int] | None, keep_users: np.ndarray | None) -> pa.Table | None:
    if shard is None and keep_users is None:
        return t
    uid = t.column("user_id").to_numpy()
    mask = np.ones(len(uid), dtype=bool)
    if shard is not None:
        mask &= shard_of(uid, shard[1]) == shard[0]
    if keep_users is not None:
        mask &= np.isin(uid, keep_users)
    return t.filter(pa.array(mask))


# ---------------------------------------------------------------- histories by (user, position)


@dataclass
class UserHistories:
    """Users' histories in CSR form: user u's behaviours are rows offsets[u]:offsets[u+1] of `cols`.

    Nothing is copied per sample: a sample is (user index, position) and its history is the prefix
    [offsets[u], offsets[u] + position) -- the behaviours strictly before the sample's ts."""

    user_ids: np.ndarray              # (U,) int64, sorted
    offsets: np.ndarray               # (U+1,) int64
    cols: dict[str, np.ndarray]       # each (N,), N = offsets[-1]

    @classmethod
    def from_table(cls, table: pa.Table | pd.DataFrame) -> "UserHistories":
        df = table.to_pandas() if isinstance(table, pa.Table) else table
        df = df.sort_values(["user_id", "ts"], kind="stable") if not _sorted_df(df) else df
        uid = df["user_id"].to_numpy(np.int64)
        users, starts = np.unique(uid, return_index=True)
        offsets = np.append(starts, len(uid)).astype(np.int64)
        cols = {c: df[c].to_numpy() for c in df.columns if c != "user_id"}
        return cls(users, offsets, cols)

    @classmethod
    def load(cls, path: str | Path, columns: Sequence[str] | None = None,
             shard: tuple[int, int] | None = None, users: np.ndarray | None = None) -> "UserHistories":
        chunks = list(iter_user_chunks(path, columns=columns, shard=shard, users=users))
        if not chunks:
            cols = ["user_id", *(columns or ["item_id", "ts", "play_ms", "duration_ms"])]
            return cls.from_table(pd.DataFrame({c: np.zeros(0, np.int64) for c in dict.fromkeys(cols)}))
        return cls.from_table(pa.concat_tables(chunks))

    def __len__(self) -> int:
        return len(self.user_ids)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def index_of(self, user_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Row index of each user id; -1 for a user without history."""
        u = np.asarray(user_ids, dtype=np.int64)
        idx = np.searchsorted(self.user_ids, u)
        idx = np.clip(idx, 0, max(len(self.user_ids) - 1, 0))
        ok = (len(self.user_ids) > 0) & (self.user_ids[idx] == u) if len(self.user_ids) else np.zeros(len(u), bool)
        return np.where(ok, idx, -1)

    def positions(self, user_ids: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(user index, position) of samples: position = number of the user's behaviours with ts < sample ts."""
        uidx = self.index_of(user_ids)
        ts = np.asarray(ts, dtype=np.int64)
        pos = np.zeros(len(uidx), dtype=np.int64)
        bts = self.cols["ts"]
        order = np.argsort(uidx, kind="stable")                              # samples grouped by user
        su = uidx[order]
        starts = run_starts(su)
        for a, b in zip(starts, np.r_[starts[1:], len(su)].astype(np.int64)):   # one search per user
            i = int(su[a])
            if i >= 0:
                sel = order[a:b]
                pos[sel] = np.searchsorted(bts[self.offsets[i]:self.offsets[i + 1]], ts[sel], side="left")
        return uidx, pos

    def history(self, uidx: int, pos: int, last: int | None = None,
                columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The history of sample (uidx, pos) as views: its behaviours with ts before the sample,
        only the most recent `last` of them if given."""
        if uidx < 0:
            return {c: self.cols[c][:0] for c in (columns or self.cols)}
        lo = int(self.offsets[uidx])
        hi = lo + int(pos)
        if last is not None:
            lo = max(lo, hi - int(last))
        return {c: self.cols[c][lo:hi] for c in (columns or self.cols)}


def _sorted_df(df: pd.DataFrame) -> bool:
    if len(df) < 2:
        return True
    u = df["user_id"].to_numpy()
    t = df["ts"].to_numpy() if "ts" in df else np.zeros(len(u))
    du = np.diff(u)
    return bool(np.all((du > 0) | ((du == 0) & (np.diff(t) >= 0))))


def read_table(path: str | Path, name: str) -> pa.Table:
    """Read items/impressions (one Parquet file) or behaviours (file or directory), with a clear error."""
    p = Path(path)
    try:
        if name == "behaviors":
            return open_behaviors(p).to_table()
        return pq.read_table(p)
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{p}: cannot read the {name} table as Parquet ({e}); "
                         f"expected a Parquet file written by twinv2 or an adapter") from None


def write_table(path: str | Path, table: pa.Table | pd.DataFrame, name: str) -> None:
    """Write items or impressions atomically in canonical dtypes."""
    from twinv2.io import write_parquet

    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    write_parquet(path, conform(table, name))
