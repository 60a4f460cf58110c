"""The bad-input corpus of ingest (issue 15): every kind of bad line in every real-log format, each with
its exact expected counts and reason, the rules it pins (docs/data.md, "Rules for bad input"), an
all-or-nothing re-ingest, and a property test of random one-line corruptions per format (lines read =
accepted + quarantined; the split edges do not move).

Each source is written here from one list of clean events, so that every corruption is one visible edit
of one line."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines import ingest
from twinv2.errors import DataError

T0 = 1_600_000_000                      # 2020-09-13, seconds
N = 40                                  # clean events per source
BOM = b"\xef\xbb\xbf"


def clean_events() -> list[dict]:
    """40 events of 5 users over 10 days; every (user, item, ts) distinct; the extremes are lines 1 and 2."""
    rng = np.random.default_rng(0)
    ts = np.sort(rng.integers(T0 + 3600, T0 + 10 * 86400 - 3600, N - 2))
    ts = [T0, T0 + 10 * 86400, *ts.tolist()]
    return [{"user": str(1 + k % 5), "item": str(1 + (k * 7) % 10), "ts": str(t), "rating": str(1 + k % 5),
             "cat": str(100 + (1 + (k * 7) % 10) % 3), "action": ("pv", "pv", "fav", "buy")[k % 4]}
            for k, t in enumerate(ts)]


@dataclass
class Fmt:
    name: str
    adapter: str
    event_file: str                     # relative to the source dir
    header: str | None
    line: Callable[[dict], str]
    side: dict[str, bytes]              # other files
    ts_unit: int = 1                    # ts field = seconds * ts_unit
    ts_kind: str = "num"                # grammar kind of the ts field
    src: str = "."                      # --src relative to the source dir

    def write(self, d: Path, events: list[dict], edit: Callable[[list[bytes]], list[bytes]] | None = None) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self.side.items():
            (d / name).write_bytes(data)
        lines = [(self.line(e) + "\n").encode() for e in events]
        if edit is not None:
            lines = edit(lines)
        head = [(self.header + "\n").encode()] if self.header else []
        (d / self.event_file).write_bytes(b"".join(head + lines))
        return d / self.src

    @property
    def offset(self) -> int:            # file line number of event k is k + offset
        return 2 if self.header else 1


ITEMS = range(1, 11)
KR_LOG_HEADER = ("user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,"
                 "long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab")
KR_VIDEO_HEADER = ("video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,server_width,"
                   "server_height,music_id,music_type,tag")


def kr_video(i, author="7", duration="30000.0", tag=None) -> str:
    tag = f'"{i},5"' if tag is None else tag
    return f"{i},{author},NORMAL,2022-04-10,Web,0.0,{duration},720.0,1280.0,900,9.0,{tag}"


def kr_videos(lines: list[str] | None = None) -> bytes:
    return ("\n".join([KR_VIDEO_HEADER, *(lines or [kr_video(i) for i in ITEMS])]) + "\n").encode()


def kr_line(e: dict) -> str:
    ts = e["ts"] if e.get("raw_ts") else f"{e['ts']}000"
    return (f"{e['user']},{e['item']},20200913,1200,{ts},1,0,0,0,0,0,1,{e.get('play', '1500')},"
            f"{e.get('dur', '30000')},0,0,0,0,1")


ML100K_ITEM = b"".join(f"{i}|Film {i} (1995)|01-Jan-1995||http://x|0|1{'|0' * 17}\n".encode() for i in ITEMS)
FORMATS = {
    "kuairand": Fmt("kuairand", "kuairand", "log_standard_x.csv", KR_LOG_HEADER, kr_line,
                    {"video_features_basic_x.csv": kr_videos()}, ts_unit=1000),
    "ml100k": Fmt("ml100k", "movielens", "u.data", None,
                  lambda e: f"{e['user']}\t{e['item']}\t{e['rating']}\t{e['ts']}", {"u.item": ML100K_ITEM}),
    "ml1m": Fmt("ml1m", "movielens", "ratings.dat", None,
                lambda e: f"{e['user']}::{e['item']}::{e['rating']}::{e['ts']}",
                {"movies.dat": b"".join(f"{i}::Film {i} (1995)::Comedy|Drama\n".encode() for i in ITEMS)}),
    "mlcsv": Fmt("mlcsv", "movielens", "ratings.csv", "userId,movieId,rating,timestamp",
                 lambda e: f"{e['user']},{e['item']},{e['rating']},{e['ts']}",
                 {"movies.csv": b"movieId,title,genres\n" + b"".join(
                     f'{i},"Film, {i} (1995)",Comedy|Drama\n'.encode() for i in ITEMS)}),
    "recbole": Fmt("recbole", "movielens", "ml.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float",
                   lambda e: f"{e['user']}\t{e['item']}\t{e['rating']}\t{e['ts']}",
                   {"ml.item": b"item_id:token\tmovie_title:token_seq\tclass:token_seq\n" + b"".join(
                       f"{i}\tFilm {i}\tComedy Drama\n".encode() for i in ITEMS)}),
    "taobao": Fmt("taobao", "taobao", "UserBehavior.csv", None,
                  lambda e: f"{e['user']},{e['item']},{e['cat']},{e['action']},{e['ts']}", {},
                  ts_kind="int", src="UserBehavior.csv"),
}


def no_taobao_range(params) -> dict:
    """Taobao's configured range is the real dataset's 9 days; the corpus lives in 2020: use the robust one."""
    p = copy.deepcopy(params)
    p["ingest"]["taobao"]["ts_range_ms"] = None
    return p


@pytest.fixture(scope="module")
def P(params):
    return no_taobao_range(params)


def run(fmt: Fmt, d: Path, params, events=None, edit=None):
    src = fmt.write(d / "src", clean_events() if events is None else events, edit)
    return ingest.run(fmt.adapter, src, d / "out", params=params, progress=False)


def quarantine(d: Path) -> list[tuple[str, int, str, str]]:
    q = pq.read_table(d / "out/quarantine/ingest.parquet").to_pandas()
    return [(Path(f).name, int(ln), r, det) for f, ln, r, det in zip(q.file, q.line, q.reason, q.detail)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, P):
    out = {}
    for name, fmt in FORMATS.items():
        d = tmp_path_factory.mktemp(f"clean-{name}")
        out[name] = run(fmt, d, P)
    return out


def test_clean_sources_are_accepted_whole(clean):
    for name, r in clean.items():
        assert r["lines_quarantined"] == 0, (name, r["quarantined"])
        assert r["rows"]["behaviors"] == N and r["n_users"] == 5, name
        assert r["ts_range"]["source"] == "robust"
        assert (r["bounds"]["history_start_ms"], r["bounds"]["end_ms"]) == (T0 * 1000, (T0 + 10 * 86400) * 1000)


# ---------------------------------------------------------------- the corpus: one bad line, exact outcome

K = 10                                  # the event (0-based) that is corrupted: a middle one, not an extreme


def with_event(**over) -> Callable[[list[dict]], list[dict]]:
    def f(events):
        events = copy.deepcopy(events)
        events[K].update(over)
        return events
    return f


# kind: (edit of the events, {format: reason}; a format absent = the kind does not apply to it)
ALL = tuple(FORMATS)
ML = ("ml100k", "ml1m", "mlcsv", "recbole")
CORPUS = {
    # a truncated timestamp (the issue's `...,965031`): a 1970 date, outside the log's robust range
    "ts_truncated": (lambda ev: with_event(ts=ev[K]["ts"][:6])(ev), dict.fromkeys(ALL, "ts_out_of_range")),
    # a plausible-looking date 8 years after the log: outside the robust range
    "ts_far_future": (with_event(ts=str(T0 + 8 * 365 * 86400)), dict.fromkeys(ALL, "ts_out_of_range")),
    # year 2300: outside the hard range of any log
    "ts_year_2300": (with_event(ts="10413792000"), dict.fromkeys(ALL, "ts_out_of_range")),
    # 1e30: a number the grammar takes for a float ts (outside the hard range), not for Taobao's integer
    "ts_1e30": (with_event(ts="1e30"), {**dict.fromkeys(("kuairand", *ML), "ts_out_of_range"),
                                        "taobao": "not_numeric"}),
    # digits beyond int64 in a ts field: a float ts (huge) or Taobao's integer (overflow)
    "ts_huge_digits": (with_event(ts="9" * 25), {**dict.fromkeys(("kuairand", *ML), "ts_out_of_range"),
                                                 "taobao": "overflow"}),
    # an id beyond int64 (the "CSV conversion error to int64")
    "huge_user_id": (with_event(user="1234567890123456789012345"), dict.fromkeys(ALL, "overflow")),
    "huge_item_id": (with_event(item="99999999999999999999"), dict.fromkeys(ALL, "overflow")),
    # 19 digits above 9e18: still refused (documented bound)
    "int64_edge_id": (with_event(user="9223372036854775807"), dict.fromkeys(ALL, "overflow")),
    # a category beyond int32 (items.category)
    "huge_category": (with_event(cat="3000000000"), {"taobao": "overflow"}),
    # a play time beyond int32 (behaviors.play_ms)
    "huge_play_time": (with_event(play="3000000000"), {"kuairand": "overflow"}),
    # negative ids
    "negative_user": (with_event(user="-3"), dict.fromkeys(ALL, "negative_id")),
    "negative_item": (with_event(item="-4"), dict.fromkeys(ALL, "negative_id")),
    "negative_category": (with_event(cat="-5"), {"taobao": "negative_id"}),
}


@pytest.mark.parametrize("name,kind", [(n, k) for k, (_, reasons) in CORPUS.items() for n in reasons])
def test_corpus_one_bad_line(tmp_path, P, clean, name, kind):
    edit_events, reasons = CORPUS[kind]
    fmt = FORMATS[name]
    r = run(fmt, tmp_path, P, events=edit_events(clean_events()))
    q = quarantine(tmp_path)
    assert [(f, ln, reason) for f, ln, reason, _ in q] == [(Path(fmt.event_file).name, K + fmt.offset, reasons[name])]
    assert len(q[0][3]) > 10                                           # a detail a user can read
    assert r["lines_read"] == N + (len(fmt.side) and 0) + sum(v["lines"] for f, v in r["files"].items()
                                                              if not f.endswith(fmt.event_file))
    ev = r["files"][str(tmp_path / "src" / fmt.event_file)]
    assert (ev["lines"], ev["accepted"], ev["quarantined"]) == (N, N - 1, 1)
    assert r["lines_read"] == r["lines_accepted"] + r["lines_quarantined"]
    assert r["quarantined"] == {reasons[name]: 1}
    assert r["rows"]["behaviors"] == N - 1
    # the split edges are those of the clean source: one bad line cannot move them
    assert r["bounds"] == clean[name]["bounds"]


@pytest.mark.parametrize("name", list(FORMATS))
def test_duplicate_event_line_is_quarantined_first_kept(tmp_path, P, clean, name):
    """Rule: a second line with the same (user, item, ts) (Taobao: and action) is one event twice: the first
    line is kept, the later ones are quarantined (duplicate_event) naming the kept line."""
    fmt = FORMATS[name]
    r = run(fmt, tmp_path, P, edit=lambda lines: lines + [lines[K]])
    q = quarantine(tmp_path)
    assert [(f, ln, reason) for f, ln, reason, _ in q] == [(Path(fmt.event_file).name, N + fmt.offset, "duplicate_event")]
    assert f"line {K + fmt.offset} of {Path(fmt.event_file).name}" in q[0][3]
    assert r["rows"]["behaviors"] == N and r["lines_read"] - r["lines_accepted"] == 1
    assert r["bounds"] == clean[name]["bounds"]


@pytest.mark.parametrize("name", ["mlcsv", "ml100k", "taobao", "kuairand"])
def test_truncated_last_line_without_newline(tmp_path, P, clean, name):
    """The issue's case: the file ends in the middle of the last line's timestamp (`...,965031`, no
    newline): a 1970 date, quarantined; before, it became the span's start and emptied train and valid."""
    fmt = FORMATS[name]

    def cut(lines):
        last = lines[K]
        i = last.index(b"1600")                 # the ts field (seconds or ms): keep its first 6 digits
        return [*lines[:K], *lines[K + 1:], last[:i + 6]]
    r = run(fmt, tmp_path, P, edit=cut)
    q = quarantine(tmp_path)
    assert [(f, ln, reason) for f, ln, reason, _ in q] == [(Path(fmt.event_file).name, N - 1 + fmt.offset,
                                                            "field_count" if name == "kuairand" else "ts_out_of_range")]
    assert r["bounds"] == clean[name]["bounds"]
    assert all(v > 0 for v in r["rows"]["impressions_by_split"].values())


