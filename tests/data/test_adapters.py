"""Real-log adapters on small fixture files in the real formats (tests/data/fixtures, written by
make_fixtures.py; dirty.json lists every malformed line and the reason it must be quarantined for),
against plain pandas/Python reference mappings, plus the ../shared data when present."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines import ingest
from tests.conftest import shared_path
from twinv2.data.store import UserHistories, read_table

FIX = Path(__file__).resolve().parent / "fixtures"
DIRTY = json.loads((FIX / "dirty.json").read_text())

CASES = {   # name: (format, src relative to FIX, files (relative to FIX) read)
    "kuairand": ("kuairand", "kuairand", ["kuairand/video_features_basic_fixture.csv",
                                          "kuairand/log_random_4_11_to_4_12_fixture.csv",
                                          "kuairand/log_standard_4_08_to_4_10_fixture.csv"]),
    "ml100k": ("movielens", "movielens/ml-100k", ["movielens/ml-100k/u.item", "movielens/ml-100k/u.data"]),
    "ml1m": ("movielens", "movielens/ml-1m/ratings.dat", ["movielens/ml-1m/movies.dat", "movielens/ml-1m/ratings.dat"]),
    "mlcsv": ("movielens", "movielens/ml-latest-small", ["movielens/ml-latest-small/movies.csv",
                                                         "movielens/ml-latest-small/ratings.csv"]),
    "recbole": ("movielens", "movielens/recbole", ["movielens/recbole/ml-fixture.item",
                                                   "movielens/recbole/ml-fixture.inter"]),
    "taobao": ("taobao", "taobao/UserBehavior.csv", ["taobao/UserBehavior.csv"]),
}


@pytest.fixture(scope="module")
def done(tmp_path_factory, params):
    """Every fixture case ingested once: name -> (out dir, report)."""
    out = {}
    for name, (fmt, src, _) in CASES.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, ingest.run(fmt, FIX / src, d, params=params, progress=False))
    return out


def tables(d: Path):
    items = read_table(d / "raw/items.parquet", "items").to_pandas()
    beh = read_table(d / "raw/behaviors", "behaviors").to_pandas()
    imp = read_table(d / "raw/impressions.parquet", "impressions").to_pandas()
    return items, beh, imp


def data_lines(rel: str, header: bool) -> list[tuple[int, str]]:
    """(line number, text) of the clean data lines of a fixture file (the dirty ones left out)."""
    bad = {int(k) for k in DIRTY.get(rel, {})}
    raw = (FIX / rel).read_bytes().split(b"\n")
    if raw and raw[-1] == b"":
        raw = raw[:-1]
    return [(i, r.decode("latin-1")) for i, r in enumerate(raw, 1) if i not in bad and not (header and i == 1)]


# ---------------------------------------------------------------- dirty lines, counts


@pytest.mark.parametrize("name", list(CASES))
def test_each_malformed_line_is_quarantined_with_file_line_and_reason(done, name):
    d, report = done[name]
    q = pq.read_table(d / "quarantine/ingest.parquet").to_pandas()
    got = sorted((Path(f).relative_to(FIX).as_posix(), int(ln), r) for f, ln, r in zip(q.file, q.line, q.reason))
    want = sorted((rel, int(ln), r) for rel in CASES[name][2] for ln, r in DIRTY.get(rel, {}).items())
    assert got == want
    assert all(q.detail.str.len() > 5)
    # the raw line text is kept (a timestamp with text glued on stays visible)
    if name in ("kuairand", "ml100k", "taobao"):
        assert q.text.str.contains("abc").any()
    by_reason = pd.Series([r for *_, r in want]).value_counts().to_dict()
    assert report["quarantined"] == by_reason
    assert report["lines_quarantined"] == len(want)


@pytest.mark.parametrize("name", list(CASES))
def test_counts_add_up(done, name):
    d, r = done[name]
    on_disk = json.loads((d / "reports/ingest.json").read_text())
    assert on_disk["rows"] == r["rows"]
    n_lines = sum(len((FIX / rel).read_bytes().rstrip(b"\n").split(b"\n")) for rel in CASES[name][2])
    headers = sum(fc["header"] for fc in r["files"].values())
    assert r["lines_read"] + headers == n_lines
    assert r["lines_read"] == r["lines_accepted"] + r["lines_quarantined"]
    roles = r["event_roles"]
    assert r["rows"]["behaviors"] == roles["behavior_only"] + roles["both"]
    assert r["rows"]["impressions"] == roles["impression_only"] + roles["both"] == sum(r["rows"]["impressions_by_split"].values())
    items, beh, imp = tables(d)
    assert (len(items), len(beh), len(imp)) == (r["rows"]["items"], r["rows"]["behaviors"], r["rows"]["impressions"])
    assert imp["p_true"].isna().all()
    assert set(beh["item_id"]) | set(imp["item_id"]) <= set(items["item_id"])


# ---------------------------------------------------------------- split and leakage


@pytest.mark.parametrize("name", list(CASES))
def test_time_split_and_leakage_rule(done, name, params):
    d, _ = done[name]
    meta = json.loads((d / "raw/meta.json").read_text())
    items, beh, imp = tables(d)
    assert meta["source"] == CASES[name][0]
    h0, h1, end = meta["history_start_ms"], meta["history_end_ms"], meta["end_ms"]
    span = end - h0
    assert abs((h1 - h0) - params["ingest"]["history_frac"] * span) <= 1
    # the span [h0, end] is the first and last event of either table
    assert min(beh["ts"].min(), imp["ts"].min()) == h0 and max(beh["ts"].max(), imp["ts"].max()) == end
    assert (imp["ts"] >= h1).all() and (imp["ts"] <= end).all()
    # splits are time slices in order: train < valid < test
    for s, (lo, hi) in meta["splits_ms"].items():
        ts = imp.loc[imp.split == s, "ts"]
        assert ((ts >= lo) & ((ts < hi) if s != "test" else (ts <= hi))).all(), s
    assert set(imp.split) <= {"train", "valid", "test"}
    # behaviours sorted by (user, ts), continue after history_end
    assert (np.diff(beh.user_id) >= 0).all()
    same = np.diff(beh.user_id) == 0
    assert (np.diff(beh.ts)[same] >= 0).all()
    if name in ("ml100k", "taobao", "kuairand"):
        assert (beh.ts >= h1).any()
    # a sample's history is its user's behaviours strictly before its ts (by (user, position))
    hist = UserHistories.from_table(beh)
    uidx, pos = hist.positions(imp.user_id.to_numpy(), imp.ts.to_numpy())
    for k in range(len(imp)):
        h = hist.history(int(uidx[k]), int(pos[k]))
        ref = beh[(beh.user_id == imp.user_id.iloc[k]) & (beh.ts < imp.ts.iloc[k])]
        assert len(h["ts"]) == len(ref) and (h["ts"] < imp.ts.iloc[k]).all()


def test_chunked_streaming_gives_the_same_tables(done, tmp_path, params):
    """Blocks of a few lines and user ranges of a few events: same output as one block."""
    for name in ("kuairand", "taobao", "mlcsv"):
        fmt, src, _ = CASES[name]
        p = dict(params)
        p["ingest"] = {**params["ingest"], "chunk_bytes": 300, "sort_budget_rows": 7}
        r = ingest.run(fmt, FIX / src, tmp_path / name, params=p, progress=False)
        assert r["rows"] == done[name][1]["rows"] and r["quarantined"] == done[name][1]["quarantined"]
        for a, b in zip(tables(tmp_path / name), tables(done[name][0])):
            pd.testing.assert_frame_equal(a, b)
        assert len(list((tmp_path / name / "raw/behaviors").glob("*.parquet"))) >= 1


# ---------------------------------------------------------------- each adapter against a plain reference


def _ml_reference(rows: pd.DataFrame, movies: dict[int, int], params) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    p = params["ingest"]
    dur = p["movielens"]["duration_ms"]
    rows = rows[rows.item.isin(list(movies))].copy()
    rows["ts"] = rows.t * 1000
    t0, t1 = rows.ts.min(), rows.ts.max()
    h1 = t0 + round(p["history_frac"] * (t1 - t0))
    rows = rows.sort_values(["user", "ts"], kind="stable")
    beh = pd.DataFrame({"user_id": rows.user, "item_id": rows.item, "ts": rows.ts,
                        "play_ms": (rows.rating / 5 * dur).round().astype(int), "duration_ms": dur,
                        "rating": rows.rating.astype(np.float32)})
    imp = rows[rows.ts >= h1]
    imp = pd.DataFrame({"user_id": imp.user, "item_id": imp.item, "ts": imp.ts,
                        "label": (imp.rating >= 4).astype(int)})
    return beh.reset_index(drop=True), imp.reset_index(drop=True), {"history_end_ms": h1}


def test_movielens_ml100k_matches_plain_reference(done, params):
    d, _ = done["ml100k"]
    rows = pd.DataFrame([tuple(int(x) for x in t.split("\t")) for _, t in data_lines("movielens/ml-100k/u.data", False)],
                        columns=["user", "item", "rating", "t"])
    movies = {}
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
              "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
    for _, t in data_lines("movielens/ml-100k/u.item", False):
        f = t.split("|")
        flags = [i for i, x in enumerate(f[5:]) if x == "1" and i > 0]
        movies[int(f[0])] = flags[0] if flags else 0
    beh_ref, imp_ref, m = _ml_reference(rows, movies, params)
    items, beh, imp = tables(d)
    meta = json.loads((d / "raw/meta.json").read_text())
    assert meta["history_end_ms"] == m["history_end_ms"]
    assert meta["category_vocabulary"][:19] == genres
    assert dict(zip(items.item_id, items.category)) == movies
    assert (items.author_id == 0).all()
    pd.testing.assert_frame_equal(beh[beh_ref.columns], beh_ref, check_dtype=False)
    pd.testing.assert_frame_equal(imp[imp_ref.columns], imp_ref, check_dtype=False)
    assert beh.dtypes["rating"] == np.float32 and beh.dtypes["play_ms"] == np.int32


def test_movielens_layouts_agree(done):
    """ml-100k, ml-1m and RecBole fixtures hold the same ratings: same behaviours and impressions."""
    base = tables(done["ml100k"][0])
    for name in ("ml1m", "recbole"):
        other = tables(done[name][0])
        for a, b in zip(base[1:], other[1:]):
            pd.testing.assert_frame_equal(a, b)
    # ml-1m genres A|B and RecBole class tokens give the same first genre as their construction
    assert (tables(done["ml1m"][0])[0].category > 0).all()


def test_movielens_csv_half_stars_quoted_titles_and_new_genre_names(done):
    d, _ = done["mlcsv"]
    items, beh, imp = tables(d)
    with open(FIX / "movielens/ml-latest-small/movies.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(items) == len(rows) == 12
    cat = dict(zip(items.item_id, items.category))
    assert cat[12] == 0                                          # (no genres listed)
    first = {int(r["movieId"]): r["genres"].split("|")[0] for r in rows}
    children = [i for i, g in first.items() if g == "Children"]
    assert children and all(cat[i] == 4 for i in children)       # ml-20m "Children" == ml-100k "Children's"
    assert set(np.unique(beh.rating * 2) % 1) == {0.0} and (beh.rating % 1 == 0.5).any()
    np.testing.assert_array_equal(imp.label, 0 + (imp.merge(beh, on=["user_id", "item_id", "ts"]).rating >= 4))


def test_kuairand_matches_plain_reference(done, params):
    d, _ = done["kuairand"]
    with open(FIX / "kuairand/video_features_basic_fixture.csv", newline="") as f:
        vids = list(csv.DictReader(f))
    bad = {int(k) for k in DIRTY["kuairand/video_features_basic_fixture.csv"]}
    vids = [v for i, v in enumerate(vids, start=2) if i not in bad]
    cat = {int(v["video_id"]): int(v["tag"].split(",")[0]) if v["tag"] else 0 for v in vids}
    rows = []
    for rel in ("kuairand/log_random_4_11_to_4_12_fixture.csv", "kuairand/log_standard_4_08_to_4_10_fixture.csv"):
        lines = data_lines(rel, True)
        hdr = (FIX / rel).read_text(encoding="latin-1").split("\n")[0].split(",")
        rows += [dict(zip(hdr, t.split(","))) for _, t in lines]
    log = pd.DataFrame(rows)
    log = log[log.video_id.astype(int).isin(list(cat))]
    items, beh, imp = tables(d)
    assert dict(zip(items.item_id, items.category)) == cat
    assert (items.duration_ms > 0).all()
    ts = log.time_ms.astype(float).astype(np.int64)
    h1 = json.loads((d / "raw/meta.json").read_text())["history_end_ms"]
    click = log.is_click.astype(int)
    play = log.play_time_ms.astype(int)
    assert len(beh) == int(((click == 1) | (play > 0)).sum())
    assert len(imp) == int((ts >= h1).sum()) and imp.label.sum() == int(click[ts >= h1].sum())
    assert beh.liked.sum() == int(log.is_like.astype(int)[(click == 1) | (play > 0)].sum())
    assert set(zip(beh.user_id, beh.item_id, beh.ts, beh.play_ms)) == set(
        zip(log.user_id.astype(int)[(click == 1) | (play > 0)], log.video_id.astype(int)[(click == 1) | (play > 0)],
            ts[(click == 1) | (play > 0)], play[(click == 1) | (play > 0)]))
    # an empty log duration falls back to the item's duration
    empty = log[(log.duration_ms == "") & ((click == 1) | (play > 0))]
    assert len(empty) > 0
    dmap = dict(zip(items.item_id, items.duration_ms))
    for r in empty.itertuples():
        got = beh[(beh.user_id == int(r.user_id)) & (beh.ts == int(float(r.time_ms)))]
        assert (got.duration_ms == dmap[int(r.video_id)]).all()


def test_taobao_label_and_items_match_plain_reference(done, params):
    d, _ = done["taobao"]
    window = params["ingest"]["taobao"]["label_window_h"] * 3_600_000
    ev = [t.split(",") for _, t in data_lines("taobao/UserBehavior.csv", False)]
    ev = [(int(u), int(i), int(c), a, int(t) * 1000) for u, i, c, a, t in ev]
    conv = {}
    for u, i, _, a, t in ev:
        if a != "pv":
            conv.setdefault((u, i), []).append(t)
    meta = json.loads((d / "raw/meta.json").read_text())
    want = sorted((u, t, i, int(any(t <= x <= t + window for x in conv.get((u, i), []))))
                  for u, i, _, a, t in ev if a == "pv" and t >= meta["history_end_ms"])
    items, beh, imp = tables(d)
    got = sorted(zip(imp.user_id, imp.ts, imp.item_id, imp.label))
    assert got == want and 0 < imp.label.sum() < len(imp)
    assert len(beh) == len(ev) and beh.liked.sum() == sum(a != "pv" for *_, a, _ in ev)
    depth = {"pv": .25, "fav": .5, "cart": .75, "buy": 1.0}
    assert sorted(beh.play_ms) == sorted(round(depth[a] * 60_000) for *_, a, _ in ev)
    assert dict(zip(items.item_id, items.category)) == {i: c for _, i, c, _, _ in ev}
    assert items.category.min() >= 4_000_000                  # large ids kept as given


# ---------------------------------------------------------------- errors a user can act on


def test_clear_errors(tmp_path, params):
    from twinv2.errors import DataError

    with pytest.raises(FileNotFoundError, match="log_"):
        ingest.run("kuairand", tmp_path, tmp_path / "o", params=params, progress=False)
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml/u.data").write_text("1\t2\t3\t4\n")
    with pytest.raises(FileNotFoundError, match="u.item"):
        ingest.run("movielens", tmp_path / "ml", tmp_path / "o", params=params, progress=False)
    kr = tmp_path / "kr"
    kr.mkdir()
    (kr / "log_x.csv").write_text("user_id,video_id,time_ms\n1,2,3\n")
    (kr / "video_features_basic_x.csv").write_text((FIX / "kuairand/video_features_basic_fixture.csv").read_text())
    with pytest.raises(DataError, match=r"log_x.csv: header lacks columns \['is_click'"):
        ingest.run("kuairand", kr, tmp_path / "o", params=params, progress=False)
    with pytest.raises(ValueError, match="--format"):
        ingest.run("criteo", kr, tmp_path / "o", params=params, progress=False)


def test_cli(tmp_path, capsys):
    from pipelines.cli import main

    rc = main(["ingest", "--format", "taobao", "--src", str(FIX / "taobao"), "--out", str(tmp_path)])
    assert rc == 0 and "ingest taobao" in capsys.readouterr().out
    assert (tmp_path / "raw/meta.json").exists() and (tmp_path / "reports/ingest.json").exists()
    assert main(["ingest", "--format", "taobao", "--src", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2


# ---------------------------------------------------------------- ../shared data when present


@pytest.mark.shared
def test_shared_ml100k_recbole(tmp_path, params):
    src = shared_path("data", "ml-100k")
    r = ingest.run("movielens", src, tmp_path, params=params, progress=False)
    items, beh, imp = tables(tmp_path)
    assert r["n_users"] == beh.user_id.nunique() == 943
    assert r["rows"]["behaviors"] == 100_000 and r["lines_quarantined"] == 0
    assert r["files"][str(src / "ml-100k.inter")]["accepted"] == 100_000
    assert len(items) == 1682 and items.category.between(0, 18).all()
    assert r["event_roles"]["both"] == len(imp) and 0.4 < imp.label.mean() < 0.7


@pytest.mark.shared
def test_shared_kuairand_video_table_layout(tmp_path, params):
    src = shared_path("data", "kuairand-pure", "video_features_basic_pure.csv")
    kr = tmp_path / "kr"
    kr.mkdir()
    (kr / src.name).symlink_to(src)
    (kr / "log_standard_fixture.csv").write_bytes(
        (FIX / "kuairand/log_standard_4_08_to_4_10_fixture.csv").read_bytes())
    r = ingest.run("kuairand", kr, tmp_path / "o", params=params, progress=False)
    items, _, _ = tables(tmp_path / "o")
    assert len(items) == 7583 and r["files"][str(kr / src.name)]["quarantined"] == 0
    assert r["items_without_tag"] == 96 and (items.category == 0).sum() == 96
    assert items.category.max() == 68 and (items.duration_ms > 0).all()
    assert r["items_duration_from_logs"] + r["items_duration_median_filled"] == 239
