"""Errors that name what the user has to fix: the file, and the key or line inside it."""

from __future__ import annotations

from pathlib import Path


class EmalibError(Exception):
    """Base class: every error emalib raises on purpose."""


class ParamsError(EmalibError):
    """A params file (or override) is malformed, has an unknown key or a mistyped value."""


class DataError(EmalibError):
    """A data file is missing, fails its checksum, or holds a malformed record."""


class JudgeError(EmalibError):
    """The judge could not produce a judgment (server error, retries exhausted)."""


def not_prepared(path: str | Path, what: str, step: str) -> EmalibError:
    """The one-line error of a prepared input that is missing, naming the step that writes it."""
    return EmalibError(f"{path}: {what} missing: run step '{step}' first (steps: [{step}, train, ...])")
