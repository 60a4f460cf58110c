"""Shared fixtures. The tiny synthetic world is generated once per test session (seconds)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _mlflow_fluent_isolation():
    """A stage run in-process (pipelines.tracking.use_store) sets MLflow's fluent experiment for its store; a
    later test on another store would start its runs in that experiment id. Reset it after every test."""
    yield
    import sys

    if "mlflow" in sys.modules:
        import mlflow
        from mlflow.tracking import fluent

        while mlflow.active_run() is not None:
            mlflow.end_run()
        fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(scope="session")
def params():
    from twinv2.config import load_params

    return load_params()


@pytest.fixture(scope="session")
def tiny_world_ro(tmp_path_factory, params) -> Path:
    """A tiny generated world (raw/ only). Read-only: copy it (tiny_world) before changing anything."""
    from pipelines import generate

    out = tmp_path_factory.mktemp("tiny") / "world"
    generate.run(preset="tiny", out=out, seed=0, params=params)
    return out


@pytest.fixture()
def tiny_world(tiny_world_ro, tmp_path) -> Path:
    """A private, writable copy of the tiny world."""
    dest = tmp_path / "world"
    shutil.copytree(tiny_world_ro, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_validated_ro(tmp_path_factory, tiny_world_ro, params) -> Path:
    """The tiny world after `validate` (raw/ + validated/ + quarantine/ + reports/). Read-only."""
    from pipelines import validate

    dest = tmp_path_factory.mktemp("tinyv") / "world"
    shutil.copytree(tiny_world_ro, dest)
    validate.run(data=dest, params=params)
    return dest


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent: ../shared data is optional and only used when present")
    return p
