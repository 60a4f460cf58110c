"""Validate DIR/raw into DIR/validated + DIR/quarantine + DIR/reports/validation.json.

Order: items (their accepted ids are the known items), behaviours streamed file by file and chunk by
chunk of complete users, impressions. On every batch the row masks of rules.py decide what is
quarantined and GX (suites.py) checks the same batch; the two must agree on every count, otherwise
the table-level check `gx_agrees` fails. Table-level checks: schema (columns and dtypes), not empty,
quarantined share <= validate.max_quarantine_share, behaviours sorted by (user_id, ts) per user
(validate.unsorted_policy: "sort" repairs and reports, "fail" stops), users never split across files,
and GX agreement. A table-level failure writes the report and quarantine, removes DIR/validated
(nothing stale can pass for validated data) and raises ValidationFailed.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twinv2 import progress
from twinv2.data.schema import SPLITS, TABLES, DatasetPaths, event_key
from twinv2.data.store import BehaviorWriter, iter_user_chunks, write_table
from twinv2.errors import ConfigError, DataError, ValidationFailed
from twinv2.io import owner_tag, write_json
from twinv2.validation.quarantine import QuarantineWriter, label_rows
from twinv2.validation.rules import Bounds, active_rules, estimate_split_edges, prepare_batch, row_masks
from twinv2.validation.tables import (behavior_parts, read_meta, read_parquet_file, schema_problems,
                                      unsorted_users)

DEFAULTS = {"max_quarantine_share": 0.05, "max_completion": 5.0, "unsorted_policy": "sort",
            "batch_rows": 1_000_000, "gx_confirm": True, "now_ms": None}
EXAMPLES = 20


@dataclass
class TableReport:
    name: str
    rows_in: int = 0
    accepted: int = 0
    quarantined: int = 0
    unchecked: int = 0                # rows never row-checked because the table failed its schema
    by_expectation: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    table_level: dict[str, dict[str, Any]] = field(default_factory=dict)
    gx: dict[str, Any] = field(default_factory=lambda: {"batches": 0, "agrees": True, "mismatches": []})
    gx_results: list[dict] = field(default_factory=list)

    def check(self, name: str, success: bool, detail: str, **extra: Any) -> None:
        self.table_level[name] = {"success": bool(success), "detail": detail, **extra}

    @property
    def success(self) -> bool:
        return all(t["success"] for t in self.table_level.values())

    def to_dict(self) -> dict[str, Any]:
        assert self.accepted + self.quarantined + self.unchecked == self.rows_in, \
            f"{self.name}: accepted {self.accepted} + quarantined {self.quarantined} + unchecked " \
            f"{self.unchecked} != rows_in {self.rows_in}"
        return {"rows_in": self.rows_in, "accepted": self.accepted, "quarantined": self.quarantined,
                "unchecked": self.unchecked, "by_expectation": dict(self.by_expectation),
                "skipped": dict(self.skipped), "table_level": self.table_level, "success": self.success,
                "gx": self.gx}


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn a failure while reading row groups (a damaged page, a truncated file) into a DataError."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{path}: cannot read the {what} ({type(e).__name__}: {e}). Expected an intact "
                        f"Parquet file; it may be truncated or damaged. Regenerate or re-ingest it.") from None


class _Checker:
    """Runs one table's row rules (and GX) on batches, quarantining and counting."""

    def __init__(self, rep: TableReport, b: Bounds, qw: QuarantineWriter, gx: bool, whole_table: bool,
                 result_format: str | dict = "BASIC"):
        from twinv2.validation.suites import GXChecker

        self.rep, self.b, self.qw = rep, b, qw
        self.rules = active_rules(rep.name, b)
        self.gx = GXChecker(rep.name, b, whole_table, result_format) if gx else None
        for r in self.rules:
            rep.by_expectation.setdefault(r.name, 0)

    def __call__(self, raw: pa.Table) -> pa.Table:
        """Check one batch of raw rows; quarantine the bad ones; return the accepted raw rows."""
        df = prepare_batch(raw.to_pandas(), self.rep.name, raw)
        masks = row_masks(df, self.rep.name, self.b)
        if self.gx is not None:
            self._confirm(df, masks)
        bad, expectation, reason = label_rows(masks, self.rules, len(raw))
        for name, m in masks.items():
            self.rep.by_expectation[name] += int(m.sum())
        self.qw.write(raw.filter(pa.array(bad)), expectation, reason)
        accepted = raw.filter(pa.array(~bad))
        self.rep.quarantined += int(bad.sum())
        self.rep.accepted += len(accepted)
        return accepted

    def _confirm(self, df, masks) -> None:
        by_rule, js = self.gx.run(df)
        self.rep.gx["batches"] += 1
        self.rep.gx_results.append(js)
        for r in self.rules:
            want, got = r.gx_count(df, masks[r.name], self.b), by_rule.get(r.name, {}).get("unexpected_count")
            if got != want:
                self.rep.gx["agrees"] = False
                self.rep.gx["mismatches"].append({"batch": self.rep.gx["batches"] - 1, "rule": r.name,
                                                  "gx": got, "vectorised": want})
        cols = by_rule.get("schema_columns", {"success": True})
        if not cols["success"]:
            self.rep.gx["agrees"] = False
            self.rep.gx["mismatches"].append({"rule": "schema_columns", "gx": False, "vectorised": True})
        if "not_empty" in by_rule and by_rule["not_empty"]["success"] != (len(df) > 0):
            self.rep.gx["agrees"] = False
            self.rep.gx["mismatches"].append({"rule": "not_empty", "gx": by_rule["not_empty"]["success"],
                                              "vectorised": len(df) > 0})