def test_taobao_pv_and_buy_of_one_second_are_two_events(tmp_path, P):
    fmt = FORMATS["taobao"]
    ev = clean_events()
    ev.append({**ev[K], "action": "buy" if ev[K]["action"] != "buy" else "pv"})
    r = run(fmt, tmp_path, P, events=ev)
    assert r["lines_quarantined"] == 0 and r["rows"]["behaviors"] == N + 1


@pytest.mark.parametrize("name", list(FORMATS))
def test_bom_at_the_start_of_a_file_is_ignored(tmp_path, P, clean, name):
    """Rule: a UTF-8 byte-order mark at the start of any file (header or not, event or item file) is not
    part of its first line."""
    fmt = FORMATS[name]
    fmt = Fmt(**{**fmt.__dict__, "side": {k: BOM + v for k, v in fmt.side.items()}})
    if fmt.header:
        fmt.header = "\ufeff" + fmt.header
        edit = None
    else:
        def edit(lines):
            return [BOM + lines[0], *lines[1:]]
    r = run(fmt, tmp_path, P, edit=edit)
    assert r["lines_quarantined"] == 0, r["quarantined"]
    assert r["rows"]["behaviors"] == N and r["rows"]["items"] == clean[name]["rows"]["items"]
    assert r["bounds"] == clean[name]["bounds"]


