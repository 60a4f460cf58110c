"""Data validation: GX suites as code (suites.py), vectorised row rules (rules.py), table-level checks
(tables.py), quarantine (quarantine.py) and the runner (runner.py). See docs/validation.md."""
import logging

# GX logs ~200 INFO lines from its docs decorators while it imports ("Skipping registering function ..."):
# they drowned every validate task log in Airflow. Its own warnings and errors still come through.
logging.getLogger("great_expectations._docs_decorators").setLevel(logging.WARNING)

from twinv2.validation.runner import validate_dataset  # noqa: E402

__all__ = ["validate_dataset"]
