"""Configuration: one TOML file into frozen dataclasses, validated once at start.

Every key is documented with its default in ``config.example.toml``. Precedence, highest
first: ``IPQS_API_KEY`` for the key; ``IPQS_BULKD_<SECTION>_<KEY>`` environment variables
(handy in containers, e.g. ``IPQS_BULKD_SPOOL_ROOT=/spool``); the file; the defaults here.
Any problem raises :class:`ConfigError` whose message names the offending key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import ALL_TYPES
from daemon.api import RESULT_SETS

DEFAULT_PATH = Path("/etc/ipqs-bulkd/config.toml")
ENV_CONFIG = "IPQS_BULKD_CONFIG"
ENV_KEY = "IPQS_API_KEY"
ENV_PREFIX = "IPQS_BULKD_"
REDACTED = "<redacted>"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


@dataclass(frozen=True)
class ApiConfig:
    base_url: str = "https://www.ipqualityscore.com/api"
    key: str = field(default="", repr=False)
    key_file: str = ""
    key_in: str = "path"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    ca_bundle: str = ""
    download_hosts: tuple[str, ...] = ("downloads.ipqualityscore.com",)
    max_download_bytes: int = 10 * 1024**3


@dataclass(frozen=True)
class SpoolConfig:
    root: Path = Path("/var/lib/ipqs-bulkd")
    types: tuple[str, ...] = ("proxy", "email", "phone", "url")
    file_mode: int = 0o640


@dataclass(frozen=True)
class WatchConfig:
    """How the watcher decides that a file is complete (see :mod:`daemon.watcher`)."""

    #: Size, mtime and inode must stay unchanged this long when writers are visible.
    settle_seconds: float = 0.2
    #: ... and this long when they are not ("quiet", or /proc only partly readable).
    quiet_seconds: float = 5.0
    #: "auto" | "proc" | "quiet".
    writer_check: str = "auto"
    #: Full rescan period: events get lost on overflow, on NFS and across restarts.
    rescan_seconds: float = 60.0
    #: Poll instead of inotify, for NFS/SMB mounts where inotify sees nothing.
    force_polling: bool = False
    #: Polling interval when ``force_polling``.
    poll_delay_ms: int = 500
    #: Bound of the hand-off queue.
    queue_size: int = 64


@dataclass(frozen=True)
class UploadConfig:
    concurrency: int = 4
    method: str = "multipart"
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    duplicate_window_hours: float = 24.0
    lease_seconds: float = 60.0
    lookup_delay_seconds: float = 60.0
    json_max_bytes: int = 8 * 1024 * 1024
    pause_initial_seconds: float = 5.0
    pause_max_seconds: float = 60.0


@dataclass(frozen=True)
class PollConfig:
    initial_seconds: float = 2.0
    max_seconds: float = 60.0
    factor: float = 1.5
    deadline_hours: float = 24.0


@dataclass(frozen=True)
class ResultsConfig:
    sets: tuple[str, ...] = ("all",)


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class HealthConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9187


@dataclass(frozen=True)
class ServiceConfig:
    shutdown_seconds: float = 8.0


@dataclass(frozen=True)
class BudgetConfig:
    """Money guards (see README "Money"); every default leaves behaviour as before."""

    check_credits: bool = True
    reserve_credits: int = 0
    max_rows_per_day: int = 0  # 0 = no limit; per UTC day, shared by the spool's daemons
    max_rows_per_day_by_type: dict[str, int] = field(default_factory=dict)
    max_rows_per_file: int = 0  # 0 = no cap

    def check(self, types: tuple[str, ...]) -> None:
        """Raise ``ConfigError`` for a per-type budget that is negative or names a type
        that is not in ``spool.types`` (it could never apply)."""
        key = "budget.max_rows_per_day_by_type"
        for name, rows in self.max_rows_per_day_by_type.items():
            if name not in types:
                raise ConfigError(f"config key {key} has {name!r}, which is not in "
                                  f"spool.types ({', '.join(types)})")
            if rows < 0:
                raise ConfigError(f"config key {key} must not be negative, got {name} = {rows}")


@dataclass(frozen=True)
class Config:
    api: ApiConfig = field(default_factory=ApiConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    poll: PollConfig = field(default_factory=PollConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def as_dict(self, *, redact: bool = True) -> dict[str, dict[str, Any]]:
        """The effective configuration as plain TOML-able data, the key masked."""
        out: dict[str, dict[str, Any]] = {}
        for section in dataclasses.fields(self):
            values = dataclasses.asdict(getattr(self, section.name))
            for name, value in values.items():
                if isinstance(value, Path):
                    values[name] = str(value)
                elif isinstance(value, tuple):
                    values[name] = list(value)
            if section.name == "api" and redact and values["key"]:
                values["key"] = REDACTED
            out[section.name] = values
        return out


_CHOICES: dict[str, tuple[str, ...]] = {
    "api.key_in": ("path", "header"),
    "watch.writer_check": ("auto", "proc", "quiet"),
    "upload.method": ("multipart", "json"),
    "log.level": ("debug", "info", "warning", "error"),
    "log.format": ("auto", "json", "console"),
}
_MEMBERS: dict[str, tuple[str, ...]] = {"spool.types": ALL_TYPES, "results.sets": RESULT_SETS}
# Keys whose value may be zero; every other number must be strictly positive.
_ZERO_OK = {"upload.duplicate_window_hours", "health.port", "spool.file_mode",
            "budget.reserve_credits", "budget.max_rows_per_day", "budget.max_rows_per_file"}


def default_config_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get(ENV_CONFIG) or DEFAULT_PATH)


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, merge and validate the configuration.

    ``path=None`` means "no file": defaults plus environment. A path that does not exist is
    an error, unless it is the built-in default path, which is optional.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(path)
    _apply_env(data, environ)
    config = Config(**{name: _build_section(name, cls, data.pop(name, {}))
                       for name, cls in _sections().items()})
    if data:
        raise ConfigError(f"unknown config section [{sorted(data)[0]}]")
    _check_pairs(config)
    config.budget.check(config.spool.types)
    return _with_key(config, environ)


def _check_pairs(config: Config) -> None:
    """Checks that involve two keys: a start value may not exceed its cap."""
    pairs = (("poll.initial_seconds", config.poll.initial_seconds,
              "poll.max_seconds", config.poll.max_seconds),
             ("upload.retry_initial_seconds", config.upload.retry_initial_seconds,
              "upload.retry_max_seconds", config.upload.retry_max_seconds),
             ("upload.pause_initial_seconds", config.upload.pause_initial_seconds,
              "upload.pause_max_seconds", config.upload.pause_max_seconds),
             ("watch.settle_seconds", config.watch.settle_seconds,
              "watch.quiet_seconds", config.watch.quiet_seconds))
    for low_key, low, high_key, high in pairs:
        if low > high:
            raise ConfigError(f"config key {low_key} ({low:g}) must not exceed "
                              f"{high_key} ({high:g})")


def _sections() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Fold ``IPQS_BULKD_SECTION_KEY=value`` into the parsed file, as strings."""
    sections = _sections()
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG:
            continue
        rest = var[len(ENV_PREFIX):].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            # A typo here would otherwise be ignored in silence.
            raise ConfigError(f"environment variable {var} names no config section")
        data.setdefault(section, {})[rest[len(section) + 1:]] = _EnvValue(raw, var)