def _splits_present(rep: TableReport, accepted: pa.Table, meta: dict) -> None:
    """Table-level: every split holds accepted impressions (an empty train or valid split cannot train or
    choose a model; an empty test split cannot report one)."""
    if not len(accepted):
        return                      # not_empty / quarantine_share say it
    split = np.asarray(accepted.column("split").to_pylist(), dtype=object)
    n = {s: int((split == s).sum()) for s in SPLITS}
    required = meta.get("require_splits", list(SPLITS))     # ingest says which may be empty by design
    empty = [s for s in SPLITS if n[s] == 0 and s in required]
    edges = {k: meta[k] for k in ("history_end_ms", "valid_start_ms", "test_start_ms", "end_ms") if k in meta}
    rep.check("splits_not_empty", not empty,
              f"accepted impressions by split {n}" if not empty else
              f"{' and '.join(empty)} {'has' if len(empty) == 1 else 'have'} no accepted impression ({n}; "
              f"split edges of meta.json {edges}); expected impressions in train, valid and test: re-ingest with "
              f"times that spread over the log (see reports/ingest.json) or other split fractions", by_split=n)


def _finish(rep: TableReport, vp: dict) -> None:
    """The table-level checks that need the counts."""
    rep.check("not_empty", rep.rows_in > 0, f"{rep.rows_in} rows" if rep.rows_in else
              "the table has no rows; expected at least one")
    if rep.rows_in and not rep.unchecked:
        share = rep.quarantined / rep.rows_in
        cap = float(vp["max_quarantine_share"])
        worst = sorted(rep.by_expectation.items(), key=lambda kv: -kv[1])[:3]
        rep.check("quarantine_share", share <= cap,
                  f"{rep.quarantined}/{rep.rows_in} rows quarantined ({share:.2%}; cap "
                  f"validate.max_quarantine_share = {cap:.2%}); most frequent: "
                  + ", ".join(f"{k} {v}" for k, v in worst if v) if share > cap else
                  f"{share:.2%} quarantined (cap {cap:.2%})", share=share)
    if rep.gx["batches"] or not vp["gx_confirm"]:
        rep.check("gx_agrees", rep.gx["agrees"],
                  "GX and the vectorised masks agree on every batch" if rep.gx["agrees"] else
                  f"GX and the vectorised masks disagree: {rep.gx['mismatches'][:5]} (a validator bug: "
                  "the quarantine cannot be trusted)")


def _schema_check(rep: TableReport, problems: list[str], where: str) -> bool:
    rep.check("schema", not problems, "columns and dtypes match the canonical schema" if not problems
              else f"{where}: " + "; ".join(problems))
    if problems:
        rep.unchecked = rep.rows_in
    return not problems


def _quarantine_schema(schema: pa.Schema) -> pa.Schema:
    return schema.remove_metadata()


