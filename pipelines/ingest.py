"""Stage `ingest`: a public log (KuaiRand, MovieLens, Taobao) -> DIR/raw in the canonical model.

Writes DIR/raw/{items.parquet, behaviors/, impressions.parquet, meta.json} and, inside it,
raw/ingest/quarantine.parquet (file, line, text, reason, detail of every rejected line) and
raw/ingest/report.json (lines read, rows per table, quarantined by reason; the counts add up; test
impressions without history), linked from DIR/quarantine/ingest.parquet and DIR/reports/ingest.json.
All-or-nothing: raw/ with its quarantine and report is published in one step; a failed run leaves the
previous DIR/raw untouched (twinv2/data/adapters/publish.py)."""
from __future__ import annotations

import time
from pathlib import Path


def run(fmt: str, src, out, params: dict | None = None, progress: bool = True) -> dict:
    from twinv2.config import load_params
    from twinv2.data.adapters import get_adapter
    from twinv2.data.adapters.common import ingest

    params = load_params() if params is None else params
    p = dict(params.get("ingest", {}) or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    report = ingest(get_adapter(fmt, src, p), out, p, progress=progress)
    # the time is shown, not stored: raw/ (with its report) is byte for byte the same for the same source
    report["seconds"] = round(time.perf_counter() - t, 3)
    report["summary"] += f" ({report['seconds']} s)"
    return report