@dataclass(frozen=True)
class _EnvValue:
    """A value from the environment: a string to be coerced to the field's type."""

    raw: str
    var: str


def _build_section(section: str, cls: type[Any], table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"unknown config key {section}.{unknown[0]}")
    values = {name: _coerce(f"{section}.{name}", hints[name], value)
              for name, value in table.items()}
    built = cls(**values)
    for f in dataclasses.fields(cls):
        _check(f"{section}.{f.name}", getattr(built, f.name))
    return built


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# For each field type: does a parsed TOML value fit, and how to convert it.
_ACCEPT: dict[Any, tuple[typing.Callable[[Any], bool], typing.Callable[[Any], Any]]] = {
    bool: (lambda v: isinstance(v, bool), bool),
    int: (lambda v: _is_number(v) and isinstance(v, int), int),
    float: (_is_number, float),
    str: (lambda v: isinstance(v, str), str),
    Path: (lambda v: isinstance(v, str) and bool(v), Path),
    tuple[str, ...]: (lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
                      tuple),
    dict[str, int]: (lambda v: isinstance(v, dict) and all(
        isinstance(n, int) and not isinstance(n, bool) for n in v.values()), dict),
}


def _coerce(key: str, hint: Any, value: Any) -> Any:
    if isinstance(value, _EnvValue):
        value = _from_env(key, hint, value)
    accepts, convert = _ACCEPT[hint]
    if not accepts(value):
        shown = "a value that is not shown" if key == "api.key" else repr(value)
        raise ConfigError(f"config key {key} must be {_describe(hint)}, got {shown}")
    return convert(value)


