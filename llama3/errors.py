"""The errors a user can fix. ``python -m llama3`` prints them as one line, without a traceback,
and exits with status 2; any module may raise them without depending on the command line."""

from __future__ import annotations


class UsageError(Exception):
    """A problem the user can fix (bad flag, missing file); the message says what to change."""


class ConfigError(ValueError):
    """A model configuration value is invalid; the message names the flag to change."""
