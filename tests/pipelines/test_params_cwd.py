"""load_params reads the params.yaml of the working directory (what `dvc exp run -S` edits, also in a --temp
workspace), and the repository's only when the working directory has none."""
from __future__ import annotations

import yaml

from twinv2.config import DEFAULT_PARAMS, load_params


def test_reads_the_working_directory_params(tmp_path, monkeypatch):
    p = yaml.safe_load(DEFAULT_PARAMS.read_text())
    p["train"]["lr"] = 0.123
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.chdir(tmp_path)
    assert load_params()["train"]["lr"] == 0.123
    assert load_params(None, {"train.lr": 0.5})["train"]["lr"] == 0.5


def test_falls_back_to_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # no params.yaml here
    assert load_params() == yaml.safe_load(DEFAULT_PARAMS.read_text())