def _from_env(key: str, hint: Any, env: _EnvValue) -> Any:
    raw = env.raw.strip()
    try:
        if hint is bool:
            return {"1": True, "true": True, "yes": True, "0": False, "false": False,
                    "no": False}[raw.lower()]
        if hint is int:
            # Modes are octal, whether written 640, 0640 or 0o640.
            return int(raw, 8) if key.endswith("_mode") else int(raw, 0)
        if hint is float:
            return float(raw)
    except (KeyError, ValueError):
        raise ConfigError(f"config key {key} (from {env.var}) must be {_describe(hint)}, "
                          f"got {env.raw!r}") from None
    if typing.get_origin(hint) is tuple:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if typing.get_origin(hint) is dict:
        return _table_from_env(key, env)
    return raw


def _table_from_env(key: str, env: _EnvValue) -> dict[str, int]:
    """``email=100000,phone=5000`` as a table of whole numbers."""
    table: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in env.raw.split(","))):
        name, _, number = item.partition("=")
        try:
            table[name.strip()] = int(number.strip())
        except ValueError:
            raise ConfigError(f"config key {key} (from {env.var}) must be like "
                              f"'email=100000,phone=5000', got {env.raw!r}") from None
    return table


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    if typing.get_origin(hint) is dict:
        return "a table of whole numbers, like { email = 100000 }"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             Path: "a non-empty path"}
    return names.get(hint, str(hint))


def _check(key: str, value: Any) -> None:
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"config key {key} must be one of {', '.join(_CHOICES[key])}, "
                          f"got {value!r}")
    if key in _MEMBERS:
        _check_members(key, value, _MEMBERS[key])
    if _is_number(value) and (not math.isfinite(value) or value < 0):
        raise ConfigError(f"config key {key} must not be negative, got {value!r}")
    if _is_number(value) and value == 0 and key not in _ZERO_OK:
        raise ConfigError(f"config key {key} must be more than 0, got {value!r}")
    if key == "health.port" and value > 65535:
        raise ConfigError(f"config key health.port must be a port number (0-65535), "
                          f"got {value!r}")
    if key == "poll.factor" and value < 1:
        raise ConfigError(f"config key poll.factor must be at least 1, got {value!r}")
    if key == "api.base_url" and not value.startswith(("http://", "https://")):
        raise ConfigError(f"config key api.base_url must be an http(s) URL, got {value!r}")
    if key == "api.ca_bundle" and value and not os.access(value, os.R_OK):
        raise ConfigError(f"config key api.ca_bundle: cannot read {value}")
    if key == "spool.file_mode" and not 0 <= value <= 0o777:
        raise ConfigError(f"config key spool.file_mode must be a permission mode, "
                          f"got {oct(value)}")


def _check_members(key: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    if not values:
        raise ConfigError(f"config key {key} must not be empty")
    for value in values:
        if value not in allowed:
            raise ConfigError(f"config key {key} has {value!r}; allowed: {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise ConfigError(f"config key {key} lists a value twice")


def _with_key(config: Config, environ: Mapping[str, str]) -> Config:
    """Resolve the API key: environment, then key_file, then the key in the file."""
    key = environ.get(ENV_KEY, "").strip()
    if not key and config.api.key_file:
        key = _read_key_file(config.api.key_file, environ)
    key = key or config.api.key.strip()
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise ConfigError("config key api.key contains whitespace or control characters")
    return dataclasses.replace(config, api=dataclasses.replace(config.api, key=key))


def _read_key_file(name: str, environ: Mapping[str, str]) -> str:
    path = Path(name)
    if not path.is_absolute() and environ.get("CREDENTIALS_DIRECTORY"):
        # systemd LoadCredential=: a bare credential name is looked up in its directory.
        path = Path(environ["CREDENTIALS_DIRECTORY"]) / path
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"config key api.key_file: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config key api.key_file: {path} is not UTF-8 text") from None

