"""Publishing an ingest as one atomic step, and repairing what a killed run left (docs/data.md, "All or
nothing").

A run writes everything into its work folder DIR/.ingest-work.@<host>@<pid>@<random>/raw/: the tables,
meta.json, and the run's own quarantine and report (raw/ingest/quarantine.parquet, raw/ingest/report.json).
DIR/quarantine/ingest.parquet and DIR/reports/ingest.json are relative symbolic links into DIR/raw/ingest/,
so the one step that switches raw/ publishes the data, its quarantine and its report together:
- DIR/raw absent: one rename;
- else one atomic exchange of the two directories (Linux renameat2 RENAME_EXCHANGE), after which the
  work folder holds the previous raw/ and is deleted;
- where the file system cannot exchange: the previous raw/ is renamed into the work folder (old-raw), the new
  one renamed in. A run killed between the two renames leaves no DIR/raw (never a mix); the next run puts
  the previous raw/ back (`clean_stale`).
The test hook TWINV2_INGEST_PAUSE_IN_PUBLISH=<file> makes a run write its pid into <file> inside the
publish window and wait there (for a test that kills it with SIGKILL); TWINV2_INGEST_NO_EXCHANGE=1 forces
the two-rename path.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import time
from pathlib import Path

from twinv2.io import _fsync_dir, owner_tag

WORK_PREFIX = ".ingest-work."      # DIR/.ingest-work.@<host>@<pid>@<random>/: what a run writes before the switch
INGEST_DIR = "ingest"              # raw/ingest/: the quarantine and the report of the ingest that wrote raw/
LINKS = {("quarantine", "ingest.parquet"): "quarantine.parquet", ("reports", "ingest.json"): "report.json"}
PAUSE_ENV = "TWINV2_INGEST_PAUSE_IN_PUBLISH"
NO_EXCHANGE_ENV = "TWINV2_INGEST_NO_EXCHANGE"
_RENAME_EXCHANGE = 2


def _pause(where: str) -> None:
    """The test hook: say we are inside the publish window, then wait to be killed."""
    marker = os.environ.get(PAUSE_ENV)
    if marker:
        Path(marker).write_text(f"{os.getpid()} {where}\n")
        time.sleep(float(os.environ.get("TWINV2_INGEST_PAUSE_S", 60)))


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (renameat2 RENAME_EXCHANGE). False where the platform or the file
    system cannot (the caller falls back to two renames)."""
    if os.environ.get(NO_EXCHANGE_ENV, "") not in ("", "0"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def link_published(out: Path) -> None:
    """DIR/quarantine/ingest.parquet and DIR/reports/ingest.json as relative links into DIR/raw/ingest/
    (each put in place by one rename; an earlier ingest's regular files are replaced)."""
    for (folder, name), target in LINKS.items():
        link = Path(out) / folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        want = os.path.join("..", "raw", INGEST_DIR, target)
        if link.is_symlink() and os.readlink(link) == want:
            continue
        tmp = link.with_name(f".{name}.{owner_tag()}link.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(want, tmp)
        os.replace(tmp, link)
        _fsync_dir(link.parent)


def publish(new_raw: Path, out: Path, work: Path) -> None:
    """Put the complete `new_raw` (with raw/ingest/) in place of DIR/raw in one step (module docstring)."""
    out = Path(out)
    link_published(out)
    dest = out / "raw"
    if not dest.exists():
        _pause("rename")
        os.replace(new_raw, dest)
    elif exchange(new_raw, dest):
        _pause("exchanged")               # the new raw/ is in place; the work folder holds the previous one
    else:
        old = work / "old-raw"
        os.replace(dest, old)
        try:
            _pause("between-renames")
            os.replace(new_raw, dest)
        except BaseException:
            os.replace(old, dest)
            raise
    _fsync_dir(out)


def clean_stale(out: Path) -> list[str]:
    """Repair what killed ingest runs left: remove their work folders (twinv2.io.is_stale: this user's, and
    the owner process named in the folder is gone). A run killed between the two renames of the fallback
    switch left DIR/raw missing and the previous raw/ in its work folder: that raw/ is put back first. The
    links to raw/ingest/ are (re)made where raw/ has one."""
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
    if (Path(out) / "raw" / INGEST_DIR).is_dir():
        link_published(Path(out))
    return removed