def _invalidate(paths: DatasetPaths) -> None:
    """Withdraw the previous validation before reading anything: whatever this run ends in (a table-level
    failure, unreadable input, a kill), no later stage may take the old DIR/validated for the validation
    of the current raw data. validated/ is renamed away (one atomic step) and removed; validation.json
    says the validation is running; the old GX results go."""
    if not paths.root.is_dir():
        return
    val = paths.stage("validated")
    if val.exists():
        gone = val.with_name(f".{val.name}.invalid.{owner_tag()}.tmp")
        os.replace(val, gone)
        shutil.rmtree(gone, ignore_errors=True)
    (paths.reports / "gx" / "validation_results.json").unlink(missing_ok=True)
    write_json(paths.reports / "validation.json",
               {"success": False, "status": "running", "started_s": time.time(),
                "summary": f"validation of {paths.stage('raw')} started and has not finished (running, killed, or "
                           f"it failed before writing its report); {val} is withdrawn until it passes"})


def validate_dataset(data: str | Path, params: dict | None = None) -> dict[str, Any]:
    vp = {**DEFAULTS, **((params or {}).get("validate") or {})}
    if vp["unsorted_policy"] not in ("sort", "fail"):
        raise ConfigError(f"params validate.unsorted_policy must be 'sort' or 'fail', got {vp['unsorted_policy']!r}")
    paths = DatasetPaths(data)
    _invalidate(paths)
    try:
        return _validate(paths, vp)
    except DataError as e:
        if paths.root.is_dir():
            write_json(paths.reports / "validation.json",
                       {"success": False, "status": "error", "error": str(e), "failures": [str(e)],
                        "summary": f"validation FAILED: the input cannot be read: {e}"})
        raise


def _validate(paths: DatasetPaths, vp: dict) -> dict[str, Any]:
    raw_dir = paths.stage("raw")
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: no raw/ directory; expected items.parquet, behaviors/, impressions.parquet "
                        f"and meta.json written by `twinv2 generate` or `twinv2 ingest`.")
    t0 = time.perf_counter()
    meta = read_meta(raw_dir / "meta.json")
    items = read_parquet_file(paths.items(), "items table")
    imps = read_parquet_file(paths.impressions(), "impressions table")
    if "p_true" not in imps.column_names:     # optional: null where the ground truth is unknown
        imps = imps.append_column("p_true", pa.nulls(len(imps), pa.float32()))
    parts = behavior_parts(paths.behaviors())

    b = Bounds(history_start_ms=meta["history_start_ms"], history_end_ms=meta["history_end_ms"],
               end_ms=meta["end_ms"], now_ms=int(vp["now_ms"] or time.time() * 1000),
               max_completion=float(vp["max_completion"]), event_key=event_key(meta))
    reps = {t: TableReport(t) for t in TABLES}
    qdir = paths.quarantine
    gx = bool(vp["gx_confirm"])
    rf = vp.get("gx_result_format", "BASIC")

    class _Abort(Exception):
        pass

    n_rows = len(items) + sum(pf.metadata.num_rows for _, pf in parts) + len(imps)
    bar = progress.bar(total=n_rows, desc="validate", unit="row", unit_scale=True, section=vp)
    try:
        from twinv2.io import atomic_dir

        with atomic_dir(paths.stage("validated")) as out:
            # ---------------------------------------------------------- items
            rep = reps["items"]
            rep.rows_in = len(items)
            with QuarantineWriter(qdir / "items.parquet", _quarantine_schema(items.schema)) as qw:
                if _schema_check(rep, schema_problems(items.schema, "items"), str(paths.items())):
                    accepted = _Checker(rep, b, qw, gx, True, rf)(items)
                    write_table(out / "items.parquet", accepted, "items")
                    b = replace(b, known_items=np.unique(accepted.column("item_id").to_numpy()))
                else:
                    rep.skipped["known_item"] = "items.parquet failed its schema check"
            _finish(rep, vp)
            bar.update(len(items))

            # ---------------------------------------------------------- behaviours
            rep = reps["behaviors"]
            rep.rows_in = sum(pf.metadata.num_rows for _, pf in parts)
            problems = [f"{f.name}: {p}" for f, pf in parts for p in schema_problems(pf.schema_arrow, "behaviors")]
            problems += [f"{f.name}: column {c!r} of the event key (meta.json event_key {list(b.event_key)}) is missing"
                         for f, pf in parts for c in b.event_key if c not in pf.schema_arrow.names]
            with QuarantineWriter(qdir / "behaviors.parquet", _quarantine_schema(parts[0][1].schema_arrow)) as qw:
                if b.known_items is None:
                    rep.skipped["known_item"] = "items.parquet failed its schema check"
                if _schema_check(rep, problems, str(paths.behaviors())):
                    _behaviours(rep, parts, b, qw, gx, rf, vp, out / "behaviors", bar)
                else:
                    bar.update(rep.rows_in)
            _finish(rep, vp)

            # ---------------------------------------------------------- impressions
            rep = reps["impressions"]
            rep.rows_in = len(imps)
            with QuarantineWriter(qdir / "impressions.parquet", _quarantine_schema(imps.schema)) as qw:
                if b.known_items is None:
                    rep.skipped["known_item"] = "items.parquet failed its schema check"
                if _schema_check(rep, schema_problems(imps.schema, "impressions"), str(paths.impressions())):
                    edges, source = _split_edges(meta, imps)
                    b = replace(b, split_edges=edges)
                    rep.table_level["split_edges"] = {"success": True, "source": source, "edges": edges,
                                                      "detail": f"valid starts at {edges[0] if edges else None}, "
                                                                f"test at {edges[1] if edges else None} ({source})"}
                    if edges is None:
                        rep.skipped["split_time_order"] = ("per-user split: ingest orders each user's splits in time"
                                                           if meta.get("split") == "per_user"
                                                           else "no impression has a known split and a ts")
                    accepted = _Checker(rep, b, qw, gx, True, rf)(imps)
                    write_table(out / "impressions.parquet", accepted, "impressions")
                    _splits_present(rep, accepted, meta)
            _finish(rep, vp)
            bar.update(len(imps))

            shutil.copyfile(raw_dir / "meta.json", out / "meta.json")
            if not all(r.success for r in reps.values()):
                raise _Abort()
    except _Abort:
        shutil.rmtree(paths.stage("validated"), ignore_errors=True)
    finally:
        bar.close()

    report = _report(reps, b, vp, meta, time.perf_counter() - t0)
    _write_reports(paths, report, reps)
    if not report["success"]:
        raise ValidationFailed(report["summary"] + f" Details: {paths.reports / 'validation.json'}.", report)
    return report


