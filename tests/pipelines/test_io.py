"""Outputs honour the process umask; temporaries of killed runs are removed by the next run, a live run's never."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from twinv2 import io

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.fixture(autouse=True)
def fresh_sweep():
    io._SWEPT.clear()
    yield
    io._SWEPT.clear()


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask, fmode, dmode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o002, 0o664, 0o775)])
def test_atomic_outputs_honour_the_umask(tmp_path, umask, mask, fmode, dmode):
    umask(mask)
    assert io.process_umask() == mask
    io.write_json(tmp_path / "r" / "a.json", {"x": 1})
    with io.atomic_path(tmp_path / "b.bin") as t:
        t.write_bytes(b"1")
    with io.atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("x")
    import pyarrow as pa

    io.write_parquet(tmp_path / "t.parquet", pa.table({"a": [1]}))
    from twinv2.data.store import BehaviorWriter

    with BehaviorWriter(tmp_path / "behaviors"):
        pass
    assert mode(tmp_path / "r" / "a.json") == fmode
    assert mode(tmp_path / "b.bin") == fmode and mode(tmp_path / "t.parquet") == fmode
    assert mode(tmp_path / "d") == dmode and mode(tmp_path / "behaviors") == dmode
    assert mode(tmp_path / "behaviors" / "part-00000.parquet") == fmode


def _leave_temp(kind: str, dest: Path, hold: bool = False) -> subprocess.Popen:
    """Another process creates a temporary for dest; it then dies without cleaning up (like SIGKILL:
    os._exit runs no finally) or, with hold, stays alive until killed."""
    code = (f"import os, sys, time\nfrom twinv2 import io\n"
            f"t = io.{'make_temp_dir' if kind == 'dir' else 'make_temp_file'}({str(dest)!r})\n"
            f"print(t, flush=True)\n" + ("time.sleep(120)\n" if hold else "os._exit(9)\n"))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)


def test_a_killed_runs_temporaries_go_a_live_runs_stay(tmp_path):
    clusters = tmp_path / "clusters"
    dead = _leave_temp("dir", clusters / "w100-aaaa")
    dead_tmp = Path(dead.stdout.readline().strip())
    dead.wait()
    assert dead_tmp.name.startswith(".w100-aaaa.@") and dead_tmp.name.endswith(".tmp") and dead_tmp.is_dir()
    dead_file = _leave_temp("file", clusters / "CURRENT")       # the next process in clusters/ sweeps it
    dead_file_tmp = Path(dead_file.stdout.readline().strip())
    dead_file.wait()
    assert dead_file_tmp.is_file() and not dead_tmp.exists()
    live = _leave_temp("dir", clusters / "w100-bbbb", hold=True)
    try:
        live_tmp = Path(live.stdout.readline().strip())
        assert live_tmp.is_dir() and not dead_file_tmp.exists()
        # leftovers of runs that named no owner: by age; other hosts: by age; anything else: never
        old = time.time() - 3 * 86_400
        legacy_old, legacy_new = clusters / ".w99-cccc.k2j3h4l5.tmp", clusters / ".w99-dddd.a1b2c3d4.tmp"
        other_old = clusters / ".w99-eeee.@otherhost@1@abcdefgh.tmp"
        other_new = clusters / ".w99-ffff.@otherhost@1@abcdefgh.tmp"
        unrelated = clusters / ".editor-swap.tmp"
        for p in (legacy_old, legacy_new, other_old, other_new):
            p.mkdir()
        unrelated.write_text("x")
        for p in (legacy_old, other_old, unrelated):
            os.utime(p, (old, old))
        with io.atomic_dir(clusters / "w200-new") as d:      # the next run, a different version
            (d / "x").write_text("1")
        assert live_tmp.is_dir(), "a live concurrent run's temporary was removed"
        assert not legacy_old.exists() and not other_old.exists()
        assert legacy_new.exists() and other_new.exists() and unrelated.exists()
        assert (clusters / "w200-new" / "x").exists()
    finally:
        live.kill()
        live.wait()


def test_a_killed_validation_is_cleaned_by_the_next(tmp_path, params):
    from tests.validation.corpus import clean_world, write_world

    write_world(clean_world(), tmp_path)
    code = ("import os\nfrom twinv2 import io\n"
            f"with io.atomic_dir({str(tmp_path / 'validated')!r}) as t:\n"
            "    (t / 'items.parquet').write_text('half')\n    print(t, flush=True)\n    os._exit(9)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    left = Path(r.stdout.strip())
    assert left.name.startswith(".validated.") and left.is_dir()
    from pipelines import validate

    p = {**params, "validate": {**params["validate"], "gx_confirm": False}}
    assert validate.run(tmp_path, p)["success"]
    assert not left.exists()
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


def test_system_temp_dirs_of_dead_runs_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = ("import tempfile, os\ntempfile.tempdir = " + repr(str(tmp_path)) + "\nfrom twinv2 import io\n"
            "print(io.make_system_temp_dir('twinv2-emb-'), flush=True)\nos._exit(9)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    dead = Path(r.stdout.strip())
    assert dead.is_dir() and dead.name.startswith("twinv2-emb-@")
    other = tmp_path / "twinv2-champion-x"
    other.mkdir()
    mine = io.make_system_temp_dir("twinv2-emb-")
    assert mine.is_dir() and not dead.exists() and other.exists()


def test_is_stale_needs_this_users_ownership(tmp_path):
    p = tmp_path / ".x.@otherhost@1@abcdefgh.tmp"
    p.mkdir()
    os.utime(p, (1, 1))
    assert io.is_stale(p)
    if os.geteuid() == 0:
        os.chown(p, 65534, 65534)
        assert not io.is_stale(p)
