"""Constraints declared next to the config fields they limit, and the one checker that reads them.

A config section is a frozen dataclass that subclasses :class:`Section`. Each field's type
says what it accepts (``int``, ``float``, ``bool``, ``str``, ``Path``, ``tuple[str, ...]``,
``dict[str, int]`` or a ``Literal`` of choices), and ``typing.Annotated`` metadata adds the limits::

    concurrency: Annotated[int, Between(1, 256)] = 4
    initial_seconds: Annotated[Seconds, NotAbove("max_seconds")] = 2.0

Building a section (by the loader, by ``dataclasses.replace`` or in a test) checks every
field, and a problem raises :class:`FieldError`, whose message names the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


class FieldError(ConfigError):
    """One key's value is wrong. ``origin`` names the environment variable it came from."""

    def __init__(self, key: str, problem: str, origin: str | None = None) -> None:
        self.key, self.problem, self.origin = key, problem, origin
        source = f" (from {origin})" if origin else ""
        super().__init__(f"config key {key}{source} {problem}")


class Constraint(Protocol):
    def problem(self, value: Any, section: Any) -> str | None:
        """What is wrong with ``value`` (a sentence after the key), or None."""


def _g(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Between:
    """``low <= value <= high`` (``low < value`` when ``above``)."""

    low: float
    high: float
    above: bool = False

    def problem(self, value: Any, section: Any) -> str | None:
        if isinstance(value, dict):  # a table of counts: each one
            return next((f"{problem} for {name}" for name, item in value.items()
                         if (problem := self.problem(item, section))), None)
        if self.low <= value <= self.high and not (self.above and value == self.low):
            return None
        low = f"more than {_g(self.low)}" if self.above else f"at least {_g(self.low)}"
        return f"must be {low} and at most {_g(self.high)}, got {_g(value)}"


@dataclass(frozen=True)
class NotAbove:
    """The value may not exceed the sibling field ``other`` (a start value and its cap)."""

    other: str

    def problem(self, value: Any, section: Any) -> str | None:
        cap = getattr(section, self.other)
        if not _number(cap) or value <= cap:  # a cap of the wrong type is its own error
            return None
        return f"({_g(value)}) must not exceed {section.section_name}.{self.other} ({_g(cap)})"


@dataclass(frozen=True)
class Members:
    """A non-empty list of distinct values, each one of ``allowed``."""

    allowed: tuple[str, ...]

    def problem(self, value: Any, section: Any) -> str | None:
        if not value:
            return "must not be empty"
        wrong = [item for item in value if item not in self.allowed]
        if wrong:
            return f"has {wrong[0]!r}; allowed: {', '.join(self.allowed)}"
        return "lists a value twice" if len(set(value)) != len(value) else None


@dataclass(frozen=True)
class Host:
    """A host name or address to connect to or listen on: no spaces, no slashes."""

    def problem(self, value: Any, section: Any) -> str | None:
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if not item or any(ch.isspace() or ch == "/" or not ch.isprintable() for ch in item):
                return f"must be a host name or address, got {item!r}"
        return None


@dataclass(frozen=True)
class HttpUrl:
    """An http(s) URL that aiohttp can use as it is: a host, a valid port, no spaces."""

    def problem(self, value: Any, section: Any) -> str | None:
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as exc:
            return f"must be an http(s) URL, got {value!r} ({exc})"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return f"must be an http(s) URL with a host, got {value!r}"
        if any(ch.isspace() or not ch.isprintable() for ch in value):
            return f"must not contain spaces, got {value!r}"
        return f"must have a port from 1 to 65535, got {value!r}" if port == 0 else None


@dataclass(frozen=True)
class Readable:
    """Empty, or a file this process can read."""

    def problem(self, value: Any, section: Any) -> str | None:
        return None if not value or os.access(value, os.R_OK) else f"cannot read {value}"


@dataclass(frozen=True)
class Mode:
    """A permission mode; written in octal, also in the environment (640, 0640, 0o640)."""

    def problem(self, value: Any, section: Any) -> str | None:
        return None if 0 <= value <= 0o777 else f"must be a permission mode, got {oct(value)}"


@dataclass(frozen=True)
class Secret:
    """The value is never shown in an error message."""

    def problem(self, value: Any, section: Any) -> str | None:
        return None


DAY = 86400.0
#: A wait or timeout in seconds: more than 0, at most a day.
Seconds = Annotated[float, Between(0, DAY, above=True)]
#: A span in hours: more than 0, at most a year.
Hours = Annotated[float, Between(0, 365 * 24, above=True)]


class Section:
    """Base of a config section: every field is checked when the section is built.

    The section's name in the file is the class name without ``Config``, in lower case
    (``UploadConfig`` is ``[upload]``).
    """

    section_name: ClassVar[str] = ""
    __dataclass_fields__: ClassVar[dict[str, Any]]  # every section is a dataclass

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.section_name = cls.__name__.removesuffix("Config").lower()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_field(self, f.name, getattr(self, f.name))


def check_field(section: Section, name: str, value: Any) -> None:
    """Raise :class:`FieldError` if ``value`` does not fit field ``name`` of ``section``."""
    base, marks = field_type(type(section), name)
    shown = "a value that is not shown" if Secret() in marks else repr(value)
    problem = None if accepts(base, value) else f"must be {describe(base)}, got {shown}"
    for mark in marks:
        problem = problem or mark.problem(value, section)
    if problem:
        raise FieldError(f"{section.section_name}.{name}", problem)


_FIELD_TYPES: dict[tuple[type[Any], str], tuple[Any, tuple[Constraint, ...]]] = {}


def field_type(cls: type[Any], name: str) -> tuple[Any, tuple[Constraint, ...]]:
    """The field's plain type and its constraints (the ``Annotated`` metadata)."""
    if (cls, name) not in _FIELD_TYPES:
        for field_name, hint in typing.get_type_hints(cls, include_extras=True).items():
            marks = ()
            if typing.get_origin(hint) is Annotated:
                hint, marks = hint.__origin__, tuple(hint.__metadata__)
            _FIELD_TYPES[cls, field_name] = hint, marks
    return _FIELD_TYPES[cls, name]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_ACCEPTS: dict[Any, typing.Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: _number(v) and isinstance(v, int),
    float: lambda v: _number(v) and math.isfinite(v),
    str: lambda v: isinstance(v, str),
    Path: lambda v: isinstance(v, Path) and str(v) not in ("", "."),
    tuple[str, ...]: lambda v: isinstance(v, tuple) and all(isinstance(i, str) for i in v),
    dict[str, int]: lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and _number(i) and isinstance(i, int) for k, i in v.items()),
}
_DESCRIBED = {bool: "true or false", int: "an integer", float: "a finite number",
              str: "a string", Path: "a non-empty path", tuple[str, ...]: "a list of strings",
              dict[str, int]: "a table of whole numbers, like { email = 100000 }"}


def accepts(base: Any, value: Any) -> bool:
    if typing.get_origin(base) is Literal:
        return value in typing.get_args(base)
    return _ACCEPTS[base](value)


def describe(base: Any) -> str:
    if typing.get_origin(base) is Literal:
        return "one of " + ", ".join(typing.get_args(base))
    return _DESCRIBED[base]
