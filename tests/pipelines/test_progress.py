"""Progress bars of validate, cluster and evaluate (tqdm): one plain line per update in logs (no carriage
returns), nothing when the stage's `progress` switch or TWINV2_PROGRESS=0 turns them off."""
from __future__ import annotations

import copy
import io as _io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from twinv2 import progress

REPO = Path(__file__).resolve().parents[2]


def test_bar_in_a_log_writes_lines_not_carriage_returns(monkeypatch):
    monkeypatch.delenv("TWINV2_PROGRESS", raising=False)
    monkeypatch.setenv("TWINV2_PROGRESS_INTERVAL_S", "3600")
    f = _io.StringIO()
    b = progress.bar(total=1000, desc="validate", unit="row", file=f)
    for _ in range(1000):
        b.update(1)
    b.close()
    out = f.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert 1 <= len(lines) <= 3, lines                  # start and end, not one per update
    assert lines[-1].startswith("validate: 100%") and "1000/1000" in lines[-1]


@pytest.mark.parametrize("section, env", [({"progress": False}, None), ({}, "0")])
def test_bar_can_be_switched_off(monkeypatch, section, env):
    if env is None:
        monkeypatch.delenv("TWINV2_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("TWINV2_PROGRESS", env)
    f = _io.StringIO()
    b = progress.bar(total=10, desc="x", file=f, section=section)
    b.update(10)
    b.close()
    assert f.getvalue() == ""


def _world(root: Path) -> Path:
    from tests.validation.corpus import clean_world, write_world

    return write_world(clean_world(), root)


@pytest.mark.parametrize("switch", ["true", "false"])
def test_validate_shows_progress_in_logs(tmp_path, switch):
    _world(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("TWINV2_PROGRESS",)}
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", "--data", str(tmp_path), "--set",
                        "validate.gx_confirm=false", "--set", f"validate.progress={switch}"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    bars = [ln for ln in r.stderr.splitlines() if ln.startswith("validate:")]
    assert "\r" not in r.stderr
    if switch == "true":
        assert bars and bars[-1].startswith("validate: 100%") and "row" in bars[-1], r.stderr
    else:
        assert bars == [], r.stderr


def test_cluster_shows_progress_and_the_switch_keeps_the_version(tmp_path, params, capsys, monkeypatch):
    monkeypatch.delenv("TWINV2_PROGRESS", raising=False)
    from pipelines import cluster, validate

    p = copy.deepcopy(params)
    p["validate"]["gx_confirm"] = False
    p["validate"]["progress"] = False
    p["cluster"].update(n_jobs=1, progress=True)
    validate.run(_world(tmp_path), p)
    rep = cluster.run(tmp_path, params=p)
    err = capsys.readouterr().err
    bars = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("cluster:")]
    assert bars and "100%" in bars[-1] and "300/300" in bars[-1], err
    p["cluster"]["progress"] = False
    again = cluster.run(tmp_path, params=p)
    assert again["version"] == rep["version"]                 # an execution switch, not part of the version
    assert "cluster:" not in capsys.readouterr().err