def test_kuairand_video_table_bad_values(tmp_path, P):
    """Video lines: a tag beyond int32 (overflow), negative ids (negative_id), a duration beyond int32."""
    fmt = FORMATS["kuairand"]
    vids = [kr_video(i) for i in ITEMS]
    vids[2] = kr_video(3, tag='"3000000000,5"')
    vids[3] = kr_video(4, author="-1")
    vids[4] = kr_video(5, duration="3000000000.0")
    vids.append(kr_video(-11))
    vids.append(kr_video(12, tag="-2"))
    fmt = Fmt(**{**fmt.__dict__, "side": {"video_features_basic_x.csv": kr_videos(vids)}})
    events = [e for e in clean_events() if e["item"] not in ("3", "4", "5")]
    run(fmt, tmp_path, P, events=events)
    q = sorted((f, ln, r) for f, ln, r, _ in quarantine(tmp_path))
    assert q == [("video_features_basic_x.csv", 4, "overflow"), ("video_features_basic_x.csv", 5, "negative_id"),
                 ("video_features_basic_x.csv", 6, "overflow"), ("video_features_basic_x.csv", 12, "negative_id"),
                 ("video_features_basic_x.csv", 13, "negative_id")]


@pytest.mark.parametrize("name", ["ml100k", "mlcsv"])
def test_movielens_item_file_bad_ids(tmp_path, P, name):
    fmt = FORMATS[name]
    side = dict(fmt.side)
    item_file = next(iter(side))
    lines = side[item_file].split(b"\n")
    first = 1 if name == "mlcsv" else 0
    lines[first + 2] = lines[first + 2].replace(b"3", b"-3", 1)
    lines[first + 3] = lines[first + 3].replace(b"4", b"12345678901234567890123", 1)
    side[item_file] = b"\n".join(lines)
    fmt = Fmt(**{**fmt.__dict__, "side": side})
    events = [e for e in clean_events() if e["item"] not in ("3", "4")]
    r = run(fmt, tmp_path, P, events=events)
    q = [(f, ln, reason) for f, ln, reason, _ in quarantine(tmp_path)]
    assert q == [(item_file, first + 3, "negative_id"), (item_file, first + 4, "overflow")]
    assert r["rows"]["items"] == 8


