"""Publishing an ingest: the work folder of a run, switching its raw/ in, and cleaning up after runs
that were killed (docs/data.md, "All or nothing")."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from twinv2.io import _fsync_dir

WORK_PREFIX = ".ingest-work."      # DIR/.ingest-work.@<host>@<pid>@<random>/: what a run writes before the switch


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

