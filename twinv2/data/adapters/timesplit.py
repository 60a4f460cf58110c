"""The time split of an ingest: the plausible time range of the log, the split bounds over its span,
the global and per-user split, and the test-history counts of the report (docs/data.md)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from twinv2.data.adapters.lines import HARD_TS_MS
from twinv2.errors import ConfigError

SPLIT_MODES = ("global", "per_user")


def split_mode(params: dict) -> str:
    mode = params.get("split") or "global"
    if mode not in SPLIT_MODES:
        raise ConfigError(f"params ingest.split: expected one of {list(SPLIT_MODES)}, got {mode!r}")
    return mode


def split_bounds(t0: int, t1: int, params: dict) -> dict[str, int]:
    """Bounds (ms) of the time split over the log's span [t0, t1] (fractions of the whole span):
    history [t0, history_end) | train [history_end, valid_start) | valid [.., test_start) | test [.., t1].
    With `split: per_user` only history_start/history_end/end: train/valid/test are cut per user."""
    span = t1 - t0
    h = float(params.get("history_frac", 0.7))
    if split_mode(params) == "per_user":
        if not 0 < h < 1:
            raise ConfigError(f"params ingest.history_frac: expected a fraction in (0, 1), got {h}")
        return {"history_start_ms": int(t0), "history_end_ms": int(t0 + round(h * span)), "end_ms": int(t1)}
    v, t = (float(params.get(k, d)) for k, d in (("valid_frac", 0.1), ("test_frac", 0.1)))
    if min(h, v, t) <= 0 or h + v + t >= 1:
        raise ConfigError(f"params ingest: need history_frac, valid_frac, test_frac > 0 with a sum below 1 "
                         f"(the rest is train), got {h}, {v}, {t}")
    return {"history_start_ms": int(t0),
            "history_end_ms": int(t0 + round(h * span)),
            "valid_start_ms": int(t0 + round((1 - v - t) * span)),
            "test_start_ms": int(t0 + round((1 - t) * span)),
            "end_ms": int(t1)}


def assign_split(ts: np.ndarray, b: dict[str, int]) -> np.ndarray:
    """'train' / 'valid' / 'test' for impression times (all >= history_end_ms)."""
    out = np.full(len(ts), "train", dtype=object)
    out[ts >= b["valid_start_ms"]] = "valid"
    out[ts >= b["test_start_ms"]] = "test"
    return out


def required_splits(params: dict, spec: dict | None) -> set[str]:
    """The splits that must hold impressions (params ingest.require_splits, default all three; with the
    per-user split and `valid: 0`, valid is empty by design)."""
    req = params.get("require_splits")
    req = set(("train", "valid", "test") if req is None else req)
    unknown = req - {"train", "valid", "test"}
    if unknown:
        raise ConfigError(f"params ingest.require_splits: unknown splits {sorted(unknown)}; expected some of "
                          f"train, valid, test")
    if spec is not None and spec.get("valid") == 0:
        req.discard("valid")
    return req


def per_user_spec(params: dict) -> dict[str, int | float]:
    """params ingest.per_user {valid, test}: a float in (0, 1) is a fraction of each user's impression
    events from history_end on (rounded up), an int >= 0 a count of them (test >= 1)."""
    pu = params.get("per_user") or {}
    unknown = set(pu) - {"valid", "test"}
    if unknown:
        raise ConfigError(f"params ingest.per_user: unknown keys {sorted(unknown)}; expected valid, test")
    spec = {}
    for key in ("valid", "test"):
        v = pu.get(key, 0.1)
        ok = (isinstance(v, int) and not isinstance(v, bool) and v >= (1 if key == "test" else 0)) or \
             (isinstance(v, float) and 0 < v < 1)
        if not ok:
            raise ConfigError(f"params ingest.per_user.{key}: expected a fraction in (0, 1) or a count "
                             f"(an integer >= {1 if key == 'test' else 0}), got {v!r}")
        spec[key] = v
    return spec


def _take(spec: int | float, n: np.ndarray) -> np.ndarray:
    if isinstance(spec, int):
        return np.minimum(spec, n)
    return np.minimum(np.ceil(spec * n - 1e-9).astype(np.int64), n)


def assign_split_per_user(user: np.ndarray, spec: dict[str, int | float]) -> np.ndarray:
    """Per-user split of impression events sorted by (user, ts, line): each user's last `test` events are
    test, the `valid` before them valid, the earlier ones train (docs/data.md)."""
    n = len(user)
    out = np.full(n, "train", dtype=object)
    if n == 0:
        return out
    user = np.asarray(user)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    counts = np.diff(np.r_[starts, n])
    from_end = np.repeat(starts + counts, counts) - 1 - np.arange(n)
    n_test = _take(spec["test"], counts)
    n_valid = np.minimum(_take(spec["valid"], counts), counts - n_test)
    t, v = np.repeat(n_test, counts), np.repeat(n_valid, counts)
    out[from_end < t + v] = "valid"
    out[from_end < t] = "test"
    return out


# ---------------------------------------------------------------- plausible timestamps


class TsSketch:
    """Event times seen in pass 1, for the robust range: per block, at most `per_block` evenly spaced order
    statistics, each weighted by the rows it stands for (exact while blocks hold fewer events)."""

    def __init__(self, per_block: int = 4096):
        self.per_block = per_block
        self.values: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.n = 0

    def add(self, ts: np.ndarray) -> None:
        n = len(ts)
        if n == 0:
            return
        s = np.sort(np.asarray(ts, dtype=np.int64))
        if n > self.per_block:
            s = s[np.linspace(0, n - 1, self.per_block).round().astype(np.int64)]
        self.values.append(s)
        self.weights.append(np.full(len(s), n / len(s)))
        self.n += n

    def _sorted(self, within: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        v, w = np.concatenate(self.values), np.concatenate(self.weights)
        if within is not None:
            keep = (v >= within[0]) & (v < within[1])
            v, w = v[keep], w[keep]
        o = np.argsort(v, kind="stable")
        return v[o], np.cumsum(w[o])

    def median(self) -> int | None:
        """The (weighted) median event time; None without events."""
        if self.n == 0:
            return None
        v, cum = self._sorted()
        return int(v[min(np.searchsorted(cum, cum[-1] / 2, side="left"), len(v) - 1)])

    def robust_range(self, q: float, margin: float, min_margin_ms: int,
                     within: tuple[int, int] | None = None) -> tuple[int, int, int, int] | None:
        """(lo, hi, q_lo, q_hi): [lo, hi) = [q_lo - m, q_hi + m] with q_lo / q_hi the times below / above
        which a share q of the events (those `within` [a, b) when given) lie (at least one event each),
        m = max(margin * (q_hi - q_lo), min_margin_ms). None when there are too few events to tell (< 3)."""
        if self.n < 3:
            return None
        v, cum = self._sorted(within)
        n = int(round(float(cum[-1]))) if len(cum) else 0
        k = max(1, int(np.ceil(q * n - 1e-9)))
        if n < 2 * k + 1:
            return None
        q_lo = int(v[min(np.searchsorted(cum, k + 1e-6, side="left"), len(v) - 1)])
        q_hi = int(v[min(np.searchsorted(cum, n - k - 1e-6, side="left"), len(v) - 1)])
        m = max(int(margin * (q_hi - q_lo)), int(min_margin_ms))
        return max(q_lo - m, HARD_TS_MS[0]), min(q_hi + m + 1, HARD_TS_MS[1]), q_lo, q_hi


def _iso(ms: int) -> str:
    return pd.Timestamp(int(ms), unit="ms", tz="UTC").strftime("%Y-%m-%d %H:%M:%S")


def ts_window(adapter: "Adapter", params: dict, sketch: TsSketch) -> dict:
    """The plausible event times [lo, hi) (ms): the adapter's or params' `ts_range_ms` when configured,
    else the robust range of the log itself (params ingest.ts_robust), always within HARD_TS_MS."""
    conf = adapter.ts_range if adapter.ts_range is not None else params.get("ts_range_ms")
    if conf is not None:
        lo, hi = int(conf[0]), int(conf[1])
        if not lo < hi:
            raise ConfigError(f"params ingest ts_range_ms: expected [lo, hi) with lo < hi, got {conf}")
        return {"source": "configured", "lo_ms": lo, "hi_ms": hi,
                "detail": f"ts outside [{_iso(lo)}, {_iso(hi)}) UTC, the configured range of the log (ts_range_ms)"}
    rp = params.get("ts_robust") or {}
    q, margin = float(rp.get("quantile", 0.01)), float(rp.get("margin", 1.0))
    min_margin = int(rp.get("min_margin_ms", 86_400_000))
    mag = float(rp.get("magnitude", 10.0))
    if not mag > 1:
        raise ConfigError(f"params ingest.ts_robust.magnitude: expected a factor > 1, got {mag}")
    median = sketch.median()
    band = None
    if median is not None and median > 0 and sketch.n >= 3:
        # per-row unit check: a time more than `magnitude` x nearer to (or farther from) 1970 than the
        # log's median is in another unit (seconds in a millisecond field read as January 1970)
        band = (max(int(median / mag), HARD_TS_MS[0]), min(int(median * mag), HARD_TS_MS[1]))
    r = sketch.robust_range(q, margin, min_margin, within=band)
    if r is None:
        lo, hi = HARD_TS_MS
        return {"source": "hard", "lo_ms": lo, "hi_ms": hi,
                "detail": "ts outside [1970-01-01, 2100-01-01), the hard range of any log"}
    lo, hi, q_lo, q_hi = r
    out = {"source": "robust", "lo_ms": lo, "hi_ms": hi, "quantile_lo_ms": q_lo, "quantile_hi_ms": q_hi,
           "detail": (f"ts outside [{_iso(lo)}, {_iso(hi)}) UTC, the robust range of the log itself (its "
                      f"{q:g} and {1 - q:g} quantiles {_iso(q_lo)} and {_iso(q_hi)} widened by {margin:g} x "
                      f"their distance, at least {min_margin} ms)")}
    if band is not None:
        out.update(unit_lo_ms=band[0], unit_hi_ms=band[1], median_ms=median, magnitude=mag,
                   unit_rule=(f"ts below {_iso(band[0])} or from {_iso(band[1])} on: more than {mag:g} x nearer "
                              f"to or farther from 1970-01-01 than the log's median time {_iso(median)}, so in "
                              f"another unit or cut short (quantiles taken over the other events)"))
        out["lo_ms"], out["hi_ms"] = max(lo, band[0]), min(hi, band[1])
    return out


def wrong_unit_detail(field: str, unit_ms: int, ts_ms: int, window: dict) -> str:
    """The quarantine detail of an event time that is in another unit than the rest of the log."""
    raw = int(ts_ms) // unit_ms
    unit = "ms" if unit_ms == 1 else "s"
    low = ts_ms < window["unit_lo_ms"]
    when = _iso(ts_ms) if HARD_TS_MS[0] <= ts_ms < HARD_TS_MS[1] else "?"
    return (f"field {field!r}: {raw} ({unit}) reads as {when} UTC, more than {window['magnitude']:g} x "
            f"{'nearer to' if low else 'farther from'} 1970-01-01 than the log's median time "
            f"{_iso(window['median_ms'])}: a time in another unit (e.g. "
            f"{'seconds where milliseconds' if low else 'milliseconds where seconds'} are expected)"
            + (" or cut short" if low else ""))


def _test_history(beh: pd.DataFrame, test: pd.DataFrame, W: int, th: dict) -> None:
    """Count test impressions (and users, at their first test impression) whose user has no behaviour
    strictly before the impression, and those whose user has none before the watermark W."""
    if len(test) == 0:
        return
    first = beh.groupby("user_id")["ts"].min()
    fb = test["user_id"].map(first).to_numpy(dtype=np.float64)       # NaN: no behaviour at all
    ts = test["ts"].to_numpy()
    with np.errstate(invalid="ignore"):
        none = ~(fb < ts)
        none_w = ~(fb < W)
    th["test_impressions"] += len(test)
    th["test_no_history"] += int(none.sum())
    th["test_no_history_before_watermark"] += int(none_w.sum())
    firsts = ~test["user_id"].duplicated(keep="first").to_numpy()    # sorted by (user, ts): the first one
    th["test_users"] += int(firsts.sum())
    th["test_users_no_history"] += int((none & firsts).sum())
    th["test_users_no_history_before_watermark"] += int((none_w & firsts).sum())

