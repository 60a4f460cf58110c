"""Great Expectations Data Docs of a validation: the HTML site GX renders from the validation results of every
table batch (reports/gx/validation_results.json, written by `twinv2 validate`), built into
DIR/reports/data_docs/ (index.html + one page per table batch) after each validation, passed or failed.
The validation report links it (`data_docs` in reports/validation.json); the Airflow validate task logs the
folder to its MLflow run (artifact `data_docs/`, open index.html in the MLflow UI's artifact view).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import twinv2.validation  # noqa: F401  (quiets GX's import-time INFO lines before GX is imported here)

SITE = "data_docs"


def build(data: str | Path) -> Path | None:
    """Build the Data Docs site of DIR's last validation; returns its index.html (None without GX results)."""
    reports = Path(data) / "reports"
    results = reports / "gx" / "validation_results.json"
    if not results.exists():
        return None
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResultSchema
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (ExpectationSuiteIdentifier,
                                                                           ValidationResultIdentifier)

    tables: dict[str, Any] = json.loads(results.read_text())
    final = reports / SITE
    tmp = reports / f".{SITE}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    context = gx.get_context(mode="ephemeral")
    context.add_data_docs_site(site_name="twinv2", site_config={
        "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(tmp.resolve())}})
    run_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(results.stat().st_mtime))
    schema = ExpectationSuiteValidationResultSchema()
    for table, entry in tables.items():
        for i, js in enumerate(entry.get("batches") or []):
            key = ValidationResultIdentifier(
                expectation_suite_identifier=ExpectationSuiteIdentifier(name=js.get("suite_name", f"twinv2_{table}")),
                run_id=RunIdentifier(run_name=f"{Path(data).resolve().name}-batch-{i}", run_time=run_time),
                batch_identifier=f"{table}-batch-{i}")
            context.validation_results_store.set(key, schema.load(js))
    context.build_data_docs(site_names=["twinv2"])
    if not (tmp / "index.html").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    old = reports / f".{SITE}.{os.getpid()}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final / "index.html"


def publish(data: str | Path, report: dict | None) -> dict | None:
    """Build the site and link it from the report (and from reports/validation.json)."""
    try:
        index = build(data)
    except Exception as e:        # the docs are a view of the results: never fail a validation over them
        index = None
        err = f"{type(e).__name__}: {e}"
    else:
        err = None
    if report is None:
        return None
    report = dict(report)
    if index is not None:
        report["data_docs"] = str(index.relative_to(Path(data) / "reports").as_posix())
    elif err:
        report["data_docs_error"] = err
    val = Path(data) / "reports" / "validation.json"
    if val.exists():
        from twinv2.io import read_json, write_json

        on_disk = read_json(val)
        on_disk.update({k: report[k] for k in ("data_docs", "data_docs_error") if k in report})
        write_json(val, on_disk)
    return report
