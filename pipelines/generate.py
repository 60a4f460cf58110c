"""`twinv2 generate`: write the synthetic life-cycle world (twinv2.data.synthetic) to DIR.

    DIR/raw/items.parquet        item_id, author_id, category, duration_ms
    DIR/raw/behaviors/           + liked (int8), true_interest (int32, -1 = exploration); sorted (user_id, ts)
    DIR/raw/impressions.parquet  user_id, item_id, ts, label, split, p_true
    DIR/raw/meta.json            source, history_start_ms, history_end_ms, end_ms, split bounds, config
    DIR/reports/generate.json    statistics, oracle AUC, timing (returned as a dict with a "summary")

Users are generated and written one at a time in increasing user_id (memory: one batch of users).
raw/ is replaced as a whole only when everything was written.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

WRITE_BATCH_ROWS = 250_000     # users are handed to the writer in batches of about this many rows
WRITE_FILE_ROWS = 1_000_000    # rows per part file (the writer's buffer; bounds memory)


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None


def _gauc(user: np.ndarray, y: np.ndarray, p: np.ndarray) -> float | None:
    """Impression-weighted mean of per-user AUC over users with both labels."""
    num = den = 0.0
    bounds = np.flatnonzero(np.diff(user)) + 1
    for sl in np.split(np.arange(len(user)), bounds):
        a = _auc(y[sl], p[sl])
        if a is not None:
            num += a * len(sl)
            den += len(sl)
    return num / den if den else None


def run(preset: str, out: str | Path, seed: int | None = None, params: dict | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    from twinv2.config import load_params
    from twinv2.data.schema import DatasetPaths
    from twinv2.data.store import BehaviorWriter, write_table
    from twinv2.data.synthetic import KIND_NAMES, World, make_config
    from twinv2.io import atomic_dir, write_json

    params = load_params() if params is None else params
    gp = params.get("generate") or {}
    seed = int(gp.get("seed", 0) if seed is None else seed)
    cfg = make_config(preset, gp.get("knobs") or {})
    paths = DatasetPaths(out)
    t0 = time.perf_counter()
    world = World(cfg, seed)
    cat = world.cat

    n_beh = n_hist = 0
    lengths = np.zeros(cfg.n_users, np.int64)
    hist_lengths = np.zeros(cfg.n_users, np.int64)
    imps, recent = [], []
    acc = {"ratio_sum": 0.0, "replays": 0, "likes": 0, "explore": 0, "kinds": np.zeros(4, np.int64),
           "late_join": 0}
    with atomic_dir(paths.stage("raw")) as raw:
        write_table(raw / "items.parquet", pa.table({"item_id": cat.item_id, "author_id": cat.author_id,
                                                     "category": cat.category, "duration_ms": cat.duration_ms}),
                    "items")
        buf: list[pa.Table] = []
        buf_rows = 0
        with BehaviorWriter(raw / "behaviors", rows_per_file=WRITE_FILE_ROWS) as writer:
            bar = tqdm(world.users(), total=cfg.n_users, desc=f"generate {preset}", unit="user")
            for beh, imp, st in bar:
                uid = int(beh["user_id"][0])
                n = len(beh["ts"])
                lengths[uid - 1] = n
                hist_lengths[uid - 1] = int(np.searchsorted(beh["ts"], cfg.history_end_ms, side="left"))
                n_beh += n
                acc["ratio_sum"] += st["ratio_mean"] * n
                for k in ("replays", "likes", "explore"):
                    acc[k] += st[k]
                acc["kinds"] += st["kinds"]
                acc["late_join"] += st["join_day"] > 0
                buf.append(pa.table(beh))
                buf_rows += n
                imps.append(imp)
                recent.append(st["p_recent"])
                if buf_rows >= WRITE_BATCH_ROWS:
                    writer.write(pa.concat_tables(buf))
                    buf, buf_rows = [], 0
                bar.set_postfix(rows=n_beh, refresh=False)
            if buf:
                writer.write(pa.concat_tables(buf))
            bar.close()
        imp = {k: np.concatenate([d[k] for d in imps]) for k in imps[0]}
        write_table(raw / "impressions.parquet", pa.table(imp), "impressions")
        meta = {"source": f"synthetic:{preset}", "preset": preset, "seed": seed,
                "history_start_ms": cfg.history_start_ms, "history_end_ms": cfg.history_end_ms,
                "end_ms": cfg.end_ms, "valid_start_ms": cfg.train_end_ms, "test_start_ms": cfg.valid_end_ms,
                "extra_behavior_columns": ["liked", "true_interest"],
                "config": dataclasses.asdict(cfg)}
        write_json(raw / "meta.json", meta)
    seconds = time.perf_counter() - t0

    y, p, pr = imp["label"].astype(np.int64), imp["p_true"], np.concatenate(recent)
    split = imp["split"]
    test = split == "test"
    report: dict[str, Any] = {
        "preset": preset, "seed": seed, "source": meta["source"],
        "n_users": cfg.n_users, "n_items": len(cat), "n_authors": int(cat.author_id.max()),
        "n_categories": int(len(np.unique(cat.category))),
        "n_behaviors": int(n_beh), "n_behaviors_history": int(hist_lengths.sum()),
        "n_behaviors_impression_window": int(n_beh - hist_lengths.sum()),
        "n_impressions": int(len(y)),
        "history_p50": float(np.median(lengths)), "history_p90": float(np.quantile(lengths, 0.9)),
        "history_max": int(lengths.max()), "history_min": int(lengths.min()),
        "history_mean": float(lengths.mean()),
        "history_window_p50": float(np.median(hist_lengths)),
        "targets": {"history_p50": cfg.length_median, "history_p90": cfg.length_p90,
                    "history_max": cfg.length_max},
        "oracle_auc": _auc(y[test], p[test]),
        "oracle_auc_overall": _auc(y, p),
        "oracle_auc_by_split": {s: _auc(y[split == s], p[split == s]) for s in ("train", "valid", "test")},
        "oracle_gauc_test": _gauc(imp["user_id"][test], y[test], p[test]),
        # the same truth with dormant interests removed: what a recent-only view of the user implies
        "oracle_auc_without_dormant": _auc(y[test], pr[test]),
        "oracle_auc_without_dormant_overall": _auc(y, pr),
        "label_rate": float(y.mean()),
        "label_rate_by_split": {s: float(y[split == s].mean()) if (split == s).any() else None
                                for s in ("train", "valid", "test")},
        "impressions_by_split": {s: int((split == s).sum()) for s in ("train", "valid", "test")},
        "completion_mean": acc["ratio_sum"] / max(n_beh, 1),
        "replay_share": acc["replays"] / max(n_beh, 1),
        "liked_rate": acc["likes"] / max(n_beh, 1),
        "explore_share": acc["explore"] / max(n_beh, 1),
        "interests_by_kind": {KIND_NAMES[k]: int(acc["kinds"][k]) for k in range(4)},
        "late_join_users": int(acc["late_join"]),
        "seconds": round(seconds, 3),
        "rows_per_s": round(n_beh / max(seconds, 1e-9), 1),
    }
    f4 = lambda v: "n/a" if v is None else f"{v:.4f}"   # noqa: E731  (AUC undefined with one class)
    report["summary"] = (
        f"generated synthetic:{preset} (seed {seed}) in {seconds:.1f}s: {cfg.n_users} users, {len(cat)} items, "
        f"{n_beh:,} behaviours (per user p50 {report['history_p50']:.0f}, p90 {report['history_p90']:.0f}, "
        f"max {report['history_max']:,}), {len(y):,} impressions (label rate {report['label_rate']:.3f}), "
        f"oracle AUC test {f4(report['oracle_auc'])} / overall {f4(report['oracle_auc_overall'])} "
        f"(without dormant interests {f4(report['oracle_auc_without_dormant'])}) -> {paths.root}")
    write_json(paths.reports / "generate.json", report)
    return report
