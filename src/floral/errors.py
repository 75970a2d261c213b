"""Errors a user can act on: each one prints as a single line, without a traceback."""

from __future__ import annotations

__all__ = ["FloralError", "ConfigError", "DatasetNotFoundError", "RunCrashedError"]


class FloralError(Exception):
    """Base class of floral's user-facing errors."""

    exit_code = 1


class ConfigError(FloralError):
    """A bad experiment setting: an unknown key, a wrong type or an impossible value."""

    exit_code = 2


class DatasetNotFoundError(ConfigError):
    """A dataset is not where the experiment says; the message says how to get it."""


class RunCrashedError(FloralError):
    """One run of a grid stopped on an unexpected error; the others went on, and its traceback
    is saved in its folder."""