def _split_edges(meta: dict, imps: pa.Table) -> tuple[tuple[int, int] | None, str]:
    # generate and ingest write valid_start_ms/test_start_ms; generate wrote train_end_ms/valid_end_ms (the
    # same edges) before 2026-11-29, still read for data directories of that time
    if meta.get("split") == "per_user":     # ingest's per-user split: no global edges to hold impressions to
        return None, "per-user split (meta.json split: per_user): each user's own time order, set by ingest"
    for v, t in (("valid_start_ms", "test_start_ms"), ("train_end_ms", "valid_end_ms")):
        if isinstance(meta.get(v), int) and isinstance(meta.get(t), int):
            return (meta[v], meta[t]), f"meta.json {v}/{t}"
    ts = imps.column("ts").to_numpy(zero_copy_only=False)
    split = np.asarray(imps.column("split").to_pylist(), dtype=object)
    known = np.isin(split, list(SPLITS))
    return estimate_split_edges(ts[known], split[known]), "estimated (fewest misplaced impressions)"


def _behaviours(rep: TableReport, parts: list, b: Bounds, qw: QuarantineWriter, gx: bool, rf,
                vp: dict, dest: Path, bar=None) -> None:
    """Stream the behaviours file by file, chunk by chunk of complete users."""
    check = _Checker(rep, b, qw, gx, False, rf)
    overlap: list[str] = []
    prev_max: int | None = None
    writer = BehaviorWriter(dest)
    schema = parts[0][1].schema_arrow
    batch_rows = int(vp["batch_rows"])
    buf: list[pa.Table] = []          # chunks of complete users, checked together (one GX run per batch)
    buf_rows = 0
    file_unsorted: list[np.ndarray] = []

    def flush() -> None:
        if not buf:
            return
        acc = check(pa.concat_tables(buf))
        if bar is not None:
            bar.update(sum(len(t) for t in buf))
        if len(acc) == 0:
            return
        uid = acc.column("user_id").to_numpy()
        ts = acc.column("ts").to_numpy()
        bad = unsorted_users(uid, ts)
        if len(bad):
            file_unsorted.append(bad)
            acc = acc.take(pa.array(np.lexsort((ts, uid))))
        if not overlap:
            writer.write(acc)

    try:
        for f, pf in parts:
            with _reading(f, "behaviours part file"):
                uid_col = pf.read(columns=["user_id"]).column(0)
            u = uid_col.drop_null().to_numpy()
            if len(u) and prev_max is not None and u.min() <= prev_max:
                overlap.append(f"{f.name} starts at user {int(u.min())} <= {prev_max} of an earlier file")
            if len(u):
                prev_max = int(u.max()) if prev_max is None else max(prev_max, int(u.max()))
            in_order = uid_col.null_count == 0 and bool(np.all(u[1:] >= u[:-1]))
            if in_order:
                chunks: Iterator[pa.Table] = iter_user_chunks(f, batch_rows=int(vp["batch_rows"]))
            else:
                # a user order break or a null user id: this file (a user never spans files) is
                # sorted whole before checking, so no user is split between chunks
                with _reading(f, "behaviours part file"):
                    whole = pf.read()
                ts_all = whole.column("ts").to_numpy(zero_copy_only=False)
                uid_all = uid_col.to_numpy(zero_copy_only=False)
                ok = ~(np.isnan(uid_all.astype(float)) | np.isnan(ts_all.astype(float)))
                file_unsorted.append(unsorted_users(uid_all[ok].astype(np.int64), ts_all[ok].astype(np.int64)))
                chunks = iter([whole.sort_by([("user_id", "ascending"), ("ts", "ascending")])])
            with _reading(f, "behaviours part file"):
                for chunk in chunks:
                    buf.append(chunk.cast(schema) if chunk.schema != schema else chunk)
                    buf_rows += len(chunk)
                    if buf_rows >= batch_rows:
                        flush()
                        buf, buf_rows = [], 0
        flush()
    except BaseException:
        writer.abort()
        raise
    if overlap:
        writer.abort()
    else:
        writer.close()
    all_unsorted = np.unique(np.concatenate(file_unsorted)) if file_unsorted else np.zeros(0, np.int64)
    n_uns = len(all_unsorted)
    examples = all_unsorted[:EXAMPLES].tolist()
    policy = vp["unsorted_policy"]
    if n_uns == 0:
        detail = "every user's behaviours are sorted by ts"
    elif policy == "sort":
        detail = f"{n_uns} users had behaviours out of ts order (e.g. {examples}); sorted (unsorted_policy=sort)"
    else:
        detail = (f"{n_uns} users have behaviours out of (user_id, ts) order (e.g. user_id {examples}); "
                  f"unsorted_policy=fail: re-sort the raw behaviours or set validate.unsorted_policy=sort")
    rep.check("sorted_by_user_ts", n_uns == 0 or policy == "sort", detail, unsorted_users=n_uns,
              examples=examples, policy=policy)
    rep.check("users_not_split_across_files", not overlap,
              "each user lives in one part file" if not overlap else
              "users span part files, which breaks the store layout: " + "; ".join(overlap[:5]))


