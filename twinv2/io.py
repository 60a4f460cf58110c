"""Atomic writes: a reader never sees a half-written file, a crash never leaves one behind for long.

Temporary files and directories are created beside their destination, named
`.<dest name>.@<host>@<pid>@<random>.tmp` (the owner in the name), with the permissions an ordinary
`open()`/`mkdir()` would give under the process umask (tempfile's own 0600/0700 would hide the outputs
from another user, e.g. an Airflow worker). A killed run leaves its temporaries behind: the next
`make_temp_file`/`make_temp_dir` in the same directory removes the stale ones this user owns (owner
process gone on this host, or, when the owner is unknown or on another host, untouched for
TWINV2_TMP_MAX_AGE_S seconds, default one day). A live run's temporaries are never removed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

# ---------------------------------------------------------------- ownership, umask, stale temporaries

_OWNER = re.compile(r"@(?P<host>[A-Za-z0-9._-]+)@(?P<pid>\d+)@")
_LOCK = threading.Lock()
_SWEPT: set[tuple[int, str]] = set()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname() or "localhost")[:64]


def owner_tag() -> str:
    """`@<host>@<pid>@`: put into a temporary name, it says which process owns it."""
    return f"@{_host()}@{os.getpid()}@"


def process_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), else swapped and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def max_tmp_age_s() -> float:
    try:
        return float(os.environ.get("TWINV2_TMP_MAX_AGE_S", 86_400))
    except ValueError:
        return 86_400.0


def _process_start(pid: int) -> float | None:
    """Start time (s since the epoch) of a live process on Linux, else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(pid: int, created: float) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                          # alive, another user's
    start = _process_start(pid)
    return start is None or start <= created + 1.0     # started after the temporary: a reused pid


def _newest_mtime(path: Path, st: os.stat_result) -> float:
    newest = st.st_mtime
    if path.is_dir() and not path.is_symlink():
        try:
            with os.scandir(path) as it:
                for e in it:
                    try:
                        newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
                    except OSError:
                        pass
        except OSError:
            pass
    return newest


def is_stale(path: Path, max_age_s: float | None = None, now: float | None = None) -> bool:
    """Whether a temporary left by some run may be removed: owned by this user, and its owner process is
    gone (same host), or (owner unknown or on another host) nothing in it changed for max_age_s."""
    try:
        st = path.lstat()
    except OSError:
        return False
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return False
    m = _OWNER.search(path.name)
    if m and m["host"] == _host():
        return not _owner_alive(int(m["pid"]), min(st.st_ctime, st.st_mtime))
    age = (time.time() if now is None else now) - _newest_mtime(path, st)
    return age > (max_tmp_age_s() if max_age_s is None else max_age_s)


_TEMP_NAME = re.compile(r"^\..+\.(?:(?:old|invalid)\.@[^@/]+@\d+@|@[^@/]+@\d+@[a-z0-9_]{8}|[a-z0-9_]{8})\.tmp$")


def _ours(name: str) -> bool:
    """Names of the temporaries this module creates (and, with no owner in the name, tempfile's
    `.<name>.<8 random>.tmp` that it created before): nothing else in the directory is touched."""
    return bool(_TEMP_NAME.match(name))


def sweep_stale(parent: str | Path, match: Callable[[str], bool] = _ours,
                max_age_s: float | None = None) -> list[Path]:
    """Remove the stale temporaries (see is_stale) among the entries of parent that `match`. Returns them."""
    parent = Path(parent)
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        if not match(e.name):
            continue
        p = Path(e.path)
        if ".old.@" in p.name and not (parent / p.name[1:].split(".old.@")[0]).exists():
            continue        # the previous version, its replacement never renamed into place: keep it
        if not is_stale(p, max_age_s):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass            # a concurrent sweep was first
        except OSError:
            pass
    return removed


def _sweep_once(parent: Path) -> None:
    key = (os.getpid(), str(parent.resolve()))
    if key in _SWEPT:
        return
    _SWEPT.add(key)
    sweep_stale(parent)


def make_temp_file(dest: str | Path) -> Path:
    """An empty temporary file beside dest (owner in the name, mode 0666 & ~umask)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{owner_tag()}", suffix=".tmp", dir=dest.parent)
    try:
        os.fchmod(fd, 0o666 & ~process_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def make_temp_dir(dest: str | Path) -> Path:
    """An empty temporary directory beside dest (owner in the name, mode 0777 & ~umask)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{owner_tag()}", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~process_umask())
    return tmp


def make_system_temp_dir(prefix: str) -> Path:
    """A directory in the system temp folder named prefix + owner + random, mode 0777 & ~umask; the stale
    ones of earlier runs with the same prefix are removed first."""
    root = Path(tempfile.gettempdir())
    sweep_stale(root, match=lambda n: n.startswith(prefix))
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}", dir=root))
    os.chmod(tmp, 0o777 & ~process_umask())
    return tmp


# ---------------------------------------------------------------- atomic writes

import pyarrow as pa
import pyarrow.parquet as pq


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; rename it onto `dest` only if the block succeeds."""
    dest = Path(dest)
    tmp_path = make_temp_file(dest)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; it replaces `dest` (whole) only if the block succeeds."""
    dest = Path(dest)
    tmp = make_temp_dir(dest)
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old.{owner_tag()}.tmp")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_parquet(path: str | Path, table: pa.Table, **kwargs: Any) -> None:
    """Write one Parquet file atomically (deterministic bytes for the same table)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
