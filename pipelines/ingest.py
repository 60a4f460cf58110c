"""Stage `ingest`: a public log (KuaiRand, MovieLens, Taobao) -> DIR/raw in the canonical model.

Writes DIR/raw/{items.parquet, behaviors/, impressions.parquet, meta.json},
DIR/quarantine/ingest.parquet (file, line, text, reason, detail of every rejected line) and
DIR/reports/ingest.json (lines read, rows per table, quarantined by reason; the counts add up; test
impressions without history). All-or-nothing: a failed run leaves the previous DIR/raw untouched."""
from __future__ import annotations

import time
from pathlib import Path


def run(fmt: str, src, out, params: dict | None = None, progress: bool = True) -> dict:
    from twinv2.config import load_params
    from twinv2.data.adapters import get_adapter
    from twinv2.data.adapters.common import ingest
    from twinv2.data.schema import DatasetPaths
    from twinv2.io import write_json

    params = load_params() if params is None else params
    p = dict(params.get("ingest", {}) or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    report = ingest(get_adapter(fmt, src, p), out, p, progress=progress)
    report["seconds"] = round(time.perf_counter() - t, 3)
    r = report["rows"]
    report["summary"] = (
        f"ingest {fmt}: {report['lines_read']:,} lines read, {report['lines_quarantined']:,} quarantined "
        f"{report['quarantined'] or ''}; {r['items']:,} items, {r['behaviors']:,} behaviours, "
        f"{r['impressions']:,} impressions {r['impressions_by_split']} of {report['n_users']:,} users "
        f"({report['split']} split; {report['test_no_history']:,} of {r['impressions_by_split']['test']:,} test "
        f"impressions have no history) -> {out}/raw ({report['seconds']} s)")
    write_json(DatasetPaths(out).reports / "ingest.json", report)
    return report
