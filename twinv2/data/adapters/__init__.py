"""Real-log adapters: map public logs into the canonical data model (docs/data.md).

`get_adapter(fmt, src, params)` -> an `Adapter`; `common.ingest(adapter, out, params)` runs it."""
from __future__ import annotations

from pathlib import Path

FORMATS = ("kuairand", "movielens", "taobao")


def get_adapter(fmt: str, src: str | Path, params: dict | None = None):
    params = params or {}
    if fmt == "kuairand":
        from twinv2.data.adapters.kuairand import KuaiRand as cls
    elif fmt == "movielens":
        from twinv2.data.adapters.movielens import MovieLens as cls
    elif fmt == "taobao":
        from twinv2.data.adapters.taobao import Taobao as cls
    else:
        raise ValueError(f"--format {fmt!r}: expected one of {list(FORMATS)}")
    return cls(Path(src), params)
