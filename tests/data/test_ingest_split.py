"""The per-user split of real logs (params ingest.split: per_user) and the history counts of the ingest
report (test impressions without any history), against plain Python references; ml-100k from ../shared
when present."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines import ingest
from tests.conftest import shared_path
from twinv2.data.adapters.common import assign_split_per_user, per_user_spec
from twinv2.data.store import read_table
from twinv2.errors import ConfigError

T0 = 1_500_000_000          # seconds


def write_movielens(d: Path, rows: list[tuple[int, int, float, int]], n_items: int = 30) -> Path:
    """A ml-latest layout: ratings.csv (userId,movieId,rating,timestamp) + movies.csv."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "movies.csv").write_text("movieId,title,genres\n" + "".join(
        f"{i},Movie {i} (2000),Comedy|Drama\n" for i in range(1, n_items + 1)))
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    return d


def random_log(seed: int, n_users: int = 25) -> list[tuple[int, int, float, int]]:
    """Users active in different periods (some only early, some only late, some throughout), a few
    with ties of the same second, in shuffled line order."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        start = int(rng.integers(0, 80 * 86400))
        length = int(rng.integers(0, 30 * 86400))
        n = int(rng.integers(1, 40))
        ts = T0 + start + np.sort(rng.integers(0, length + 1, n))
        if n > 3 and rng.random() < .3:
            ts[-2] = ts[-1]                          # a tie at the end of the user's log
        for t in ts:
            rows.append((u, int(rng.integers(1, 31)), float(rng.integers(1, 11)) / 2, int(t)))
    # one event at each end of the span so that the span does not depend on the draw
    rows += [(n_users + 1, 1, 4.0, T0), (n_users + 1, 2, 4.0, T0 + 110 * 86400)]
    rows = list({(u, i, t): (u, i, r, t) for u, i, r, t in rows}.values())     # no duplicate events
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def per_user_params(params, **kw):
    p = copy.deepcopy(params)
    p["ingest"]["split"] = "per_user"
    if kw:
        p["ingest"]["per_user"] = kw
    return p


def tables(d: Path):
    beh = read_table(d / "raw/behaviors", "behaviors").to_pandas()
    imp = read_table(d / "raw/impressions.parquet", "impressions").to_pandas()
    return beh, imp


def reference(rows, params, spec) -> tuple[pd.DataFrame, int]:
    """Plain loop: each user's events from history_end on, by (ts, line): the last n_test test, the n_valid
    before valid, the rest train."""
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "t"])
    df["line"] = np.arange(2, len(df) + 2)
    df["ts"] = df.t * 1000
    t0, t1 = df.ts.min(), df.ts.max()
    W = t0 + round(params["ingest"]["history_frac"] * (t1 - t0))
    out = []
    for u, g in df.sort_values(["user_id", "ts", "line"]).groupby("user_id"):
        cand = g[g.ts >= W]
        n = len(cand)
        take = (lambda s: min(s, n) if isinstance(s, int) else min(math.ceil(round(s * n, 9)), n))
        n_test = take(spec["test"])
        n_valid = min(take(spec["valid"]), n - n_test)
        split = ["train"] * (n - n_test - n_valid) + ["valid"] * n_valid + ["test"] * n_test
        out.append(cand.assign(split=split))
    ref = pd.concat(out) if out else df.iloc[:0].assign(split=[])
    return ref[["user_id", "item_id", "ts", "split"]].reset_index(drop=True), W


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec", [{"valid": 0.1, "test": 0.1}, {"valid": 0.25, "test": 0.2},
                                  {"valid": 1, "test": 2}, {"valid": 0, "test": 1}])
def test_per_user_split_matches_plain_reference(tmp_path, params, seed, spec):
    rows = random_log(seed)
    src = write_movielens(tmp_path / "src", rows)
    p = per_user_params(params, **spec)
    r = ingest.run("movielens", src, tmp_path / "out", params=p, progress=False)
    beh, imp = tables(tmp_path / "out")
    ref, W = reference(rows, p, spec)
    meta = json.loads((tmp_path / "out/raw/meta.json").read_text())
    assert meta["split"] == "per_user" and meta["history_end_ms"] == W
    assert "valid_start_ms" not in meta and "test_start_ms" not in meta     # no global edges: cut per user
    pd.testing.assert_frame_equal(imp[["user_id", "item_id", "ts", "split"]], ref, check_dtype=False)
    # counts add up
    by = r["rows"]["impressions_by_split"]
    assert sum(by.values()) == len(imp) == r["rows"]["impressions"]
    assert by == {s: int((imp.split == s).sum()) for s in ("train", "valid", "test")}
    assert r["event_roles"]["both"] == len(imp) and r["rows"]["behaviors"] == len(rows)
    # every impression is at or after the history end = the default clustering watermark (no leakage
    # into clusters built before it), and per user: history < train <= valid <= test in time
    assert (imp.ts >= W).all()
    for u, g in imp.groupby("user_id"):
        order = ["train", "valid", "test"]
        spans = [g[g.split == s].ts for s in order]
        present = [s for s in spans if len(s)]
        assert all(a.max() <= b.min() for a, b in zip(present, present[1:])), u
        late = beh[(beh.user_id == u) & (beh.ts >= W)]     # from W on, the user's events are its impressions
        assert sorted(zip(late.item_id, late.ts)) == sorted(zip(g.item_id, g.ts)), u
        n = len(g)
        assert (g.split == "test").sum() >= 1                   # every user with impressions has a test event
        if isinstance(spec["test"], int):
            assert (g.split == "test").sum() == min(spec["test"], n)


def test_history_counts_of_the_report(tmp_path, params):
    """test_no_history = test impressions whose user has no behaviour strictly before them (plain loop),
    in both split modes."""
    rows = random_log(5, n_users=40)
    # late-only users: 200 with two events in the last 10% of the span, 201 with one
    rows += [(200, 3, 4.0, T0 + 105 * 86400), (200, 4, 4.0, T0 + 106 * 86400), (201, 5, 2.0, T0 + 108 * 86400)]
    src = write_movielens(tmp_path / "src", rows)
    for mode, p in (("global", params), ("per_user", per_user_params(params))):
        r = ingest.run("movielens", src, tmp_path / mode, params=p, progress=False)
        beh, imp = tables(tmp_path / mode)
        W = json.loads((tmp_path / mode / "raw/meta.json").read_text())["history_end_ms"]
        test = imp[imp.split == "test"]
        none = [not ((beh.user_id == u) & (beh.ts < t)).any() for u, t in zip(test.user_id, test.ts)]
        none_w = [not ((beh.user_id == u) & (beh.ts < W)).any() for u in test.user_id]
        first = ~test.user_id.duplicated().to_numpy()
        th = r["test_history"]
        assert r["test_no_history"] == th["test_no_history"] == sum(none), mode
        assert th["test_no_history_before_watermark"] == sum(none_w)
        assert th["test_impressions"] == len(test)
        assert th["test_users"] == test.user_id.nunique()
        assert th["test_users_no_history"] == int((np.array(none) & first).sum())
        assert th["test_users_no_history_before_watermark"] == int((np.array(none_w) & first).sum())
        on_disk = json.loads((tmp_path / mode / "reports/ingest.json").read_text())
        assert on_disk["test_no_history"] == sum(none) and on_disk["split"] == mode
    # the late-only users: their first test impressions have no history in both modes (2 and 1)
    assert json.loads((tmp_path / "global/reports/ingest.json").read_text())["test_no_history"] >= 2
    assert json.loads((tmp_path / "per_user/reports/ingest.json").read_text())["test_no_history"] >= 1


def test_a_single_event_user_is_test_without_history(tmp_path, params):
    rows = [(1, 1, 4.0, T0), (1, 2, 4.0, T0 + 100), (2, 3, 4.0, T0 + 90), (3, 4, 2.0, T0 + 95), (3, 5, 2.0, T0 + 99)]
    src = write_movielens(tmp_path / "src", rows)
    p = per_user_params(params)
    p["ingest"]["require_splits"] = ["valid", "test"]        # five events: no train impression, by design here
    r = ingest.run("movielens", src, tmp_path / "o", params=p, progress=False)
    _, imp = tables(tmp_path / "o")
    # W = T0 + 70 s: users 1 (1 event after W), 2 (1), 3 (2 events: valid, test)
    assert list(zip(imp.user_id, imp.split)) == [(1, "test"), (2, "test"), (3, "valid"), (3, "test")]
    assert r["test_history"] == {"test_impressions": 3, "test_no_history": 1, "test_no_history_before_watermark": 2,
                                 "test_users": 3, "test_users_no_history": 1,
                                 "test_users_no_history_before_watermark": 2}


def test_assign_split_per_user_unit():
    u = np.array([1] * 10 + [2] * 11 + [3] + [4] * 2)
    s = assign_split_per_user(u, {"valid": 0.1, "test": 0.1})
    assert list(s[:10]) == ["train"] * 8 + ["valid", "test"]
    assert list(s[10:21]) == ["train"] * 7 + ["valid"] * 2 + ["test"] * 2      # ceil(1.1) = 2
    assert list(s[21:]) == ["test", "valid", "test"]
    s = assign_split_per_user(u, {"valid": 3, "test": 1})
    assert list(s[:10]) == ["train"] * 6 + ["valid"] * 3 + ["test"]
    assert list(s[21:]) == ["test", "valid", "test"]
    assert len(assign_split_per_user(np.zeros(0, np.int64), {"valid": 1, "test": 1})) == 0


@pytest.mark.parametrize("bad", [{"test": 0}, {"test": 1.5}, {"valid": -1}, {"test": "a"}, {"tests": 1},
                                 {"test": True}])
def test_bad_per_user_params_are_named(bad):
    with pytest.raises(ConfigError, match="params ingest.per_user"):
        per_user_spec({"per_user": bad})


def test_unknown_split_mode_is_named(tmp_path, params):
    p = copy.deepcopy(params)
    p["ingest"]["split"] = "random"
    with pytest.raises(ConfigError, match=r"ingest.split: expected one of \['global', 'per_user'\]"):
        ingest.run("movielens", write_movielens(tmp_path / "s", random_log(0)), tmp_path / "o", params=p,
                   progress=False)


@pytest.mark.shared
def test_shared_ml100k_per_user_split_gives_test_users_a_history(tmp_path, params):
    src = shared_path("data", "ml-100k")
    g = ingest.run("movielens", src, tmp_path / "g", params=params, progress=False)
    r = ingest.run("movielens", src, tmp_path / "p", params=per_user_params(params), progress=False)
    _, imp = tables(tmp_path / "p")
    # global time split: 150 test users, 66 of them without any behaviour before their first test impression
    assert (g["test_history"]["test_users"], g["test_history"]["test_users_no_history"]) == (150, 66)
    assert g["test_no_history"] == 148
    # per-user split: every user active from history_end on is in test, each with a history
    th = r["test_history"]
    assert r["split"] == "per_user" and r["lines_quarantined"] == 0
    assert th["test_users"] == 382 and th["test_users_no_history"] == 0 and r["test_no_history"] == 0
    assert r["rows"]["impressions"] == g["rows"]["impressions"] == 28_489
    assert r["rows"]["impressions_by_split"] == {"train": 22_427, "valid": 3_027, "test": 3_035}
    # the limit of one global watermark: most of these users have nothing before it (no clusters)
    assert th["test_users_no_history_before_watermark"] == 382 - 126
    assert imp.groupby("user_id").split.apply(lambda s: (s == "test").sum()).min() >= 1


def test_cli_per_user_and_a_bad_split_is_a_usage_error(tmp_path, capsys):
    from pipelines.cli import main

    src = write_movielens(tmp_path / "s", random_log(0))
    assert main(["ingest", "--format", "movielens", "--src", str(src), "--out", str(tmp_path / "o"),
                 "--set", "ingest.split=per_user"]) == 0
    assert "per_user split" in capsys.readouterr().out
    assert json.loads((tmp_path / "o/raw/meta.json").read_text())["split"] == "per_user"
    assert main(["ingest", "--format", "movielens", "--src", str(src), "--out", str(tmp_path / "o2"),
                 "--set", "ingest.split=random"]) == 3
    assert "ingest.split" in capsys.readouterr().err
