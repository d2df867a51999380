"""Configuration: one TOML file into frozen dataclasses, validated once at start.

Every key is documented with its default in ``config.example.toml``, and its limits are
declared next to its field (:mod:`daemon.constraints`). Precedence, highest first:
``IPQS_API_KEY`` for the key; ``IPQS_BULKD_<SECTION>_<KEY>`` environment variables (handy
in containers, e.g. ``IPQS_BULKD_SPOOL_ROOT=/spool``); the file; the defaults here.
A relative path in the file is taken from the file's folder, one from the environment
from the working directory; ``~`` is expanded in both.
Any problem raises :class:`ConfigError` whose message names the offending key.

To add a section: a frozen dataclass subclassing :class:`Section`, named ``<Name>Config``,
and one field of :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import os
import pwd
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from daemon import ALL_TYPES
from daemon.api import RESULT_SETS
from daemon.constraints import (
    Between,
    ConfigError,
    FieldError,
    Host,
    Hours,
    HttpUrl,
    Members,
    Mode,
    NotAbove,
    Readable,
    Seconds,
    Secret,
    Section,
    field_type,
)

__all__ = ["Config", "ConfigError", "FieldError", "key_source", "load_config",
           "spool_root_error"]

DEFAULT_PATH = Path("/etc/ipqs-bulkd/config.toml")
ENV_CONFIG = "IPQS_BULKD_CONFIG"
ENV_KEY = "IPQS_API_KEY"
ENV_PREFIX = "IPQS_BULKD_"
#: Set by the daemon for its hooks (``hooks.on_finish``), not config: a hook that runs
#: an ipqs-bulkd command must not have them read as unknown keys.
HOOK_ENV = ("IPQS_BULKD_OUTCOME", "IPQS_BULKD_TYPE", "IPQS_BULKD_RECORD")
REDACTED = "<redacted>"
#: Real IPQS keys have 32 characters; a shorter one is a copy-paste accident, and masking
#: it in logs would mask every occurrence of a common word.
MIN_KEY_LENGTH = 16
GiB = 1024**3


@dataclass(frozen=True)
class ApiConfig(Section):
    base_url: Annotated[str, HttpUrl()] = "https://www.ipqualityscore.com/api"
    key: Annotated[str, Secret()] = field(default="", repr=False)
    key_file: str = ""
    key_in: Literal["path", "header"] = "path"
    connect_timeout: Seconds = 10.0
    read_timeout: Seconds = 60.0
    total_timeout_seconds: Seconds = 120.0
    ca_bundle: Annotated[str, Readable()] = ""
    download_hosts: Annotated[tuple[str, ...], Host()] = ("downloads.ipqualityscore.com",)
    max_download_bytes: Annotated[int, Between(1, 1024 * GiB)] = 10 * GiB


@dataclass(frozen=True)
class SpoolConfig(Section):
    root: Path = Path("/var/lib/ipqs-bulkd")
    types: Annotated[tuple[str, ...], Members(ALL_TYPES)] = ("proxy", "email", "phone", "url")
    file_mode: Annotated[int, Mode()] = 0o640
    #: Free space on the spool's file system below this many MiB is a warning (0 = none).
    min_free_mb: Annotated[int, Between(0, 1024**3)] = 1024


@dataclass(frozen=True)
class WatchConfig(Section):
    """How the watcher decides that a file is complete (see :mod:`daemon.watcher`)."""

    #: Size, mtime and inode must stay unchanged this long when writers are visible.
    settle_seconds: Annotated[Seconds, NotAbove("quiet_seconds")] = 0.2
    #: ... and this long when they are not ("quiet", or /proc only partly readable).
    quiet_seconds: Seconds = 5.0
    writer_check: Literal["auto", "lease", "proc", "quiet"] = "auto"
    #: Full rescan period: events get lost on overflow, on NFS and across restarts.
    rescan_seconds: Seconds = 60.0
    #: Poll instead of inotify, for NFS/SMB mounts where inotify sees nothing.
    force_polling: bool = False
    #: Polling interval when ``force_polling``.
    poll_delay_ms: Annotated[int, Between(1, 60_000)] = 500
    #: Bound of the hand-off queue (0 would make it unbounded).
    queue_size: Annotated[int, Between(1, 100_000)] = 64


@dataclass(frozen=True)
class UploadConfig(Section):
    concurrency: Annotated[int, Between(1, 256)] = 4
    method: Literal["multipart", "json"] = "multipart"
    retry_initial_seconds: Annotated[Seconds, NotAbove("retry_max_seconds")] = 1.0
    retry_max_seconds: Seconds = 60.0
    duplicate_window_hours: Annotated[float, Between(0, 365 * 24)] = 24.0
    lease_seconds: Seconds = 60.0
    lookup_delay_seconds: Seconds = 60.0
    json_max_bytes: Annotated[int, Between(1, GiB // 4)] = 8 * 1024 * 1024
    pause_initial_seconds: Annotated[Seconds, NotAbove("pause_max_seconds")] = 5.0
    pause_max_seconds: Seconds = 60.0


@dataclass(frozen=True)
class PollConfig(Section):
    initial_seconds: Annotated[Seconds, NotAbove("max_seconds")] = 2.0
    max_seconds: Seconds = 60.0
    factor: Annotated[float, Between(1, 10)] = 1.5
    deadline_hours: Hours = 24.0


@dataclass(frozen=True)
class ResultsConfig(Section):
    sets: Annotated[tuple[str, ...], Members(RESULT_SETS)] = ("all",)


@dataclass(frozen=True)
class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class HealthConfig(Section):
    enabled: bool = True
    host: Annotated[str, Host()] = "127.0.0.1"
    #: 0 picks a free port.
    port: Annotated[int, Between(0, 65535)] = 9187


@dataclass(frozen=True)
class ServiceConfig(Section):
    shutdown_seconds: Seconds = 8.0


#: Rows and credits: far above any real account, low enough to catch a slip of the keyboard.
Rows = Annotated[int, Between(0, 10**12)]


@dataclass(frozen=True)
class BudgetConfig(Section):
    """Money guards (see README "Money"); every default leaves behaviour as before."""

    check_credits: bool = True
    reserve_credits: Rows = 0
    max_rows_per_day: Rows = 0  # 0 = no limit; per UTC day, shared by the spool's daemons
    max_rows_per_day_by_type: Annotated[dict[str, int], Between(0, 10**12)] = field(
        default_factory=dict)
    max_rows_per_file: Rows = 0  # 0 = no cap

    def check(self, types: tuple[str, ...]) -> None:
        """Raise ``ConfigError`` for a per-type budget that names a type that is not in
        ``spool.types`` (it could never apply)."""
        key = "budget.max_rows_per_day_by_type"
        for name in self.max_rows_per_day_by_type:
            if name not in types:
                raise ConfigError(f"config key {key} has {name!r}, which is not in "
                                  f"spool.types ({', '.join(types)})")


@dataclass(frozen=True)
class HooksConfig(Section):
    """Programs run for every finished file (see README "Hooks")."""

    #: argv, run without a shell; the record's path is appended. Empty: no hook.
    on_finish: tuple[str, ...] = ()
    timeout_seconds: Seconds = 60.0


#: Days to keep something; 0 = forever. At most a century.
Days = Annotated[int, Between(0, 36500)]


@dataclass(frozen=True)
class RetentionConfig(Section):
    """How long finished files are kept (see README "Housekeeping"); 0 = forever."""

    done_days: Days = 0
    failed_days: Days = 0
    history_days: Days = 0


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
    hooks: HooksConfig = field(default_factory=HooksConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)

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


def default_config_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get(ENV_CONFIG) or DEFAULT_PATH)


def load_config(path: Path | None, environ: Mapping[str, str] | None = None, *,
                defaults: Config | None = None) -> Config:
    """Read, merge and validate the configuration.

    ``path=None`` means "no file": defaults plus environment. ``defaults`` replaces the
    built-in defaults (``run --sandbox`` has its own spool root).
    """
    environ = os.environ if environ is None else environ
    defaults = defaults or Config()
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(path)
        _check_names(data)
    here = path.absolute().parent if path is not None else Path.cwd()
    _apply_env(data, environ)
    config = Config(**{f.name: _build_section(getattr(defaults, f.name), data.get(f.name, {}),
                                              here)
                       for f in dataclasses.fields(Config)})
    config.budget.check(config.spool.types)
    return _with_key(config, environ)


def _sections() -> dict[str, type[Section]]:
    return {f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder, not a file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} is not readable: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte "
                          f"{exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _did_you_mean(name: str, known: Any, shown: str = "{}") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {shown.format(close[0])}?)" if close else ""


def _check_names(data: dict[str, Any]) -> None:
    """Every section and key of the file is known; a typo gets a suggestion."""
    sections = _sections()
    for name, table in data.items():
        if name not in sections:
            raise ConfigError(f"unknown config section [{name}]"
                              + _did_you_mean(name, sections, "[{}]"))
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table")
        fields = [f.name for f in dataclasses.fields(sections[name])]
        for key in table:
            if key not in fields:
                raise ConfigError(f"unknown config key {name}.{key}"
                                  + _did_you_mean(key, fields, f"{name}.{{}}"))


@dataclass(frozen=True)
class _EnvValue:
    """A value from the environment: a string to be read as the field's type."""

    raw: str
    var: str


