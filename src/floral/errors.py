"""Errors a user can act on: each one prints as a single line, without a traceback."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatasetNotFoundError",
    "DivergedError",
    "FloralError",
    "OutputError",
    "RoundFailedError",
    "RunCrashedError",
]


class FloralError(Exception):
    """Base class of floral's user-facing errors."""

    exit_code = 1


class ConfigError(FloralError):
    """A bad experiment setting: an unknown key, a wrong type or an impossible value."""

    exit_code = 2


class DatasetNotFoundError(ConfigError):
    """A dataset is not where the experiment says; the message says how to get it."""


class DivergedError(ConfigError):
    """Training diverged: the global model, or every update of a round, is no longer finite,
    or the round's training loss broke the divergence rule. Almost always a setting (a learning
    rate too large), hence a ConfigError's exit status.

    `start_suspect`: the round's training diverged from the state it started from, so that
    state is no good place to continue from either: the one before it is kept."""

    def __init__(self, message: str, start_suspect: bool = False) -> None:
        super().__init__(message)
        self.start_suspect = start_suspect


class OutputError(FloralError):
    """A results file or folder that cannot be written: a file in the way, no permission, a full
    disk. The message names the path; what was written before is left as it was."""

    exit_code = 2


class RoundFailedError(FloralError):
    """A round applied fewer updates than `engine.min_fit_clients` (or dropped one while
    `engine.accept_failures` is false): the run stops at its last whole round, not a success."""


class RunCrashedError(FloralError):
    """One run of a grid stopped on an unexpected error; the others went on, and its traceback
    is saved in its folder."""
