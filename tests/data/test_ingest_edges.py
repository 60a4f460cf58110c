"""Issue 32's ingest edge cases, each in every format that has it (the sources are written by the bad-input
corpus of test_bad_input.py): times in another unit, a log spanning zero time, an empty split, Taobao's pv and
buy of one second (ingest and validate agree), a bad byte in an unread field, the messages of empty and
CR-only files, and kill -9 inside the publish window (a real SIGKILL)."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import ingest
from tests.data.test_bad_input import (FORMATS, ITEMS, KR_VIDEO_HEADER, T0, Fmt, clean_events, kr_video,
                                       no_taobao_range, quarantine, run)
from twinv2.errors import DataError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def P(params):
    return no_taobao_range(params)


def many_events(n: int = 300) -> list[dict]:
    """n events of 10 users over 10 days (distinct (user, item, ts)); lines 0 and 1 hold the span's ends."""
    rng = np.random.default_rng(1)
    ts = np.sort(rng.choice(np.arange(T0 + 3600, T0 + 10 * 86400 - 3600), n - 2, replace=False))
    ts = [T0, T0 + 10 * 86400, *ts.tolist()]
    return [{"user": str(1 + k % 10), "item": str(1 + (k * 7) % 10), "ts": str(t), "rating": str(1 + k % 5),
             "cat": str(100 + (1 + (k * 7) % 10) % 3), "action": ("pv", "pv", "fav", "buy")[k % 4]}
            for k, t in enumerate(ts)]


# ---------------------------------------------------------------- 1. a few times in the wrong unit


