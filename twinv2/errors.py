"""Errors a user can act on, and the exit code of each class of failure.

The CLI prints every failure as one paragraph, without a traceback (TWINV2_DEBUG=1 adds it), and exits
with the code of its class (README, "Exit codes"):

    0  success
    1  validation failed       ValidationFailed: a table-level expectation failed (report written)
    2  bad input data          DataError, FileNotFoundError, ValueError: a missing, unreadable or malformed
                               input named in the message
    3  usage / configuration   ConfigError: bad arguments, a --params file that is not params.yaml, a --set
                               that does not fit params.yaml
    4  unusable artifact       ArtifactError: a checkpoint / model / embedding file that is not one
    5  operating system        OSError other than a missing file (disk full, read-only or forbidden
                               output, I/O error), MemoryError
   70  internal error          any other exception: a bug (please report it with TWINV2_DEBUG=1 output)
  130  interrupted             Ctrl-C (KeyboardInterrupt)
"""
from __future__ import annotations

import errno as _errno
import os
import traceback
from types import TracebackType

EXIT_OK = 0
EXIT_VALIDATION_FAILED = 1
EXIT_DATA = 2
EXIT_USAGE = 3
EXIT_ARTIFACT = 4
EXIT_OS = 5
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class TwinV2Error(Exception):
    """Base class: the message names the file, the row or field, and what was expected."""

    exit_code = EXIT_DATA


class DataError(TwinV2Error):
    """Unreadable or malformed input (missing table, truncated Parquet, wrong file type, bad schema)."""

    exit_code = EXIT_DATA


class ConfigError(TwinV2Error):
    """Bad command line or parameters: a --params file that is not a params.yaml, a --set that does not fit."""

    exit_code = EXIT_USAGE


class ArtifactError(TwinV2Error):
    """A model artifact (checkpoint, model.pt, embeddings) that cannot be read as what it should be."""

    exit_code = EXIT_ARTIFACT


class ValidationFailed(TwinV2Error):
    """A table-level expectation failed: the stage must stop (non-zero exit, AirflowFailException)."""

    exit_code = EXIT_VALIDATION_FAILED

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


# ---------------------------------------------------------------- classifying any exception

_FULL = {_errno.ENOSPC, _errno.EFBIG, getattr(_errno, "EDQUOT", -1)}
_DENIED = {_errno.EROFS, _errno.EACCES, _errno.EPERM}
_MISSING_PATH = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def _chain(exc: BaseException) -> list[BaseException]:
    """exc, its cause and its context (also a suppressed one), outermost first."""
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _torch_load_path(exc: BaseException) -> str | None:
    """The file torch.load was reading when exc (or an exception it replaced) was raised, else None."""
    for e in _chain(exc):
        tb: TracebackType | None = e.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name == "load" and code.co_filename.replace(os.sep, "/").endswith("torch/serialization.py"):
                f = tb.tb_frame.f_locals.get("f")
                return os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f)
            tb = tb.tb_next
    return None


def _os_message(e: OSError, paths: str | None = None) -> str:
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = " ".join((e.strerror or str(e)).split())
    name = _errno.errorcode.get(e.errno, "") if e.errno else ""
    head = f"{where}: {what}" if where else (f"{what} (in the files of {paths})" if paths else what)
    if name:
        head += f" ({name})"
    if e.errno in _FULL or "No space left" in str(e):
        hint = ("the disk, a quota or a file-size limit is full: free space (or raise the limit) or write the "
                "output elsewhere, then rerun; nothing half-written was published")
    elif e.errno in _DENIED or isinstance(e, PermissionError):
        hint = ("the output location is read-only or not writable by this user: choose a writable --out/--data "
                "directory or fix its permissions, then rerun")
    else:
        hint = "an operating-system error while reading or writing the files named above; fix it and rerun"
    return f"{head}. {hint}."


# the class label a CLI error line carries (`twinv2 <stage>: <label>: ...`), one per exit code (README "Exit codes")
LABELS = {EXIT_VALIDATION_FAILED: "FAILED", EXIT_DATA: "data error", EXIT_USAGE: "configuration error",
          EXIT_ARTIFACT: "artifact error", EXIT_OS: "system error", EXIT_INTERNAL: "internal error",
          EXIT_INTERRUPTED: "interrupted"}


def describe(exc: BaseException, paths: str | None = None) -> tuple[int, str, str]:
    """(exit code, class label, one-paragraph message) of any exception a stage raised: the label is the exit
    code's class (LABELS). `paths` (e.g. "--out DIR") names the files involved when the exception itself does
    not (Arrow's I/O errors)."""
    code, message = _classify(exc, paths)
    return code, LABELS.get(code, "error"), message


def _classify(exc: BaseException, paths: str | None) -> tuple[int, str]:
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, ("interrupted (Ctrl-C); outputs are written atomically, so nothing "
                                  "half-written was published; rerun to finish")
    if isinstance(exc, ValidationFailed):
        return EXIT_VALIDATION_FAILED, str(exc)
    if isinstance(exc, (ConfigError, ArtifactError)):
        return exc.exit_code, str(exc)
    pt = _torch_load_path(exc)
    if pt is not None:
        return EXIT_ARTIFACT, (
            f"{pt}: not a readable twinv2 checkpoint or model ({type(exc).__name__}: {_one_line(exc)}). Expected "
            f"RUN/model.pt or RUN/checkpoints/epoch-NNNN.pt written by `twinv2 train` (loaded with "
            f"torch.load(weights_only=True)); it may be truncated or another kind of file")
    if isinstance(exc, (DataError, TwinV2Error)):
        return exc.exit_code, str(exc)
    if isinstance(exc, _MISSING_PATH):
        if not exc.filename:
            return EXIT_DATA, _one_line(exc)
        return EXIT_DATA, (f"{exc.filename}: {exc.strerror or exc} ({_errno.errorcode.get(exc.errno, '?')}). "
                           f"Expected an existing path of the kind the argument names: check "
                           f"--data/--run/--src/--out and the stages run before this one")
    if isinstance(exc, ValueError):
        return EXIT_DATA, _one_line(exc)
    if isinstance(exc, OSError):
        return EXIT_OS, _os_message(exc, paths)
    if isinstance(exc, MemoryError):
        return EXIT_OS, ("out of memory; lower the batch sizes in params.yaml (e.g. validate.batch_rows, "
                         "cluster.chunk_rows, train.batch_size) or use a larger machine")
    return EXIT_INTERNAL, (
        f"{type(exc).__name__}: {_one_line(exc)}. This is not a known failure (probably a bug in twinv2); "
        f"rerun with TWINV2_DEBUG=1 for the traceback and report it")


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip()
    if isinstance(exc, KeyError) and exc.args:
        msg = f"missing key {exc.args[0]!r}"
    return " ".join(msg.split()) or type(exc).__name__


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
