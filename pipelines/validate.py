"""`twinv2 validate --data DIR`: DIR/raw -> DIR/validated + DIR/quarantine + DIR/reports/validation.json.

Raises twinv2.errors.ValidationFailed (CLI exit 1) on a table-level failure, after writing the report;
twinv2.errors.DataError (exit 2) when the input cannot be read. Builds the GX Data Docs of the validation into
DIR/reports/data_docs/ and links them from the report (pipelines/data_docs.py)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def run(data: str | Path, params: dict | None = None) -> dict[str, Any]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    from twinv2.config import load_params
    from twinv2.validation import validate_dataset

    from pipelines import data_docs
    from twinv2.errors import ValidationFailed

    params = load_params() if params is None else params
    try:
        report = validate_dataset(data, params)
    except ValidationFailed as e:          # GX Data Docs of a failed validation too (reports/data_docs/)
        e.report = data_docs.publish(data, e.report) or e.report
        raise
    return data_docs.publish(data, report)