def _env_names() -> dict[str, tuple[str, str]]:
    """Every ``IPQS_BULKD_<SECTION>_<KEY>`` variable -> (section, key)."""
    return {f"{ENV_PREFIX}{section}_{f.name}".upper(): (section, f.name)
            for section, cls in _sections().items() for f in dataclasses.fields(cls)}


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Fold ``IPQS_BULKD_SECTION_KEY=value`` into the parsed file, as strings."""
    names = _env_names()
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG or var in HOOK_ENV:
            continue
        if var not in names:
            # A typo here would otherwise be ignored in silence.
            raise ConfigError(f"environment variable {var} names no config key"
                              + _did_you_mean(var, names))
        section, key = names[var]
        data.setdefault(section, {})[key] = _EnvValue(raw, var)


def _build_section(default: Section, table: dict[str, Any], here: Path) -> Any:
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name, value in table.items():
        base, marks = field_type(type(default), name)
        if isinstance(value, _EnvValue):
            origins[name] = value.var
            values[name] = _converted(base, _from_env(base, value.raw, marks), Path.cwd())
        else:
            values[name] = _converted(base, value, here)
    try:
        return dataclasses.replace(default, **values)
    except FieldError as exc:
        origin = origins.get(exc.key.partition(".")[2])
        raise FieldError(exc.key, exc.problem, origin) from None


def _converted(base: Any, value: Any, here: Path) -> Any:
    """A parsed value in the field's Python type, where its shape fits; else as it is."""
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is Path and isinstance(value, str) and value:
        try:
            return Path(os.path.normpath(here / Path(value).expanduser()))
        except RuntimeError:  # "~" and no home folder: shown as it is, as not a path
            return value
    if isinstance(value, list):
        return tuple(value)
    return value


def _from_env(base: Any, raw: str, marks: tuple[Any, ...]) -> Any:
    """A string from the environment as the field's type; left as it is if it does not fit."""
    text = raw.strip()
    try:
        if base is bool:
            return {"1": True, "true": True, "yes": True, "0": False, "false": False,
                    "no": False}.get(text.lower(), raw)
        if base is int:
            # Modes are octal, whether written 640, 0640 or 0o640.
            return int(text, 8) if Mode() in marks else int(text, 0)
        if base is float:
            return float(text)
    except ValueError:
        return raw
    items = [item.strip() for item in text.split(",") if item.strip()]
    if base == tuple[str, ...]:
        return items
    if base == dict[str, int]:  # email=100000,phone=500
        pairs = [item.partition("=") for item in items]
        try:
            return {name.strip(): int(value) for name, _, value in pairs}
        except ValueError:
            return raw
    return text


def key_source(api: ApiConfig, environ: Mapping[str, str]) -> str | None:
    """Where the key comes from, in the order it is looked for; None when nowhere."""
    if environ.get(ENV_KEY, "").strip():
        return ENV_KEY
    if api.key_file:
        path, credential = _key_file_path(api.key_file, environ)
        return f"api.key_file {path}" + (" (systemd LoadCredential=)" if credential else "")
    return "api.key" if api.key.strip() else None


def _with_key(config: Config, environ: Mapping[str, str]) -> Config:
    """Resolve the API key: environment, then key_file, then the key in the file."""
    source = key_source(config.api, environ)
    if source == ENV_KEY:
        key = environ[ENV_KEY].strip()
    elif source and source.startswith("api.key_file"):
        key = _read_key_file(config.api.key_file, environ)
    else:
        key = config.api.key.strip()
    shown = f" (from {source})" if source and source != "api.key" else ""
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise ConfigError(f"config key api.key{shown} contains whitespace or control characters")
    if key and len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"config key api.key{shown} is only {len(key)} characters long; an "
                          "IPQS key has 32 (was it copied whole?)")
    if key and any(key in arg for arg in config.hooks.on_finish):
        # The hook never sees the key: not in its environment, and not in its arguments.
        raise ConfigError("config key hooks.on_finish contains the API key; a hook must "
                          "not be given it")
    return dataclasses.replace(config, api=dataclasses.replace(config.api, key=key))


def _key_file_path(name: str, environ: Mapping[str, str]) -> tuple[Path, bool]:
    """The key file's path, and whether it is a systemd credential."""
    path = Path(name).expanduser()
    if not path.is_absolute() and environ.get("CREDENTIALS_DIRECTORY"):
        # systemd LoadCredential=: a bare credential name is looked up in its directory.
        return Path(environ["CREDENTIALS_DIRECTORY"]) / path, True
    return path, False


def _read_key_file(name: str, environ: Mapping[str, str]) -> str:
    path = _key_file_path(name, environ)[0]
    hint = ""
    if not path.is_absolute():
        hint = (" (a bare name is a systemd credential, read from $CREDENTIALS_DIRECTORY, "
                "which is set only inside the unit)")
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"config key api.key_file: cannot read {path}: "
                          f"{exc.strerror}{hint}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config key api.key_file: {path} is not UTF-8 text") from None


def spool_root_error(root: Path, exc: OSError) -> ConfigError:
    """A spool root that cannot be created or written, as one line that says the fix."""
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid {os.geteuid()}"
    # Not a directory: some part of the root is a file; show the root, not the subfolder.
    where = root if exc.errno == errno.ENOTDIR or not exc.filename else exc.filename
    fix = f"point spool.root (or IPQS_BULKD_SPOOL_ROOT) at a folder user {user} can write"
    if exc.errno in (errno.EACCES, errno.EPERM):
        fix += f", or create it for them: sudo install -d -o {user} {root}"
    return ConfigError(f"config key spool.root: cannot create {where} "
                       f"({exc.strerror or exc}); {fix}")
