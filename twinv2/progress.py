"""Progress bars of the stages (tqdm, as generate and train use), sane in logs.

On a terminal: the usual tqdm bar on stderr. Anywhere else (an Airflow task log, CI, a file): no
carriage-return animation; one plain line at most every TWINV2_PROGRESS_INTERVAL_S seconds (default 60),
plus the final line. Off with the stage's `progress: false` in params.yaml (e.g. validate.progress,
cluster.progress, evaluate.progress) or TWINV2_PROGRESS=0 for every stage.
"""
from __future__ import annotations

import os
import sys
from typing import IO, Any, Iterable

from tqdm.auto import tqdm


def _interval() -> float:
    try:
        return float(os.environ.get("TWINV2_PROGRESS_INTERVAL_S", 60))
    except ValueError:
        return 60.0


class _Lines:
    """A file for tqdm that turns each '\\r'-refresh into one line (for logs that are not a terminal)."""

    def __init__(self, f: IO[str]):
        self.f = f

    def write(self, s: str) -> int:
        s = s.replace("\r", "").rstrip("\n")
        if s.strip():
            self.f.write(s.rstrip() + "\n")
        return len(s)

    def flush(self) -> None:
        self.f.flush()


def enabled(section: dict | None) -> bool:
    if os.environ.get("TWINV2_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return bool((section or {}).get("progress", True))


def bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str, unit: str = "it",
        section: dict | None = None, file: IO[str] | None = None, **kw: Any) -> tqdm:
    """A tqdm bar for a stage; `section` is the stage's params section (its `progress` switch)."""
    f = file if file is not None else sys.stderr
    tty = bool(getattr(f, "isatty", lambda: False)())
    opts: dict[str, Any] = dict(total=total, desc=desc, unit=unit, disable=not enabled(section), leave=True)
    if tty:
        opts.update(dynamic_ncols=True, file=f)
    else:
        opts.update(file=_Lines(f), mininterval=_interval(), maxinterval=max(_interval(), 10.0) * 10,
                    ascii=True, ncols=100)
    opts.update(kw)
    return tqdm(iterable, **opts)
