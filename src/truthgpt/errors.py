"""The one small hierarchy of errors that users see: what was wrong, where, and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TruthGPTError(Exception):
    """Base of every error truthgpt raises on purpose."""


class ConfigError(TruthGPTError):
    """A YAML file, an override or a value in it is wrong."""


class CheckpointError(TruthGPTError):
    """A checkpoint or model folder is missing, incomplete or unreadable."""


class DataError(TruthGPTError):
    """A data source gave nothing usable (no files, empty field, too little text)."""


class RequestError(TruthGPTError):
    """A generation request is invalid (bad sampling parameter, prompt too long)."""


class TrainingError(TruthGPTError):
    """Training cannot go on (non-finite losses that skipping and rollback could not cure)."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice a misspelt `name` most likely meant, or None when none is close."""
    hint = difflib.get_close_matches(name, list(choices), n=1)
    return hint[0] if hint else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """ "; did you mean 'x'?" for the choice closest to a misspelt `name`, else ""."""
    hint = closest(name, choices)
    return f"; did you mean {hint!r}?" if hint else ""


def did_you_mean_sentence(name: str, choices: Iterable[str]) -> str:
    """ " Did you mean 'x'?" (a sentence of its own, for messages built of sentences), else ""."""
    hint = closest(name, choices)
    return f" Did you mean {hint!r}?" if hint else ""
