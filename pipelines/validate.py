"""`twinv2 validate --data DIR`: DIR/raw -> DIR/validated + DIR/quarantine + DIR/reports/validation.json.

Raises twinv2.errors.ValidationFailed (CLI exit 1) on a table-level failure, after writing the report;
twinv2.errors.DataError (exit 2) when the input cannot be read."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def run(data: str | Path, params: dict | None = None) -> dict[str, Any]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    from twinv2.config import load_params
    from twinv2.validation import validate_dataset

    params = load_params() if params is None else params
    return validate_dataset(data, params)