def _report(reps: dict[str, TableReport], b: Bounds, vp: dict, meta: dict, seconds: float) -> dict[str, Any]:
    tables = {t: r.to_dict() for t, r in reps.items()}
    ok = all(r.success for r in reps.values())
    failures = [f"{t}.{name}: {c['detail']}" for t, r in reps.items() for name, c in r.table_level.items()
                if not c["success"]]
    counts = "; ".join(f"{t} {r.rows_in} in, {r.accepted} accepted, {r.quarantined} quarantined"
                       + (f", {r.unchecked} unchecked" if r.unchecked else "") for t, r in reps.items())
    summary = f"validation {'PASSED' if ok else 'FAILED'}: {counts}."
    if failures:
        summary += " Table-level failures: " + " | ".join(failures) + "."
    rows = sum(r.rows_in for r in reps.values())
    return {"success": ok, "status": "passed" if ok else "failed", "tables": tables, "failures": failures, "summary": summary,
            "seconds": round(seconds, 3), "rows_per_s": rows / seconds if seconds > 0 else None,
            "bounds": {"history_start_ms": b.history_start_ms, "history_end_ms": b.history_end_ms,
                       "end_ms": b.end_ms, "now_ms": b.now_ms, "max_completion": b.max_completion,
                       "split_edges": b.split_edges},
            "params": {k: vp[k] for k in DEFAULTS}, "source": meta.get("source")}


def _write_reports(paths: DatasetPaths, report: dict, reps: dict[str, TableReport]) -> None:
    write_json(paths.reports / "validation.json", report)
    write_json(paths.reports / "gx" / "validation_results.json",
               {t: {"success": r.success, "batches": r.gx_results} for t, r in reps.items()})
