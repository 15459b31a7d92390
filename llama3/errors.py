"""The errors a user can fix. ``python -m llama3`` prints them as one line, without a traceback,
and exits with status 2; any module may raise them without depending on the command line."""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any


class UsageError(Exception):
    """A problem the user can fix (bad flag, missing file); the message says what to change."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message is a template that names each setting at
    fault as a slot, ``{core_dim}``, and holds values as ``{}`` (``{!r}``): the error reads with
    the settings' field names, and :meth:`naming` with each named as the caller spells it (the
    command line: the flag that sets it).

    >>> str(ConfigError("{core_dim} must be a multiple of 8, got {}", 20))
    'core_dim must be a multiple of 8, got 20'
    """

    def __init__(self, template: str, *values: Any):
        self.template, self.values = template, values
        slots = (slot for _, slot, _, _ in string.Formatter().parse(template) if slot)
        self.fields = tuple(dict.fromkeys(slot for slot in slots if slot.isidentifier()))
        super().__init__(self.naming(str))

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return type(self), (self.template, *self.values)

    def naming(self, name: Callable[[str], str]) -> str:
        """The message with each setting at fault called ``name(field)``."""
        return self.template.format(*self.values, **{field: name(field) for field in self.fields})

    def at(self, where: object) -> ConfigError:
        """This error said of ``where`` (the file that holds the configuration)."""
        return ConfigError("{}: " + self.template, where, *self.values)
