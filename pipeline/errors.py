"""Typed errors: the library raises these, the CLI alone turns them into exit codes."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix (missing folder, wrong model, bad option); one clear sentence."""

    exit_code = 1


class ModelMismatchError(PipelineError):
    """Features or an index were made by a different model than the one in hand."""


class BusyError(PipelineError):
    """Another run holds the lock on the same output; try again later (EX_TEMPFAIL)."""

    exit_code = 75


class ImageError(Exception):
    """One image could not be decoded; the message is the one-line reason recorded for it.

    `transient`: the cause may pass without the file changing (a timeout under load, a crashed,
    hung or out-of-memory decoder, a permission or I/O error), so later runs retry the file;
    otherwise its content is bad (not an image, truncated, a bomb) and only a new version helps.
    """

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient
