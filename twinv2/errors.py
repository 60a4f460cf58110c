"""Errors a user can act on. The CLI prints their message as one paragraph, without a traceback."""


class TwinV2Error(Exception):
    """Base class: the message names the file, the row or field, and what was expected."""


class DataError(TwinV2Error):
    """Unreadable or malformed input (missing table, truncated Parquet, wrong file type, bad schema)."""


class ValidationFailed(TwinV2Error):
    """A table-level expectation failed: the stage must stop (non-zero exit, AirflowFailException)."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}