@pytest.mark.parametrize("name", list(FORMATS))
def test_fifteen_of_300_times_in_the_other_unit_are_quarantined(tmp_path, P, name):
    """The issue's case: 15 of 300 KuaiRand time_ms in seconds read as January 1970 and, with more than 1% of
    the lines, escaped the robust range (split 0 / 0 / 285). Now they are quarantined before the span is
    computed, whatever the share; in the formats timed in seconds the other unit (ms) is beyond 2100."""
    fmt = FORMATS[name]
    clean = run(fmt, tmp_path / "clean", P, events=many_events())
    ev = many_events()
    bad = list(range(20, 300, 19))[:15]
    for k in bad:
        ev[k] = {**ev[k], "ts": str(int(ev[k]["ts"]) // 1000) if name == "kuairand" else ev[k]["ts"] + "000"}
        if name == "kuairand":
            ev[k]["raw_ts"] = True          # kr_line appends 000 (seconds -> ms): here the seconds stay
    r = run(fmt, tmp_path / "bad", P, events=ev)
    q = quarantine(tmp_path / "bad")
    assert sorted(ln for _, ln, _, _ in q) == [k + fmt.offset for k in bad]
    assert {reason for _, _, reason, _ in q} == {"ts_out_of_range"}
    if name == "kuairand":
        assert all("another unit" in det and "seconds where milliseconds" in det for *_, det in q), q[0]
    assert r["rows"]["behaviors"] == 300 - 15
    assert all(v > 0 for v in r["rows"]["impressions_by_split"].values())
    assert r["bounds"] == clean["bounds"]


# ---------------------------------------------------------------- 1-2. zero span, empty split (ingest)


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_log_spanning_zero_time_is_refused(tmp_path, P, name):
    fmt = FORMATS[name]
    ev = [{**e, "ts": str(T0 + 5 * 86400)} for e in clean_events()]
    ev = list({(e["user"], e["item"]): e for e in ev}.values())            # no duplicate events
    with pytest.raises(DataError, match="spans zero time") as e:
        run(fmt, tmp_path, P, events=ev)
    assert "raw is unchanged" in str(e.value) and not (tmp_path / "out/raw").exists()


@pytest.mark.parametrize("name", list(FORMATS))
def test_an_empty_split_after_ingest_is_refused(tmp_path, P, name):
    """Events bunched at the end of the span (three early events, inside the robust range): history holds the
    early ones, train and valid are empty. Before, ingest exited 0 with train 0 / valid 0."""
    fmt = FORMATS[name]
    ev = clean_events()
    ev = [{**e, "ts": str(T0 + 60 * k if k < 3 else T0 + 10 * 86400 - 60 * k)} for k, e in enumerate(ev)]
    with pytest.raises(DataError, match="time split leaves train and valid without impressions"):
        run(fmt, tmp_path, P, events=ev)
    assert (tmp_path / "out/quarantine/ingest.failed.parquet").exists()


# ---------------------------------------------------------------- 3. Taobao: one rule in ingest and validate


def test_taobao_pv_and_buy_of_one_second_one_rule_in_ingest_and_validate(tmp_path, P):
    from pipelines import validate
    from twinv2.data.adapters import common
    from twinv2.validation import rules

    fmt = FORMATS["taobao"]
    ev = clean_events()
    extra = [{**e, "action": "buy"} for e in ev[2:12] if e["action"] == "pv"]
    assert extra
    r = run(fmt, tmp_path, P, events=ev + extra)
    assert r["lines_quarantined"] == 0 and r["rows"]["behaviors"] == len(ev) + len(extra)
    meta = json.loads((tmp_path / "out/raw/meta.json").read_text())
    assert meta["event_key"] == ["user_id", "item_id", "ts", "action"]
    p = copy.deepcopy(P)
    p["validate"]["gx_confirm"] = True
    v = validate.run(tmp_path / "out", p)
    assert v["tables"]["behaviors"]["quarantined"] == 0, v["tables"]["behaviors"]
    assert common.repeated_events is rules.repeated_events          # one function, both stages
    # the same line twice (same action) is one event twice: ingest quarantines the second
    r = run(fmt, tmp_path / "dup", P, events=ev + [ev[4]])
    assert r["quarantined"] == {"duplicate_event": 1}


# ---------------------------------------------------------------- 4. a bad byte in an unread field


@pytest.mark.parametrize("name", ["mlcsv", "recbole"])
def test_a_latin1_byte_in_a_title_keeps_the_movie(tmp_path, P, name):
    fmt = FORMATS[name]
    item_file, data = next(iter(fmt.side.items()))
    data = data.replace(b"Film, 3 (1995)" if name == "mlcsv" else b"Film 3\t", b"Caf\xe9 3 (1995)" if name == "mlcsv"
                        else b"Caf\xe9 3\t")
    r = run(Fmt(**{**fmt.__dict__, "side": {item_file: data}}), tmp_path, P)
    assert r["lines_quarantined"] == 0, quarantine(tmp_path)
    assert r["rows"]["items"] == 10 and r["rows"]["behaviors"] == 40
    assert r["items_undecodable_text_kept"] == 1


@pytest.mark.parametrize("name", ["mlcsv", "kuairand"])
def test_events_of_a_quarantined_item_line_say_so(tmp_path, P, name):
    """A bad byte in a field that is read (the genres; KuaiRand's tag) quarantines the item's line, and its
    events say that line was quarantined (quarantined_item), not that the item is missing."""
    fmt = FORMATS[name]
    if name == "mlcsv":
        side = {"movies.csv": fmt.side["movies.csv"].replace(b'3 (1995)",Comedy', b'3 (1995)",Com\xe9dy')}
    else:
        vids = [kr_video(i) for i in ITEMS]
        side = {"video_features_basic_x.csv": ("\n".join([KR_VIDEO_HEADER, *vids]) + "\n").encode().replace(
            b'3,7,NORMAL', b'3,7,NORMAL', 1).replace(b'"3,5"', b'"3\xe9,5"')}
    r = run(Fmt(**{**fmt.__dict__, "side": side}), tmp_path, P)
    q = quarantine(tmp_path)
    item_rows = [x for x in q if x[0] == next(iter(side))]
    assert [(ln, reason) for _, ln, reason, _ in item_rows] == [(4, "bad_encoding")]
    events = [x for x in q if x[0] != next(iter(side))]
    n3 = sum(e["item"] == "3" for e in clean_events())
    assert len(events) == n3 > 0 and {x[2] for x in events} == {"quarantined_item"}
    assert "line 4 of" in events[0][3] and "bad_encoding" in events[0][3] and "is not in" not in events[0][3]
    assert "unknown_item" not in r["quarantined"]


# ---------------------------------------------------------------- 6. messages


@pytest.mark.parametrize("name", ["kuairand", "mlcsv", "recbole"])
def test_a_header_only_event_file_says_no_data_after_the_header(tmp_path, P, name):
    with pytest.raises(DataError, match="no data after the header"):
        run(FORMATS[name], tmp_path, P, events=[])


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_cr_only_file_is_named_and_not_printed_whole(tmp_path, P, name):
    fmt = FORMATS[name]
    src = fmt.write(tmp_path / "src", clean_events())
    f = tmp_path / "src" / fmt.event_file
    f.write_bytes(f.read_bytes().replace(b"\n", b"\r"))                 # classic Mac OS line endings
    with pytest.raises(DataError, match="CR alone") as e:
        ingest.run(fmt.adapter, src, tmp_path / "out", params=P, progress=False)
    msg = str(e.value)
    assert len(msg) < 600, msg
    if fmt.header:
        assert "no data after the header" in msg
        # the header line holds the whole file: the header check must not print it either
    assert str(tmp_path / "src" / fmt.event_file) in msg


@pytest.mark.parametrize("name,content", [("mlcsv", b""), ("mlcsv", b"movieId,title,genres\n"),
                                          ("ml100k", b""), ("kuairand", KR_VIDEO_HEADER.encode() + b"\n")])
def test_an_empty_item_file_is_blamed_on_itself(tmp_path, P, name, content):
    fmt = FORMATS[name]
    item_file = next(iter(fmt.side))
    with pytest.raises(DataError) as e:
        run(Fmt(**{**fmt.__dict__, "side": {item_file: content}}), tmp_path, P)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "src" / item_file)), msg
    assert ("no data after the header" if content else "the file is empty") in msg


