"""What every real-log adapter shares: line-checked streaming, quarantine, the time split, the writer.

An adapter (kuairand.py, movielens.py, taobao.py) only says how its files look and how a parsed row
becomes a canonical *event*; this module does the rest in two passes, memory bounded:

pass 1  stream each event file in blocks of lines (`read_lines`). Every line is first matched against
        the format's line grammar (one RE2 regex over the whole block, in C++); lines that do not
        match are diagnosed one by one (bad encoding, empty line, wrong field count, empty field,
        not a number, an integer beyond int64, unknown value) and go to the quarantine with file,
        line number, raw text and reason. The good lines are parsed by pyarrow.csv, turned into
        events by the adapter (which may reject more rows: negative id, int32 overflow, a time
        outside the hard range, unknown item, out-of-range value), sorted by user and spilled to a
        temporary Parquet directory. Rows are counted per user and a sample of the times is kept.
between the plausible time range (`ts_window`: configured, else the robust range of the log itself) and,
        over the events inside it, the span and the split bounds (`split_bounds`).
pass 2  users are cut into ranges of at most `sort_budget_rows` events; each range is read back
        (row-group statistics skip most of the spill), sorted by (user, ts, line); events outside the
        time range and repeated events are quarantined (line text read back at the end), the rest
        written: behaviours through `BehaviorWriter`, impressions (ts >= history_end) with their split
        (global time slices, or per user: `assign_split_per_user`).
Everything is written into a work folder in DIR and switched in only when the run succeeded.

Events carry three role columns besides the canonical fields: `beh` (is a behaviour), `imp` (may
become an impression when ts >= history_end) and `label`. The report's counts must add up: every
data line read is accepted or quarantined, and every accepted event line is a behaviour, an
impression, both, or unused (asserted in `ingest`).

The parts live in modules of their own: base.py (the Adapter interface), lines.py (reading and parsing),
quarantine.py, timesplit.py (the plausible time range and the split), publish.py (publishing in one step and
repairing killed runs); their public names are imported here too.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from twinv2.data.adapters.base import Adapter
from twinv2.data.adapters.lines import (BOM, HARD_TS_MS, INT32_MAX, INT64, KIND_RE, MAX_TEXT, NUM,  # noqa: F401
                                        Block, FileCount, LineFormat, as_int, fetch_lines, read_lines,
                                        read_small_lines, require_columns, split_header)
from twinv2.data.adapters.publish import INGEST_DIR, WORK_PREFIX, clean_stale, publish  # noqa: F401
from twinv2.data.adapters.quarantine import LINE_BITS, QUARANTINE_SCHEMA, Quarantine, _Deferred  # noqa: F401
from twinv2.data.adapters.timesplit import (SPLIT_MODES, TsSketch, _iso, _test_history,  # noqa: F401
                                            assign_split, assign_split_per_user, per_user_spec, split_bounds,
                                            required_splits, split_mode, ts_window, wrong_unit_detail)
from twinv2.data.schema import EVENT_KEY, DatasetPaths, conform, repeated_events
from twinv2.data.store import BehaviorWriter
from twinv2.errors import DataError
from twinv2.io import write_json

# ---------------------------------------------------------------- the driver


def _user_ranges(counts: pd.Series, budget: int) -> list[tuple[int, int]]:
    """Cut users (sorted ids with event counts) into [lo, hi] ranges of at most `budget` events
    (a single bigger user gets a range of its own)."""
    ids, c = counts.index.to_numpy(np.int64), counts.to_numpy(np.int64)
    out, start, acc = [], 0, 0
    for i in range(len(ids)):
        if acc and acc + c[i] > budget:
            out.append((int(ids[start]), int(ids[i - 1])))
            start, acc = i, 0
        acc += c[i]
    if len(ids):
        out.append((int(ids[start]), int(ids[-1])))
    return out


def ingest(adapter: Adapter, out: Path, params: dict, progress: bool = False) -> dict:
    """Run an adapter: write out/raw/{items.parquet, behaviors/, impressions.parquet, meta.json,
    ingest/quarantine.parquet, ingest/report.json} and the links out/quarantine/ingest.parquet,
    out/reports/ingest.json to the last two; return the report.

    All-or-nothing: everything is written into DIR/.ingest-work.@<host>@<pid>@*/ first; only a run that
    succeeds publishes it, in one step (publish.py). A failed run leaves the previous raw/ (with its quarantine
    and report) untouched; when it failed on bad data its quarantine is DIR/quarantine/ingest.failed.parquet
    (named by the error); any other failure removes an older ingest.failed.parquet, which would mislead."""
    out = Path(out)
    split_mode(params)
    spec = per_user_spec(params) if split_mode(params) == "per_user" else None
    failed = DatasetPaths(out).quarantine / "ingest.failed.parquet"
    wrote_failed = [False]
    try:
        adapter.discover()
        out.mkdir(parents=True, exist_ok=True)
        stale = clean_stale(out)
        from twinv2.io import owner_tag

        work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{owner_tag()}", dir=out))
        try:
            report = _ingest(adapter, out, work, params, spec, progress, wrote_failed)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        if not wrote_failed[0]:
            failed.unlink(missing_ok=True)
        raise
    if stale:
        report["stale_work_removed"] = stale
    return report


def summary(report: dict) -> str:
    """The one-line summary of an ingest report."""
    r = report["rows"]
    return (f"ingest {report['format']}: {report['lines_read']:,} lines read, {report['lines_quarantined']:,} "
            f"quarantined {report['quarantined'] or ''}; {r['items']:,} items, {r['behaviors']:,} behaviours, "
            f"{r['impressions']:,} impressions {r['impressions_by_split']} of {report['n_users']:,} users "
            f"({report['split']} split; {report['test_no_history']:,} of {r['impressions_by_split']['test']:,} "
            f"test impressions have no history) -> {report['out']}/raw")


def _no_data(files: list[Path], counts: dict[str, FileCount], what: str) -> str | None:
    """The message for files that hold no data line at all (empty, or a header only); None if some do."""
    fcs = [counts.get(str(f), FileCount()) for f in files]
    if any(fc.lines for fc in fcs):
        return None
    shown = ", ".join(str(f) for f in files)
    if all(fc.header for fc in fcs):
        return f"{shown}: no data after the header; expected {what}"
    return f"{shown}: the file is empty (no data line); expected {what}"


def _ingest(adapter: Adapter, out: Path, work: Path, params: dict, spec: dict | None, progress: bool,
            wrote_failed: list[bool]) -> dict:
    from twinv2 import progress as progress_bars

    paths = DatasetPaths(out)
    chunk_bytes = int(params.get("chunk_bytes", 32 << 20))
    budget = int(params.get("sort_budget_rows", 4_000_000))
    new_raw = work / "raw"
    spill = work / "spill"
    (new_raw / INGEST_DIR).mkdir(parents=True)
    spill.mkdir()
    qpath = new_raw / INGEST_DIR / "quarantine.parquet"
    quarantine = Quarantine(qpath)
    counts: dict[str, FileCount] = {}
    files = [p for p, _, _ in adapter.event_files()]
    bar = None

    def fail(message: str) -> DataError:
        """Bad data: this run's quarantine becomes DIR/quarantine/ingest.failed.parquet, named by the error."""
        quarantine.close()
        failed = paths.quarantine / "ingest.failed.parquet"
        failed.parent.mkdir(parents=True, exist_ok=True)
        os.replace(qpath, failed)
        wrote_failed[0] = True
        by = dict(sorted(quarantine.by_reason.items()))
        return DataError(f"{message}. {quarantine.total} lines quarantined"
                         + (f" by reason {by}" if by else "")
                         + f" (see {failed}); {paths.stage('raw')} is unchanged")

    try:
        items = adapter.read_items(quarantine, counts)
        if items is not None and len(items) == 0:
            msg = _no_data(adapter.item_files, counts, f"one line per {adapter.item_what}")
            raise fail(msg or f"{', '.join(map(str, adapter.item_files))}: no valid {adapter.item_what} line "
                              f"(every line was quarantined), so no event could be kept")
        if items is not None:
            items = adapter.after_events(items)
        user_counts = pd.Series(dtype=np.int64)
        n_events, n_part = 0, 0
        sketch = TsSketch()
        bar = progress_bars.bar(desc=f"ingest {adapter.name}", unit=" lines", unit_scale=True,
                                section={"progress": progress})
        for fi, (path, header, make_format) in enumerate(adapter.event_files()):
            fc = counts.setdefault(str(path), FileCount())
            for block in read_lines(path, make_format, header, quarantine, fc, chunk_bytes):
                block, ev = adapter.to_events(block, path, quarantine)
                bar.update(len(block.lines))
                if len(ev) == 0:
                    continue
                ev["seq"] = (np.int64(fi) << LINE_BITS) + block.lines
                ev = ev.sort_values("user_id", kind="stable")
                pq.write_table(pa.Table.from_pandas(ev, preserve_index=False),
                               spill / f"part-{n_part:06d}.parquet", row_group_size=65_536)
                n_part += 1
                n_events += len(ev)
                vc = ev["user_id"].value_counts()
                user_counts = user_counts.add(vc, fill_value=0) if len(user_counts) else vc
                sketch.add(ev["ts"].to_numpy())
        bar.close()
        if n_events == 0:
            msg = _no_data(files, counts, "one event per line")
            raise fail(msg or f"{adapter.src}: no valid event line in {[str(p) for p in files]} (every line "
                              f"was quarantined)")

        # the plausible time range, then the split bounds over the events inside it
        window = ts_window(adapter, params, sketch)
        lo, hi = window["lo_ms"], window["hi_ms"]
        ulo, uhi = window.get("unit_lo_ms", HARD_TS_MS[0]), window.get("unit_hi_ms", HARD_TS_MS[1])
        spill_ds = ds.dataset(str(spill), format="parquet")
        inside = (ds.field("ts") >= lo) & (ds.field("ts") < hi)
        t0 = t1 = None
        for batch in spill_ds.to_batches(columns=["ts"], filter=inside):
            if batch.num_rows:
                mm = pc.min_max(batch.column(0))
                a, b = mm["min"].as_py(), mm["max"].as_py()
                t0, t1 = (a, b) if t0 is None else (min(t0, a), max(t1, b))
        if t0 is None:
            raise fail(f"{adapter.src}: no valid event line in {[str(p) for p in files]} (no event time inside "
                       f"the plausible range: {window['detail']})")
        if t0 == t1:
            raise fail(f"{adapter.src}: the log spans zero time: every accepted event is at {_iso(t0)} UTC "
                       f"({t0} ms), so it cannot be split by time into history / train / valid / test; expected "
                       f"event times spread over the log's period (is the time field a constant?)")
        bounds = split_bounds(t0, t1, params)
        W = bounds["history_end_ms"]

        # pass 2: user ranges, sorted, cleaned (time range, duplicates), split, written
        deferred = _Deferred()
        roles = {"behavior_only": 0, "impression_only": 0, "both": 0, "unused": 0}
        by_split = {"train": 0, "valid": 0, "test": 0}
        seen = {s: [None, None] for s in by_split}
        th = {"test_impressions": 0, "test_no_history": 0, "test_no_history_before_watermark": 0,
              "test_users": 0, "test_users_no_history": 0, "test_users_no_history_before_watermark": 0}
        labels_pos, n_kept, n_users = 0, 0, 0
        key = list(adapter.dup_key)
        beh_cols = ["user_id", "item_id", "ts", "play_ms", "duration_ms", *adapter.cross,
                    *[c for c in key if c not in EVENT_KEY]]
        imp_writer = None
        with BehaviorWriter(new_raw / "behaviors") as bw:
            for ulo_u, uhi_u in _user_ranges(user_counts.sort_index().astype(np.int64), budget):
                t = spill_ds.to_table(filter=(ds.field("user_id") >= ulo_u) & (ds.field("user_id") <= uhi_u))
                ev = t.to_pandas().sort_values(["user_id", "ts", "seq"], kind="stable").reset_index(drop=True)
                ts = ev["ts"].to_numpy()
                unit = (ts < ulo) | (ts >= uhi)
                if unit.any():
                    deferred.add(ev["seq"].to_numpy()[unit], "ts_out_of_range",
                                 [wrong_unit_detail(adapter.ts_field, adapter.ts_unit_ms, int(x), window)
                                  for x in ts[unit]])
                bad = ((ts < lo) | (ts >= hi)) & ~unit
                if bad.any():
                    deferred.add(ev["seq"].to_numpy()[bad], "ts_out_of_range",
                                 [f"{x} ms ({_iso(x) if HARD_TS_MS[0] <= x < HARD_TS_MS[1] else '?'}): "
                                  f"{window['detail']}" for x in ts[bad]])
                if (bad | unit).any():
                    ev = ev.loc[~(bad | unit)].reset_index(drop=True)
                dup = repeated_events(ev, key)          # the same rule as validate's no_duplicate
                if dup.any():
                    first = ev.groupby(key, sort=False)["seq"].transform("first").to_numpy()[dup]
                    deferred.add(ev["seq"].to_numpy()[dup], "duplicate_event",
                                 [f"same {', '.join(key)} as line {int(s) & ((1 << LINE_BITS) - 1)} of "
                                  f"{files[int(s) >> LINE_BITS].name} (the first line is kept)" for s in first])
                    ev = ev.loc[~dup].reset_index(drop=True)
                if len(ev) == 0:
                    continue
                ev = adapter.finalize(ev, bounds)
                n_kept += len(ev)
                n_users += int(ev["user_id"].nunique())
                beh = ev["beh"].to_numpy(bool)
                imp = ev["imp"].to_numpy(bool) & (ev["ts"].to_numpy() >= W)
                roles["behavior_only"] += int((beh & ~imp).sum())
                roles["impression_only"] += int((~beh & imp).sum())
                roles["both"] += int((beh & imp).sum())
                roles["unused"] += int((~beh & ~imp).sum())
                bw.write(pa.Table.from_pandas(ev.loc[beh, beh_cols], preserve_index=False))
                im = ev.loc[imp, ["user_id", "item_id", "ts", "label"]].copy()
                im["split"] = (assign_split(im["ts"].to_numpy(), bounds) if spec is None
                               else assign_split_per_user(im["user_id"].to_numpy(), spec))
                for s, g in im.groupby("split")["ts"]:
                    by_split[s] += len(g)
                    a, b = int(g.min()), int(g.max())
                    seen[s] = [a, b] if seen[s][0] is None else [min(seen[s][0], a), max(seen[s][1], b)]
                _test_history(ev.loc[beh, ["user_id", "ts"]], im[im["split"] == "test"], W, th)
                labels_pos += int(im["label"].sum())
                tab = conform(pa.Table.from_pandas(im, preserve_index=False), "impressions")
                if imp_writer is None:
                    imp_writer = pq.ParquetWriter(new_raw / "impressions.parquet", tab.schema)
                imp_writer.write_table(tab)
            n_beh = bw.n_rows
        if imp_writer is None:
            from twinv2.data.schema import IMPRESSIONS_SCHEMA
            imp_writer = pq.ParquetWriter(new_raw / "impressions.parquet", IMPRESSIONS_SCHEMA)
        imp_writer.close()
        n_late = deferred.flush(quarantine, files)
        required = required_splits(params, spec)
        empty = [s for s, n in by_split.items() if n == 0 and s in required]
        if empty:
            edges = (f"history {_iso(bounds['history_start_ms'])} | train from {_iso(W)}"
                     + (f" | valid from {_iso(bounds['valid_start_ms'])} | test from {_iso(bounds['test_start_ms'])}"
                        if spec is None else " (then per user)") + f" .. {_iso(bounds['end_ms'])} UTC")
            raise fail(f"{adapter.src}: the time split leaves {' and '.join(empty)} without impressions "
                       f"(train {by_split['train']}, valid {by_split['valid']}, test {by_split['test']}; {edges}); "
                       f"expected impressions in every split: too few events, or their times bunched at one "
                       f"end of the log's span (check the time field and the quarantine)")
        if items is None:
            items = adapter.after_events(adapter.items_from_events())
        items_tab = conform(pa.Table.from_pandas(items.reset_index(drop=True), preserve_index=False), "items")
        pq.write_table(items_tab, new_raw / "items.parquet")
        for f, fc in counts.items():
            fc.quarantined = quarantine.by_file.get(f, 0)
            fc.accepted = fc.lines - fc.quarantined

        n_imp = sum(by_split.values())
        lines_read = sum(fc.lines for fc in counts.values())
        accepted_lines = sum(fc.accepted for fc in counts.values())
        accepted_events = sum(counts[str(p)].accepted for p in files)
        mode = "global" if spec is None else "per_user"
        report = {
            "format": adapter.name, "src": str(adapter.src), "out": str(out),
            "files": {f: vars(fc) for f, fc in counts.items()},
            "lines_read": lines_read,
            "lines_accepted": accepted_lines,
            "lines_quarantined": quarantine.total,
            "quarantined": dict(sorted(quarantine.by_reason.items())),
            "event_lines_accepted": accepted_events,
            "event_roles": roles,
            "rows": {"items": len(items_tab), "behaviors": n_beh, "impressions": n_imp,
                     "impressions_by_split": by_split},
            "positive_rate": round(labels_pos / n_imp, 6) if n_imp else None,
            "n_users": n_users,
            "bounds": bounds,
            "ts_range": {k: v for k, v in window.items() if k != "detail"} | {"rule": window["detail"]},
            "split": mode,
            **({"per_user": spec} if spec is not None else {}),
            "test_no_history": th["test_no_history"],
            "test_history": th,
            **adapter.notes,
        }
        report["summary"] = summary(report)
        # counts add up
        assert lines_read == accepted_lines + quarantine.total, report
        assert all(fc.lines == fc.accepted + fc.quarantined for fc in counts.values()), report
        assert n_events - n_late == n_kept == accepted_events == sum(roles.values()), (n_events, n_late, n_kept,
                                                                                     accepted_events, roles)
        assert n_beh == roles["behavior_only"] + roles["both"], report
        assert n_imp == roles["impression_only"] + roles["both"], report
        assert th["test_impressions"] == by_split["test"], report

        meta = {"source": adapter.name, **bounds, "split": mode,
                "src": str(adapter.src),
                "cross_features": list(adapter.cross),
                "event_key": key, "require_splits": [s for s in by_split if s in required],
                "ts_range_ms": [lo, hi], "ts_range_source": window["source"],
                **adapter.meta}
        if spec is None:
            meta["splits_ms"] = {"train": [bounds["history_end_ms"], bounds["valid_start_ms"]],
                                 "valid": [bounds["valid_start_ms"], bounds["test_start_ms"]],
                                 "test": [bounds["test_start_ms"], bounds["end_ms"]]}
        else:
            meta["per_user_split"] = {
                **spec, "rule": "per user, over its impression events with ts >= history_end_ms: the last `test` "
                                "are test, the `valid` before them valid, the earlier ones train; behaviours "
                                "before history_end_ms are history only (docs/data.md)",
                "observed_ms": seen}
        write_json(new_raw / "meta.json", meta)
        quarantine.close()
        write_json(new_raw / INGEST_DIR / "report.json", report)
        # the switch: raw/ with its quarantine and report, in one step; then an older failure's quarantine goes
        publish(new_raw, out, work)
        (paths.quarantine / "ingest.failed.parquet").unlink(missing_ok=True)
    except BaseException:
        if bar is not None:
            bar.close()                     # the error starts on a line of its own, not after the bar
        quarantine.abort()
        raise
    return report
