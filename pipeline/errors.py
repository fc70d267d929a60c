"""Typed errors: the library raises these, the CLI alone turns them into exit codes."""

from __future__ import annotations

import errno
import re
from pathlib import Path


class PipelineError(Exception):
    """A problem the user can fix (missing folder, wrong model, bad option); one clear sentence."""

    exit_code = 1


class InputError(PipelineError):
    """An argument or a request field that cannot be used as given (a filter, an addition's metadata): the user
    fixes the text. Exit 2, as for a usage error; HTTP 422."""

    exit_code = 2


class ModelMismatchError(PipelineError):
    """Features or an index were made by a different model than the one in hand."""


class ConfigError(PipelineError):
    """Retrying cannot help until someone changes a file or an option (e.g. the model a service was told to
    use is not the index's). EX_CONFIG: a systemd unit lists it in RestartPreventExitStatus, so that a
    service that cannot start does not restart in a loop."""

    exit_code = 78


class BusyError(PipelineError):
    """Not now: another run holds the lock on the same output, or a service is saturated; try again later
    (EX_TEMPFAIL; a service answers 503)."""

    exit_code = 75


class DeadlineExceeded(BusyError):
    """A request's time ran out: its work stopped at the next stage it reached, rather than running on for an
    answer nobody waits for."""


class ImageError(Exception):
    """One image could not be decoded; the message is the one-line reason recorded for it.

    `transient`: the cause may pass without the file changing (a timeout under load, a crashed,
    hung or out-of-memory decoder, a permission or I/O error), so later runs retry the file;
    otherwise its content is bad (not an image, truncated, a bomb) and only a new version helps.
    """

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


def cause(exc: BaseException) -> str:
    """What went wrong, in a few words: an OSError's strerror (its message repeats the path), a faiss
    error without its C++ location, the last line of anything else."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError quotes its message
    lines = text.strip().splitlines()
    last = lines[-1].strip() if lines else type(exc).__name__
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: '.*?' failed: )?", "", last)


def write_error(path: Path | str, exc: Exception, rerun: str = "the command") -> PipelineError:
    """A failed write of one of our files (OSError, sqlite3 or faiss error) as one sentence: which
    file, why, what to do. A full disk says so: it is the commonest cause, and the fix is simple."""
    full = (
        getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        or getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL"
        or "No space left on device" in str(exc)
    )
    if full:
        return PipelineError(f"the disk is full: cannot write {path}; free some space and rerun {rerun}")
    return PipelineError(
        f"cannot write {path}: {cause(exc)}; choose a writable folder (or fix its permissions) and rerun {rerun}"
    )
