"""GX Data Docs: built on each validation (passed or failed) into DIR/reports/data_docs, linked from
reports/validation.json, and logged to MLflow by the stage run the validate task makes."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from twinv2.errors import ValidationFailed


def _pages(data):
    return sorted(p.relative_to(data / "reports" / "data_docs").as_posix()
                  for p in (data / "reports" / "data_docs").rglob("*.html"))


def test_data_docs_built_linked_and_logged(tiny_world, params, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipelines import tracking, validate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    ctx = {"dag_id": "test", "run_id": "docs", "try_number": 1, "map_index": -1}
    parent = tracking.parent_run(ctx, data=tiny_world)
    reports = tiny_world / "reports"
    rep = tracking.run_stage(ctx, parent, "validate", validate.run, data=tiny_world, params=params,
                             artifacts=[reports / "validation.json", reports / "data_docs"],
                             kwargs={"data": tiny_world, "params": params})       # what the DAG's validate does
    assert rep["data_docs"] == "data_docs/index.html"
    assert json.loads((reports / "validation.json").read_text())["data_docs"] == "data_docs/index.html"
    pages = _pages(tiny_world)
    assert "index.html" in pages
    for table in ("items", "behaviors", "impressions"):
        assert any(p.startswith(f"validations/twinv2_{table}/") for p in pages), pages
    index = (reports / "data_docs" / "index.html").read_text()
    assert "twinv2_impressions" in index
    c = MlflowClient(tracking_uri=uri)
    files = {a.path for a in c.list_artifacts(rep["mlflow_run_id"], "data_docs")}
    assert "data_docs/index.html" in files, files
    assert c.get_run(rep["mlflow_run_id"]).data.params["validate.gx_confirm"] == "True"   # its stage params


def test_data_docs_of_a_failed_validation(tiny_world, params):
    from pipelines import validate

    for part in sorted((tiny_world / "raw" / "behaviors").glob("part-*.parquet")):
        t = pq.read_table(part)
        neg = pc.subtract(pc.multiply(pc.cast(t["play_ms"], pa.int32()), pa.scalar(-1, pa.int32())),
                          pa.scalar(1, pa.int32()))
        pq.write_table(t.set_column(t.schema.get_field_index("play_ms"), "play_ms", neg), part)
    with pytest.raises(ValidationFailed) as err:
        validate.run(data=tiny_world, params=params)
    assert err.value.report.get("data_docs") == "data_docs/index.html"
    assert json.loads((tiny_world / "reports" / "validation.json").read_text())["success"] is False
    html = "".join(p.read_text() for p in (tiny_world / "reports" / "data_docs" / "validations").rglob("*.html"))
    assert "Failed" in html or "failed" in html