# ---------------------------------------------------------------- configured range, no valid line, atomicity


def test_configured_ts_range_quarantines_outside_and_sets_the_span(tmp_path, P):
    p = copy.deepcopy(P)
    p["ingest"]["ts_range_ms"] = [(T0 + 86400) * 1000, (T0 + 9 * 86400) * 1000]
    fmt = FORMATS["mlcsv"]
    r = run(fmt, tmp_path, p)
    ts = sorted(int(e["ts"]) * 1000 for e in clean_events())
    inside = [t for t in ts if p["ingest"]["ts_range_ms"][0] <= t < p["ingest"]["ts_range_ms"][1]]
    assert r["quarantined"] == {"ts_out_of_range": N - len(inside)} and N - len(inside) >= 2
    assert (r["bounds"]["history_start_ms"], r["bounds"]["end_ms"]) == (inside[0], inside[-1])
    assert r["ts_range"]["source"] == "configured"
    assert all("configured range" in det for *_, det in quarantine(tmp_path))


def test_no_valid_event_line_points_to_a_quarantine_that_exists(tmp_path, P):
    fmt = FORMATS["ml100k"]
    with pytest.raises(DataError, match="no valid event line") as e:
        run(fmt, tmp_path, P, edit=lambda lines: [b"x" + ln for ln in lines])
    msg = str(e.value)
    failed = tmp_path / "out/quarantine/ingest.failed.parquet"
    assert str(failed) in msg and failed.exists()
    assert len(pq.read_table(failed)) == N
    assert not (tmp_path / "out/raw").exists()


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_failed_reingest_leaves_the_previous_raw_whole(tmp_path, P, monkeypatch):
    """Ingest A, then a failing ingest of B into the same DIR: raw/ and the quarantine are A's, byte for
    byte, and no work folder is left; a later successful ingest of B replaces everything."""
    a = FORMATS["ml100k"]
    d = tmp_path
    run(a, d, P, edit=lambda lines: lines + [b"garbage\n"])
    before = _digest(d / "out/raw")
    q_before = (d / "out/quarantine/ingest.parquet").read_bytes()
    # B: another source; fails in pass 2, after behaviours were written
    b = FORMATS["mlcsv"]
    src_b = b.write(d / "src_b", [e for k, e in enumerate(clean_events()) if k % 4 != 3])   # 30, every split
    from twinv2.data.adapters import movielens

    def boom(self, ev, bounds):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(movielens.MovieLens, "finalize", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ingest.run("movielens", src_b, d / "out", params=P, progress=False)
    assert _digest(d / "out/raw") == before
    assert (d / "out/quarantine/ingest.parquet").read_bytes() == q_before
    assert not list((d / "out").glob(".ingest-work.*"))
    # the "no valid line" failure leaves it whole too
    monkeypatch.undo()
    bad = b.write(d / "src_c", clean_events(), edit=lambda lines: [b"x" + ln for ln in lines])
    with pytest.raises(DataError):
        ingest.run("movielens", bad, d / "out", params=P, progress=False)
    assert _digest(d / "out/raw") == before
    r = ingest.run("movielens", src_b, d / "out", params=P, progress=False)
    assert r["rows"]["behaviors"] == 30 and _digest(d / "out/raw") != before
    assert json.loads((d / "out/raw/meta.json").read_text())["layout"] == "csv"
    assert not (d / "out/quarantine/ingest.failed.parquet").exists()


def test_work_folder_of_a_killed_run_is_cleaned_and_a_half_switch_repaired(tmp_path, P):
    from twinv2.data.adapters.common import clean_stale
    from twinv2.io import owner_tag

    dead_tag = owner_tag().replace(f"@{os.getpid()}@", "@999999999@")       # this host, a process that is gone
    a = FORMATS["ml1m"]
    run(a, tmp_path, P)
    out = tmp_path / "out"
    before = _digest(out / "raw")
    # a run killed between the two renames of the switch: raw/ moved into its work folder, no new raw/
    dead = out / f".ingest-work.{dead_tag}abc"
    dead.mkdir()
    (out / "raw").rename(dead / "old-raw")
    assert clean_stale(out) == [dead.name]
    assert _digest(out / "raw") == before and not dead.exists()
    # a killed run's leftovers are removed by the next ingest
    (out / f".ingest-work.{dead_tag}def/spill").mkdir(parents=True)
    (out / f".ingest-work.{owner_tag()}live").mkdir()                       # a live run's: kept
    r = run(a, tmp_path, P)
    assert r["stale_work_removed"] == [f".ingest-work.{dead_tag}def"]
    assert (out / f".ingest-work.{owner_tag()}live").exists()


# ---------------------------------------------------------------- property: random one-line corruptions


def _fields(fmt: Fmt, line: bytes) -> tuple[bytes, list[bytes]]:
    delim = {"kuairand": b",", "mlcsv": b",", "taobao": b",", "ml1m": b"::"}.get(fmt.name, b"\t")
    return delim, line.rstrip(b"\n").split(delim)


USED = {"kuairand": [0, 1, 4, 5, 12, 13], "ml100k": [0, 1, 2, 3], "ml1m": [0, 1, 2, 3], "mlcsv": [0, 1, 2, 3],
        "recbole": [0, 1, 2, 3], "taobao": [0, 1, 2, 3, 4]}
TS_FIELD = {"kuairand": 4, "taobao": 4}                       # MovieLens: 3


@st.composite
def corruption(draw, fmt: Fmt):
    """(line index, kind, edit of that line): every edit must make the line rejected."""
    k = draw(st.integers(2, N - 1))                            # never line 0/1: they hold the span's ends
    kind = draw(st.sampled_from(["cut_ts", "letter", "drop_delim", "huge_int", "bad_ts", "bad_byte", "negative",
                                 "empty"]))
    f = draw(st.sampled_from(USED[fmt.name]))
    pos = draw(st.integers(0, 30))
    letter = draw(st.sampled_from(list("xQ_#/ ")))
    digits = draw(st.integers(20, 40))
    year = draw(st.sampled_from(["4102444800", "10413792000", "1e30", "-1600000000", "5000000000"]))

    def edit(line: bytes) -> bytes:
        delim, fs = _fields(fmt, line)
        ts_i = TS_FIELD.get(fmt.name, 3)
        if kind == "cut_ts":                                   # keep 1 .. len-1 digits of the ts (a /10 at least)
            v = fs[ts_i]
            fs[ts_i] = v[:1 + pos % (len(v) - 1)]
        elif kind == "letter":
            v = fs[f]
            i = pos % (len(v) + 1)
            fs[f] = v[:i] + letter.encode() + v[i:]
        elif kind == "drop_delim":
            i = pos % (len(fs) - 1)
            fs[i:i + 2] = [fs[i] + fs[i + 1]]
        elif kind == "huge_int":
            fs[f if f != 2 or fmt.name != "kuairand" else 0] = b"7" * digits
        elif kind == "bad_ts":
            fs[ts_i] = (year + ("000" if fmt.name == "kuairand" else "")).encode()
        elif kind == "bad_byte":
            v = fs[f]
            i = pos % (len(v) + 1)
            fs[f] = v[:i] + b"\xff" + v[i:]
        elif kind == "negative":
            fs[[0, 1][pos % 2]] = b"-" + fs[[0, 1][pos % 2]]
        elif kind == "empty":
            return b"\n"
        return delim.join(fs) + b"\n"

    return k, kind, edit


@pytest.mark.parametrize("name", list(FORMATS))
def test_property_one_random_corrupt_line(name, P, clean):
    fmt = FORMATS[name]

    @settings(max_examples=12, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(corruption(fmt))
    def check(c):
        k, kind, edit = c
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)

            def apply(lines):
                lines = list(lines)
                lines[k] = edit(lines[k])
                return lines
            r = run(fmt, d, P, edit=apply)
            q = quarantine(d)
            assert [(f, ln) for f, ln, _, _ in q] == [(Path(fmt.event_file).name, k + fmt.offset)], (kind, q)
            assert r["lines_read"] == r["lines_accepted"] + r["lines_quarantined"]
            for fc in r["files"].values():
                assert fc["lines"] == fc["accepted"] + fc["quarantined"]
            assert r["rows"]["behaviors"] == N - 1
            assert r["bounds"] == clean[name]["bounds"], (kind, q)

    check()
