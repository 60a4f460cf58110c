"""Row-level expectations: one `Rule` per expectation, computed two ways.

Each rule has
  - `mask(df, b)`: a vectorised numpy/pandas computation, (n,) bool, True = the row breaks the rule;
    this is what decides which rows are quarantined (fast, one pass per shard);
  - `gx(b)`: the Great Expectations expectation(s) that check the same thing on the same batch;
  - `gx_count(df, mask, b)`: how many unexpected rows GX must report for that batch given our mask.
    For every rule but one this is `mask.sum()`. Duplicates differ on purpose: GX's compound
    uniqueness flags every member of a duplicated group, we keep the first and quarantine the rest,
    so GX's count is the number of rows in duplicated groups (`duplicated(keep=False)`).
The runner holds the two against each other on every batch (see runner.py) and tests do the same
row by row (GX's unexpected index lists versus our masks).

Nulls: a null value fails only the `<column>_not_null` rule; range/set rules look at non-null values
(that is also how GX's column-map expectations treat nulls).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from twinv2.data.schema import EVENT_KEY, SPLITS, repeated_events

COMPLETION = "_completion"     # derived column added to every behaviours batch: play_ms / duration_ms
P_TRUE_NAN = "_p_true_nan"     # derived column of every impressions batch: 1.0 where p_true is NaN (not null)


@dataclass(frozen=True)
class Bounds:
    """Everything the row rules compare against, fixed for one validation run."""

    history_start_ms: int
    history_end_ms: int
    end_ms: int
    now_ms: int
    max_completion: float
    known_items: np.ndarray | None = None              # sorted accepted item ids; None = unknown (skip)
    split_edges: tuple[int, int] | None = None         # (valid_start_ms, test_start_ms)
    event_key: tuple[str, ...] = EVENT_KEY             # what makes a behaviour one event (meta.json event_key)

    def ts_range(self, table: str) -> tuple[int, int]:
        """[lo, hi] (inclusive) of ts: behaviours live in the whole dataset span, impressions after history."""
        lo = self.history_end_ms if table == "impressions" else self.history_start_ms
        return int(lo), int(self.end_ms)


@dataclass(frozen=True)
class Rule:
    name: str                                                   # expectation id used in reports
    text: str                                                   # the reason a user reads
    mask: Callable[[pd.DataFrame, Bounds], np.ndarray]
    gx: Callable[[Bounds], list]
    gx_count: Callable[[pd.DataFrame, np.ndarray, Bounds], int] = field(default=lambda df, m, b: int(m.sum()))
    applies: Callable[[Bounds], bool] = field(default=lambda b: True)


def _gx():
    import great_expectations as gx   # slow import: only when a suite is built

    return gx.expectations


def _values(df: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64 or object, present mask)."""
    s = df[col]
    present = s.notna().to_numpy()
    return s.to_numpy(), present


