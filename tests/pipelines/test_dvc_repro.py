"""`dvc repro` in a fresh git repository made from this working tree, on the tiny world."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _sh(args, cwd, timeout=900):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
def test_dvc_repro_fresh_clone_tiny(tmp_path):
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    clone = tmp_path / "clone"
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / f)
    _sh(["git", "init", "-q"], clone)
    _sh(["git", "add", "-A"], clone)
    _sh(["git", "commit", "-q", "-m", "clone"], clone)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["generate"]["preset"] = "tiny"
    params["train"]["epochs"] = 1
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    _sh([sys.executable, "-m", "dvc", "repro"], clone)
    for model in ("twinv2", "twin"):
        m = json.loads((clone / "runs" / "dvc" / model / "metrics.json").read_text())
        assert 0.0 <= m["gauc"] <= 1.0 and m["model"] == model
    shown = json.loads(_sh([sys.executable, "-m", "dvc", "metrics", "show", "--json"], clone))
    assert "gauc" in json.dumps(shown)
    status = _sh([sys.executable, "-m", "dvc", "status"], clone)
    assert "up to date" in status.lower()