def test_details_print_plain_numbers_and_the_files_header_names(tmp_path, P):
    fmt = FORMATS["mlcsv"]
    ev = clean_events()
    ev[10] = {**ev[10], "ts": "1e30"}
    ev[11] = {**ev[11], "user": "-3"}
    run(fmt, tmp_path, P, events=ev)
    det = {ln: d for _, ln, _, d in quarantine(tmp_path)}
    assert "np." not in det[12] and "1e+30" in det[12] and "'timestamp'" in det[12], det[12]
    assert "'userId'" in det[13], det[13]


def test_an_old_failed_quarantine_does_not_outlive_a_later_failure(tmp_path, P):
    fmt = FORMATS["mlcsv"]
    with pytest.raises(DataError, match="no valid event line"):
        run(fmt, tmp_path, P, edit=lambda lines: [b"x" + ln for ln in lines])
    failed = tmp_path / "out/quarantine/ingest.failed.parquet"
    assert failed.exists()
    bad_header = Fmt(**{**fmt.__dict__, "header": "user,movie,rating,timestamp"})
    with pytest.raises(DataError, match="header lacks columns"):
        run(bad_header, tmp_path, P)
    assert not failed.exists()


def test_the_error_does_not_share_its_line_with_the_progress_bar(tmp_path, P):
    """A failure inside the progress loop (the second log's header lacks columns): the CLI's error line
    starts a line of its own on stderr."""
    fmt = FORMATS["kuairand"]
    src = fmt.write(tmp_path / "src", clean_events())
    (src / "log_zz.csv").write_text("user_id,video_id\n1,2\n")
    env = {**os.environ, "TWINV2_PROGRESS_INTERVAL_S": "0"}
    p = subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", "--format", "kuairand", "--src", str(src),
                        "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    err_lines = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert err_lines and all(ln.startswith("twinv2 ingest: ") for ln in err_lines), p.stderr
    assert "ingest kuairand" in p.stderr                          # the bar was there


# ---------------------------------------------------------------- 5. kill -9 inside the publish window


def _state(out: Path) -> tuple:
    """(the source of raw/, of the published quarantine, of the published report): equal when consistent."""
    meta = json.loads((out / "raw/meta.json").read_text())
    rep = json.loads((out / "reports/ingest.json").read_text())
    q = pq.read_table(out / "quarantine/ingest.parquet").to_pandas()
    return meta["src"], rep["src"], len(q), rep["lines_quarantined"]


@pytest.mark.parametrize("exchange", [True, False])
def test_kill_9_inside_the_publish_window_leaves_one_whole_dataset(tmp_path, P, exchange):
    fmt = FORMATS["mlcsv"]
    src_a = fmt.write(tmp_path / "a", clean_events(), edit=lambda lines: lines + [b"garbage\n"])
    src_b = fmt.write(tmp_path / "b", clean_events())
    out = tmp_path / "out"
    ingest.run("movielens", src_a, out, params=P, progress=False)
    a = _state(out)
    assert a == (str(src_a), str(src_a), 1, 1)
    assert (out / "quarantine/ingest.parquet").is_symlink() and (out / "reports/ingest.json").is_symlink()
    marker = tmp_path / "in-window"
    env = {**os.environ, "TWINV2_INGEST_PAUSE_IN_PUBLISH": str(marker),
           "TWINV2_INGEST_NO_EXCHANGE": "0" if exchange else "1"}
    code = ("import json, sys; from pipelines import ingest; "
            f"ingest.run('movielens', {str(src_b)!r}, {str(out)!r}, params=json.loads(sys.argv[1]), progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(P)], cwd=REPO, env=env)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the publisher never reached its window"
    where = marker.read_text().split()[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if exchange and where == "exchanged":
        assert _state(out) == (str(src_b), str(src_b), 0, 0)      # the new dataset, whole
    else:                                                        # between the two renames: no raw/, no mix
        assert where == "between-renames" and not (out / "raw").exists()
    assert list(out.glob(".ingest-work.*"))                      # the killed run's leftover
    # the next run detects and repairs it, then publishes its own dataset whole
    r = ingest.run("movielens", src_a, out, params=P, progress=False)
    assert len(r["stale_work_removed"]) == 1 and not list(out.glob(".ingest-work.*"))
    assert _state(out) == a


def test_the_repair_alone_puts_the_previous_raw_back(tmp_path, P):
    """Killed between the two renames of the fallback: clean_stale (run first by every ingest) restores it."""
    from twinv2.data.adapters.common import clean_stale
    from twinv2.io import owner_tag

    fmt = FORMATS["ml1m"]
    run(fmt, tmp_path, P)
    out = tmp_path / "out"
    before = _state(out)
    dead = out / f".ingest-work.{owner_tag().replace(f'@{os.getpid()}@', '@999999999@')}abc"
    dead.mkdir()
    (out / "raw").rename(dead / "old-raw")
    assert clean_stale(out) == [dead.name] and _state(out) == before