def _num(df: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
    s = pd.to_numeric(df[col], errors="coerce")
    present = s.notna().to_numpy()
    return s.to_numpy(dtype=np.float64, na_value=np.nan), present


# ------------------------------------------------------------------ rule factories


def not_null(col: str) -> Rule:
    return Rule(
        name=f"{col}_not_null", text=f"{col} is null",
        mask=lambda df, b: df[col].isna().to_numpy(),
        gx=lambda b: [_gx().ExpectColumnValuesToNotBeNull(column=col)])


def between(name: str, col: str, text: str, lo: Callable[[Bounds], float | None],
            hi: Callable[[Bounds], float | None], strict_lo: bool = False) -> Rule:
    """lo <= col <= hi (or lo < col with strict_lo); None = unbounded. Nulls are not this rule's business."""

    def mask(df, b):
        v, ok = _num(df, col)
        bad = np.zeros(len(v), dtype=bool)
        low, high = lo(b), hi(b)
        with np.errstate(invalid="ignore"):
            if low is not None:
                bad |= (v <= low) if strict_lo else (v < low)
            if high is not None:
                bad |= v > high
        return bad & ok

    def expectations(b):
        return [_gx().ExpectColumnValuesToBeBetween(column=col, min_value=lo(b), max_value=hi(b),
                                                    strict_min=strict_lo)]

    return Rule(name=name, text=text, mask=mask, gx=expectations)


def in_set(name: str, col: str, text: str, values: Callable[[Bounds], np.ndarray | list | None]) -> Rule:
    def mask(df, b):
        v, ok = _values(df, col)
        allowed = values(b)
        return ok & ~pd.Series(v).isin(list(allowed) if not isinstance(allowed, np.ndarray) else allowed).to_numpy()

    def expectations(b):
        allowed = values(b)
        allowed = allowed.tolist() if isinstance(allowed, np.ndarray) else list(allowed)
        return [_gx().ExpectColumnValuesToBeInSet(column=col, value_set=allowed)]

    return Rule(name=name, text=text, mask=mask, gx=expectations,
                applies=lambda b: values(b) is not None)


def unique(name: str, cols: list[str] | Callable[[Bounds], tuple[str, ...]], text: str) -> Rule:
    """Rows repeating an earlier row's key (all key columns present) fail; the first one stays: the rule of
    ingest too (schema.repeated_events). `cols` may depend on the dataset (the behaviours' event key)."""
    key = cols if callable(cols) else (lambda b: tuple(cols))

    def mask(df, b):
        return repeated_events(df, key(b))

    def gx_count(df, m, b):
        k = list(key(b))
        ok = df[k].notna().all(axis=1).to_numpy()
        return int(df.loc[ok, k].duplicated(keep=False).sum())

    def expectations(b):
        k = list(key(b))
        if len(k) == 1:
            return [_gx().ExpectColumnValuesToBeUnique(column=k[0])]
        return [_gx().ExpectCompoundColumnsToBeUnique(column_list=k, ignore_row_if="any_value_is_missing")]

    return Rule(name=name, text=text, mask=mask, gx=expectations, gx_count=gx_count)


def split_order() -> Rule:
    """train ts < valid_start <= valid ts < test_start <= test ts (the time split)."""

    def mask(df, b):
        v1, v2 = b.split_edges
        ts, ok = _num(df, "ts")
        split = df["split"].to_numpy()
        with np.errstate(invalid="ignore"):
            bad = (((split == "train") & (ts >= v1)) | ((split == "valid") & ((ts < v1) | (ts >= v2)))
                   | ((split == "test") & (ts < v2)))
        return bad & ok

    def expectations(b):
        v1, v2 = b.split_edges
        E = _gx()
        cond = lambda s: dict(row_condition=f'split=="{s}"', condition_parser="pandas")
        return [E.ExpectColumnValuesToBeBetween(column="ts", max_value=v1 - 1, **cond("train")),
                E.ExpectColumnValuesToBeBetween(column="ts", min_value=v1, max_value=v2 - 1, **cond("valid")),
                E.ExpectColumnValuesToBeBetween(column="ts", min_value=v2, **cond("test"))]

    return Rule(name="split_time_order", mask=mask, gx=expectations,
                text="impression ts breaks the time split (train < valid < test)",
                applies=lambda b: b.split_edges is not None)


# ------------------------------------------------------------------ the rules of each table


def _ts_rules(table: str) -> list[Rule]:
    where = "[history_end_ms, end_ms]" if table == "impressions" else "[history_start_ms, end_ms]"
    return [
        between("ts_in_range", "ts", f"ts outside the dataset's time range {where} of meta.json",
                lambda b: b.ts_range(table)[0], lambda b: b.ts_range(table)[1]),
        between("ts_not_future", "ts", "ts is in the future (after the validation clock)",
                lambda b: None, lambda b: b.now_ms),
    ]


def _known_item() -> Rule:
    return in_set("known_item", "item_id", "item_id is not an accepted item of items.parquet",
                  lambda b: b.known_items)


RULES: dict[str, list[Rule]] = {
    "items": [
        *(not_null(c) for c in ("item_id", "author_id", "category", "duration_ms")),
        unique("item_id_unique", ["item_id"], "item_id repeats an earlier item row"),
        between("duration_positive", "duration_ms", "duration_ms <= 0", lambda b: 0, lambda b: None,
                strict_lo=True),
    ],
    "behaviors": [
        *(not_null(c) for c in ("user_id", "item_id", "ts", "play_ms", "duration_ms")),
        between("duration_positive", "duration_ms", "duration_ms <= 0", lambda b: 0, lambda b: None,
                strict_lo=True),
        between("play_nonnegative", "play_ms", "play_ms < 0", lambda b: 0, lambda b: None),
        between("completion_capped", COMPLETION, "play_ms / duration_ms above validate.max_completion",
                lambda b: None, lambda b: b.max_completion),
        *_ts_rules("behaviors"),
        unique("no_duplicate", lambda b: b.event_key,
               "duplicate behaviour: same event key (meta.json event_key, by default (user_id, item_id, ts)) as "
               "an earlier row"),
        _known_item(),
    ],
    "impressions": [
        *(not_null(c) for c in ("user_id", "item_id", "ts", "label", "split")),
        in_set("label_binary", "label", "label not in {0, 1}", lambda b: [0, 1]),
        between("p_true_not_nan", P_TRUE_NAN, "p_true is NaN (a present p_true must be a finite number in "
                "[0, 1]; leave it null where the ground truth is unknown)", lambda b: None, lambda b: 0.0),
        between("p_true_in_unit", "p_true", "p_true outside [0, 1]", lambda b: 0.0, lambda b: 1.0),
        in_set("split_known", "split", f"split not one of {list(SPLITS)}", lambda b: list(SPLITS)),
        *_ts_rules("impressions"),
        unique("no_duplicate", ["user_id", "item_id", "ts"],
               "duplicate impression: same (user_id, item_id, ts) as an earlier row"),
        _known_item(),
        split_order(),
    ],
}


def prepare_batch(df: pd.DataFrame, table: str, raw: pa.Table | None = None) -> pd.DataFrame:
    """Add the derived columns the rules (and GX) read. Returns a new frame; the input is untouched.

    `raw` is the Arrow batch df was converted from: pandas turns a null p_true into NaN, so NaN (a value
    that is present but not a number) can only be told from null (unknown, allowed) on the Arrow side.
    Without `raw` every NaN p_true counts as null."""
    if table == "impressions":
        nan = np.zeros(len(df), dtype=np.float64)
        if raw is not None and "p_true" in raw.column_names:
            col = raw.column("p_true")
            if pa.types.is_floating(col.type):
                nan = pc.fill_null(pc.is_nan(col), False).to_numpy(zero_copy_only=False).astype(np.float64)
        return df.assign(**{P_TRUE_NAN: nan})
    if table != "behaviors":
        return df
    play, _ = _num(df, "play_ms")
    dur, _ = _num(df, "duration_ms")
    with np.errstate(divide="ignore", invalid="ignore"):
        completion = np.where(dur > 0, play / dur, np.nan)
    return df.assign(**{COMPLETION: completion})


def active_rules(table: str, b: Bounds) -> list[Rule]:
    return [r for r in RULES[table] if r.applies(b)]


def row_masks(df: pd.DataFrame, table: str, b: Bounds) -> dict[str, np.ndarray]:
    """{rule name: (n,) bool failing rows} for a prepared batch, in suite order."""
    return {r.name: np.asarray(r.mask(df, b), dtype=bool) for r in active_rules(table, b)}


def estimate_split_edges(ts: np.ndarray, split: np.ndarray) -> tuple[int, int] | None:
    """The (valid_start, test_start) that put the fewest impressions on the wrong side of the split.

    Used when meta.json does not name the edges. For an edge between the earlier splits E and the
    later splits L, violations(e) = #E with ts >= e + #L with ts < e; candidates are the ts of L
    (plus one past the last ts). A clean split has 0 violations, and one misplaced row costs 1."""
    ok = pd.notna(ts) & pd.notna(split)
    ts, split = np.asarray(ts[ok], dtype=np.int64), np.asarray(split[ok])
    if len(ts) == 0:
        return None

    def best_edge(early: np.ndarray, late: np.ndarray) -> int:
        e, l_ = np.sort(early), np.sort(late)
        if len(l_) == 0:
            return int(e[-1]) + 1 if len(e) else 0
        cand = np.unique(np.append(l_, (e[-1] + 1) if len(e) else l_[-1] + 1))
        cost = (len(e) - np.searchsorted(e, cand, side="left")) + np.searchsorted(l_, cand, side="left")
        return int(cand[int(np.argmin(cost))])

    v1 = best_edge(ts[split == "train"], ts[np.isin(split, ["valid", "test"])])
    v2 = best_edge(ts[np.isin(split, ["train", "valid"])], ts[split == "test"])
    return (min(v1, v2), v2)
