"""Data validation: GX suites as code (suites.py), vectorised row rules (rules.py), table-level checks
(tables.py), quarantine (quarantine.py) and the runner (runner.py). See docs/validation.md."""
from twinv2.validation.runner import validate_dataset

__all__ = ["validate_dataset"]
