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

The parts live in modules of their own: lines.py (reading and parsing), quarantine.py, timesplit.py (the
plausible time range and the split), publish.py (the work folder and the switch); their public names are
imported here too.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from twinv2.data.adapters.lines import (BOM, HARD_TS_MS, INT32_MAX, INT64, KIND_RE, MAX_TEXT, NUM,  # noqa: F401
                                        Block, FileCount, LineFormat, as_int, fetch_lines, read_lines,
                                        read_small_lines, require_columns, split_header)
from twinv2.data.adapters.publish import WORK_PREFIX, _switch_dir, clean_stale  # noqa: F401
from twinv2.data.adapters.quarantine import LINE_BITS, QUARANTINE_SCHEMA, Quarantine, _Deferred  # noqa: F401
from twinv2.data.adapters.timesplit import (SPLIT_MODES, TsSketch, _iso, _test_history,  # noqa: F401
                                            assign_split, assign_split_per_user, per_user_spec, split_bounds,
                                            split_mode, ts_window)
from twinv2.data.schema import DatasetPaths, conform
from twinv2.data.store import BehaviorWriter
from twinv2.errors import DataError
from twinv2.io import _fsync_dir, write_json

# ---------------------------------------------------------------- the adapter interface and driver


class Adapter:
    """One public log format. Subclasses fill `discover`, `read_items`, `event_files`, `to_events`."""

    name = "?"
    cross: tuple[str, ...] = ()            # optional behaviour cross features it fills (schema names)
    dup_key: tuple[str, ...] = ("user_id", "item_id", "ts")   # two event lines with this key are one event
    ts_range: tuple[int, int] | None = None                  # configured plausible [lo, hi) ms, if any

    def __init__(self, src: Path, params: dict):
        self.src = Path(src)
        self.params = params
        self.meta: dict = {}                # extra meta.json entries
        self.notes: dict = {}               # extra report entries

    def discover(self) -> None: ...

    def read_items(self, quarantine: Quarantine, counts: dict[str, FileCount]) -> pd.DataFrame | None:
        """The item table from side files (None: built from the events by `items_from_events`)."""
        return None

    def event_files(self) -> list[tuple[Path, bool, Callable[[bytes | None], LineFormat]]]:
        raise NotImplementedError

    def to_events(self, block: Block, file: Path, quarantine: Quarantine) -> tuple[Block, pd.DataFrame]:
        """Parsed lines -> (the block minus rejected rows, events with user_id, item_id, ts, play_ms,
        duration_ms, cross..., beh, imp, label), one event per remaining row, same order."""
        raise NotImplementedError

    def finalize(self, ev: pd.DataFrame, bounds: dict[str, int]) -> pd.DataFrame:
        """Last touch on one user range of accepted events, sorted by (user_id, ts, seq) (e.g. labels
        from later events)."""
        return ev

    def items_from_events(self) -> pd.DataFrame:
        """The item table of adapters without an item file, from the accepted events (after pass 2)."""
        raise NotImplementedError

    def after_events(self, items: pd.DataFrame) -> pd.DataFrame:
        return items


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
    """Run an adapter: write out/raw/{items.parquet, behaviors/, impressions.parquet, meta.json},
    out/quarantine/ingest.parquet; return the report (the caller writes it).

    All-or-nothing: everything is written into DIR/.ingest-work.@<host>@<pid>@*/ first; only a run that succeeds
    replaces DIR/raw (a rename) and then DIR/quarantine/ingest.parquet. A failed run leaves the previous
    raw/ untouched (and its quarantine in DIR/quarantine/ingest.failed.parquet when it got that far)."""
    out = Path(out)
    split_mode(params)
    spec = per_user_spec(params) if split_mode(params) == "per_user" else None
    adapter.discover()
    out.mkdir(parents=True, exist_ok=True)
    stale = clean_stale(out)
    from twinv2.io import owner_tag

    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{owner_tag()}", dir=out))
    try:
        report = _ingest(adapter, out, work, params, spec, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if stale:
        report["stale_work_removed"] = stale
    return report


def _ingest(adapter: Adapter, out: Path, work: Path, params: dict, spec: dict | None, progress: bool) -> dict:
    paths = DatasetPaths(out)
    chunk_bytes = int(params.get("chunk_bytes", 32 << 20))
    budget = int(params.get("sort_budget_rows", 4_000_000))
    new_raw = work / "raw"
    spill = work / "spill"
    new_raw.mkdir()
    spill.mkdir()
    qpath = work / "ingest.parquet"
    quarantine = Quarantine(qpath)
    counts: dict[str, FileCount] = {}
    files = [p for p, _, _ in adapter.event_files()]

    def no_events(why: str) -> DataError:
        quarantine.close()
        failed = paths.quarantine / "ingest.failed.parquet"
        failed.parent.mkdir(parents=True, exist_ok=True)
        os.replace(qpath, failed)
        return DataError(f"{adapter.src}: no valid event line in {[str(p) for p in files]} ({why}); "
                         f"{quarantine.total} lines quarantined by reason {dict(sorted(quarantine.by_reason.items()))} "
                         f"(see {failed}); {paths.stage('raw')} is unchanged")

    try:
        items = adapter.read_items(quarantine, counts)
        if items is not None:
            items = adapter.after_events(items)
        user_counts = pd.Series(dtype=np.int64)
        n_events, n_part = 0, 0
        sketch = TsSketch()
        bar = _bar(progress, adapter.name)
        for fi, (path, header, make_format) in enumerate(adapter.event_files()):
            fc = counts.setdefault(str(path), FileCount())
            for block in read_lines(path, make_format, header, quarantine, fc, chunk_bytes):
                block, ev = adapter.to_events(block, path, quarantine)
                if bar is not None:
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
        if bar is not None:
            bar.close()
        if n_events == 0:
            raise no_events("every line was quarantined")

        # the plausible time range, then the split bounds over the events inside it
        window = ts_window(adapter, params, sketch)
        lo, hi = window["lo_ms"], window["hi_ms"]
        spill_ds = ds.dataset(str(spill), format="parquet")
        inside = (ds.field("ts") >= lo) & (ds.field("ts") < hi)
        t0 = t1 = None
        for batch in spill_ds.to_batches(columns=["ts"], filter=inside):
            if batch.num_rows:
                mm = pc.min_max(batch.column(0))
                a, b = mm["min"].as_py(), mm["max"].as_py()
                t0, t1 = (a, b) if t0 is None else (min(t0, a), max(t1, b))
        if t0 is None:
            raise no_events(f"no event time inside the plausible range: {window['detail']}")
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
        beh_cols = ["user_id", "item_id", "ts", "play_ms", "duration_ms", *adapter.cross]
        key = list(adapter.dup_key)
        imp_writer = None
        with BehaviorWriter(new_raw / "behaviors") as bw:
            for ulo, uhi in _user_ranges(user_counts.sort_index().astype(np.int64), budget):
                t = spill_ds.to_table(filter=(ds.field("user_id") >= ulo) & (ds.field("user_id") <= uhi))
                ev = t.to_pandas().sort_values(["user_id", "ts", "seq"], kind="stable").reset_index(drop=True)
                ts = ev["ts"].to_numpy()
                bad = (ts < lo) | (ts >= hi)
                if bad.any():
                    deferred.add(ev["seq"].to_numpy()[bad], "ts_out_of_range",
                                 [f"{x} ms ({_iso(x) if HARD_TS_MS[0] <= x < HARD_TS_MS[1] else '?'}): "
                                  f"{window['detail']}" for x in ts[bad]])
                    ev = ev.loc[~bad].reset_index(drop=True)
                dup = ev.duplicated(key, keep="first").to_numpy()
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
        # the switch: raw/ first (one rename), then the quarantine that goes with it
        _switch_dir(new_raw, paths.stage("raw"), work)
        paths.quarantine.mkdir(parents=True, exist_ok=True)
        os.replace(qpath, paths.quarantine / "ingest.parquet")
        (paths.quarantine / "ingest.failed.parquet").unlink(missing_ok=True)
        _fsync_dir(paths.quarantine)
    except BaseException:
        quarantine.abort()
        raise
    return report


def _bar(enabled: bool, name: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc=f"ingest {name}", unit=" lines", unit_scale=True, mininterval=1.0)

