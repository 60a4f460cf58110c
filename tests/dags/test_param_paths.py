"""The DAG Params `data`, `runs`, `params_file` are confined to the repository's data/ and runs/ roots;
other folders only through the explicit allow-list $TWINV2_ALLOWED_ROOTS (set for the Airflow components)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import tracking
from twinv2.config import REPO_ROOT


@pytest.fixture(autouse=True)
def _no_allow_list(monkeypatch):
    monkeypatch.delenv(tracking.ALLOWED_ROOTS_ENV, raising=False)


@pytest.mark.parametrize("ok", ["data/world", "data/other", str(REPO_ROOT / "data" / "world"), "runs",
                                "runs/twinv2_daily/x", "data/world/../world2"])
def test_inside_roots_resolves(ok):
    p = tracking.confine(ok, "data")
    assert p.is_absolute() and (REPO_ROOT / "data" in p.parents or p == REPO_ROOT / "runs"
                                or REPO_ROOT / "runs" in p.parents)


@pytest.mark.parametrize("bad", ["/etc", "/etc/passwd", "../", "data/../..", "data/../pipelines", "/tmp/world",
                                 "runs/../../x", str(REPO_ROOT), "dags"])
def test_outside_roots_refused(bad):
    with pytest.raises(tracking.PathNotAllowed, match="TWINV2_ALLOWED_ROOTS"):
        tracking.confine(bad, "data")


def test_symlink_out_of_the_roots_is_refused(tmp_path):
    link = REPO_ROOT / "data" / f".test-link-{tmp_path.name}"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(tmp_path)
    try:
        with pytest.raises(tracking.PathNotAllowed):
            tracking.confine(link, "data")
    finally:
        link.unlink()


def test_allow_list(tmp_path, monkeypatch):
    with pytest.raises(tracking.PathNotAllowed):
        tracking.confine(tmp_path / "world", "data")
    monkeypatch.setenv(tracking.ALLOWED_ROOTS_ENV, f"/nonexistent-root:{tmp_path}")
    assert tracking.confine(tmp_path / "world", "data") == (tmp_path / "world").resolve()
    with pytest.raises(tracking.PathNotAllowed):           # a sibling of an allowed root is still refused
        tracking.confine(tmp_path.parent / (tmp_path.name + "x"), "data")
    monkeypatch.setenv(tracking.ALLOWED_ROOTS_ENV, "relative/root")
    with pytest.raises(tracking.PathNotAllowed, match="absolute"):
        tracking.confine("data/world", "data")


def test_params_file_param(tmp_path, monkeypatch):
    base = tracking.dag_settings({"params_file": None, "train_epochs": 3})
    assert base["train"]["epochs"] == 3
    assert tracking.dag_settings({"params_file": "params.yaml"})["train"] == tracking.dag_settings({})["train"]
    with pytest.raises(tracking.PathNotAllowed):
        tracking.dag_settings({"params_file": "/etc/passwd"})
    with pytest.raises(tracking.PathNotAllowed):
        tracking.dag_settings({"params_file": "data/../pyproject.toml"})
    other = tmp_path / "params.yaml"
    other.write_text((REPO_ROOT / "params.yaml").read_text().replace("lr: 0.001", "lr: 0.5"))
    monkeypatch.setenv(tracking.ALLOWED_ROOTS_ENV, str(tmp_path))
    assert tracking.dag_settings({"params_file": str(other)})["train"]["lr"] == 0.5


def test_run_dir_confined(tmp_path):
    ctx = {"dag_id": "twinv2_daily", "run_id": "manual__x"}
    assert tracking.run_dir("runs", ctx, "twin") == REPO_ROOT / "runs" / "twinv2_daily" / "manual__x" / "twin"
    with pytest.raises(tracking.PathNotAllowed):
        tracking.run_dir(str(tmp_path), ctx, "twin")
