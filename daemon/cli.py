"""The command line: the only place that configures logging or chooses an exit status.

Exit statuses: 0 success; 1 a batch (``run --once``) had a failed file, or a stage of the
daemon crashed; 2 a usage or configuration error, with one line that names the key. The
commands for people (:mod:`daemon.commands`) add 3 to 6 and 130; see their ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import structlog
from aiohttp import web

from daemon import __version__
from daemon import commands as people
from daemon.commands.common import Console
from daemon.config import (
    ENV_CONFIG,
    ENV_KEY,
    Config,
    ConfigError,
    HealthConfig,
    SpoolConfig,
    default_config_path,
    key_source,
    load_config,
)
from daemon.logs import add_secret, configure
from daemon.notify import Notifier
from daemon.shown import shown

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SANDBOX_SPOOL = Path("ipqs-spool")
#: Written into the spool by ``run --sandbox`` while it runs: the config of the other commands.
SANDBOX_CONFIG = "sandbox.toml"
#: The one rule for the sandbox's spool, as --help, README.md and _load() apply it.
SANDBOX_RULE = ("spool: spool.root from the config you name (--config or "
                "$IPQS_BULKD_CONFIG) or IPQS_BULKD_SPOOL_ROOT, else ./ipqs-spool; "
                "/etc/ipqs-bulkd/config.toml is not read")
#: How to check the key where systemd hands it over (LoadCredential=) as the unit does.
_UNIT_CHECK_LINES = ("systemd-run -P -p LoadCredential=api-key:/etc/ipqs-bulkd/api-key",
                     "-p Environment=IPQS_BULKD_API_KEY_FILE=api-key",
                     "/opt/ipqs-bulkd/venv/bin/ipqs-bulkd check-config")
UNIT_CHECK = " ".join(_UNIT_CHECK_LINES)
CHECK_CONFIG_HELP = """\
Load the configuration the way `run` does (the file, then IPQS_BULKD_* environment
variables, then IPQS_API_KEY), check every key, and print the effective values as TOML:
paths absolute, the key redacted, and a first line that says where the API key comes
from. A problem is one line that names the key, exit status 2.

The key of the systemd unit (LoadCredential=) exists only inside the unit; check it there:
  """ + " \\\n      ".join(_UNIT_CHECK_LINES) + "\n"

RUN_EPILOG = """\
examples:
  ipqs-bulkd run --sandbox                    # try it: the built-in emulator, no key
  ipqs-bulkd run --config /etc/ipqs-bulkd/config.toml
  ipqs-bulkd run --once --config batch.toml   # what is there now, then exit

exit status:
  0    stopped by SIGTERM or SIGINT; with --once, every file ended in done/
  1    with --once, a file ended in failed/; or a stage of the daemon crashed
  2    usage or configuration error (the message names the option or config key), also
       a spool root it cannot write or a health port that is taken
  130  a second SIGINT (143: a second SIGTERM) during shutdown: stopped at once
"""

log = structlog.get_logger(__name__)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the command, not a screen of usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from daemon.sandbox import add_arguments as add_sandbox_arguments

    parser = _Parser(
        prog="ipqs-bulkd",
        description="Submit CSV files dropped into inbox/<type>/ to the IPQualityScore Bulk "
                    "CSV API, and file them under done/ or failed/ with a JSON record.")
    parser.add_argument("--version", action="version", version=f"ipqs-bulkd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run the daemon in the foreground",
        description="Watch the inboxes and process files until SIGTERM/SIGINT.",
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config(run)
    run.add_argument("--once", action="store_true",
                     help="process the files present now (and any left in processing/), then "
                          "exit: 0 if all ended in done/, 1 if any ended in failed/")
    run.add_argument("--sandbox", action="store_true",
                     help="start the built-in IPQS emulator on loopback and use it (no key "
                          f"needed; {SANDBOX_RULE})")

    sandbox = commands.add_parser(
        "sandbox", help="run the local IPQS Bulk CSV API emulator",
        description="A faithful local emulator of the IPQS Bulk CSV API, with fault knobs.")
    add_sandbox_arguments(sandbox)

    check = commands.add_parser(
        "check-config", help="validate and print the effective config",
        description=CHECK_CONFIG_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status:\n  0    valid\n  2    a configuration error (the message names "
               "the key)")
    _add_config(check)

    # Commands for people (submit, fetch, status, jobs, retry): daemon/commands/.
    people.add_parsers(commands, _add_config)
    return parser


def _unrecognized(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> NoReturn:
    """Usage error from the subcommand's parser (``ipqs-bulkd run: ...``), with the option
    it probably meant."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = subparsers.choices[command]
    options = [o for a in sub._actions for o in a.option_strings]
    guess = difflib.get_close_matches(extra[0].split("=", 1)[0], options, n=1)
    hint = f" (did you mean {guess[0]}?)" if guess else ""
    sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="PATH",
                        help="config file (default: $IPQS_BULKD_CONFIG, else "
                             "/etc/ipqs-bulkd/config.toml)")


def _load(ns: argparse.Namespace, *, sandbox: bool = False) -> Config:
    """The config from --config, $IPQS_BULKD_CONFIG or the default path.

    The default path may be absent (defaults + environment apply); an explicit one may not.
    ``run --sandbox`` follows :data:`SANDBOX_RULE`.
    """
    explicit = ns.config or (Path(os.environ[ENV_CONFIG]) if os.environ.get(ENV_CONFIG)
                             else None)
    if sandbox:
        # The emulator's made-up results (and duplicate markers) must never land in the
        # production spool: the production config is not read, and the default root is
        # ./ipqs-spool. A root that is set (config named, environment) is used as set.
        # Its health listener takes any free port unless one is set (status finds it through
        # the spool's .daemon/), so a second quick start or a deployed daemon does not clash.
        sandbox_spool = SpoolConfig(root=Path.cwd() / SANDBOX_SPOOL)
        return load_config(explicit, os.environ,
                           defaults=Config(spool=sandbox_spool, health=HealthConfig(port=0)))
    return load_config(_config_file(ns), os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:
        _unrecognized(parser, ns.command, extra)
    try:
        if ns.command == "sandbox":
            return _sandbox(ns)
        config = _load(ns, sandbox=getattr(ns, "sandbox", False))
        if ns.command == "check-config":
            return _check_config(config, from_file=_config_file(ns) is not None)
        if ns.command in people.NAMES:
            _refuse_production_beside_sandbox(ns, config)
            configure("warning", config.log.format)
            add_secret(config.api.key)
            return people.run(ns, config)
        return _run(config, once=ns.once, sandbox=ns.sandbox)
    except ConfigError as exc:
        # One line, whatever the paths in it hold (config messages name paths raw).
        print(f"ipqs-bulkd: {shown(exc)}", file=sys.stderr)
        return EXIT_USAGE


def _refuse_production_beside_sandbox(ns: argparse.Namespace, config: Config) -> None:
    """No config file at all, beside a quick start that is running: the sandbox is meant.

    Say how to reach it, rather than show the production spool's default root or send a
    file to the real IPQS with a key that happens to be in the environment.
    """
    if _config_file(ns) is not None:
        return
    handed = SANDBOX_SPOOL / SANDBOX_CONFIG
    if config.spool.root != SpoolConfig().root or not handed.is_file():
        return
    default = default_config_path(os.environ)
    raise ConfigError(f"config file: none given and {default} is absent, so this would "
                      f"use spool.root {shown(config.spool.root)} and the real IPQS; for the "
                      f"sandbox running from this folder, add --config {handed}")


def _config_file(ns: argparse.Namespace) -> Path | None:
    """The config file to read: named (--config, $IPQS_BULKD_CONFIG), or the default path
    if it exists."""
    if ns.config:
        return Path(ns.config)
    path = default_config_path(os.environ)
    return path if os.environ.get(ENV_CONFIG) or path.exists() else None


def run_main() -> None:
    """Console-script entry point."""
    sys.exit(main())


def _check_config(config: Config, *, from_file: bool) -> int:
    # Console drops the rest of the output when the reader goes (`check-config | head -2`).
    console = Console.current(config)
    source = key_source(config.api, os.environ)
    if source is None:
        # The unit's way to check is for a deployed config; someone trying it has none.
        where = (f"under systemd it comes from LoadCredential=, check it with: {UNIT_CHECK}"
                 if from_file else "`ipqs-bulkd run --sandbox` needs none")
        console.note(f"# warning: no API key here (set api.key, api.key_file or {ENV_KEY}); "
                     f"{where}")
    else:
        console.line(f"# API key: from {shown(source)}")
    console.line("\n".join(_toml_lines(config.as_dict())))
    return EXIT_OK


def _toml_lines(sections: dict[str, dict[str, object]]) -> list[str]:
    """The config as TOML, one line per key and an empty line after each section."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            text = oct(value) if key == "file_mode" and isinstance(value, int) \
                else _toml_value(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return lines


def _toml_value(value: object) -> str:
    if isinstance(value, dict):  # an inline table; JSON's {"a": 1} is not TOML
        return "{ " + ", ".join(f"{name} = {json.dumps(v)}" for name, v in value.items()) + " }"
    return json.dumps(value)


def _run(config: Config, *, once: bool, sandbox: bool) -> int:
    if not config.api.key and not sandbox:
        raise ConfigError("config key api.key is empty: set api.key, api.key_file or "
                          "IPQS_API_KEY (or try `ipqs-bulkd run --sandbox`)")
    configure(config.log.level, config.log.format)
    if config.api.key:
        add_secret(config.api.key)
    return asyncio.run(_serve(config, once=once, sandbox=sandbox))


async def _serve(config: Config, *, once: bool, sandbox: bool) -> int:
    from daemon.service import Service

    runner: web.AppRunner | None = None
    handoff: _SandboxHandoff | None = None
    if sandbox:
        runner, config, banner = await _start_sandbox(config)
        handoff = _SandboxHandoff(config, banner)
    service = Service(config, notifier=_ReadyBanner(handoff.ready if handoff else None))
    service.install_signal_handlers()
    try:
        return await service.run(once=once)
    finally:
        service.remove_signal_handlers()
        if handoff is not None:
            handoff.remove()
        if runner is not None:
            await runner.cleanup()


class _ReadyBanner(Notifier):
    """systemd's notifier; once the daemon is ready, not before, calls ``on_ready`` and
    prints what it returns.

    So a daemon that cannot start (a taken health port...) says only why.
    """

    def __init__(self, on_ready: Callable[[], str] | None) -> None:
        super().__init__()
        self._on_ready = on_ready

    def send(self, **fields: str) -> bool:
        if "READY" in fields and self._on_ready is not None:
            print(self._on_ready(), file=sys.stderr, flush=True)
            self._on_ready = None
        return super().send(**fields)


class _SandboxHandoff:
    """``<spool>/sandbox.toml`` while ``run --sandbox`` runs: the config with which the other
    commands (status, jobs, submit, retry) reach this run's spool and its sandbox, whose
    port is new each run. Written once the daemon is ready; removed at exit if unchanged.
    """

    def __init__(self, config: Config, banner: str) -> None:
        self.path = config.spool.root / SANDBOX_CONFIG
        self.text = _sandbox_toml(config)
        self.banner = banner

    def ready(self) -> str:
        """Write the file; the banner, with the next command to run."""
        try:
            tmp = self.path.with_name(f".{SANDBOX_CONFIG}.tmp")
            tmp.write_text(self.text)
            tmp.replace(self.path)
        except OSError as exc:
            return (f"{self.banner}\nipqs-bulkd: could not write {shown(self.path)} "
                    f"({exc.strerror}): the other commands need --config with "
                    "api.base_url set to the sandbox above")
        shown_path = shlex.quote(shown(_relative(self.path)))
        return (f"{self.banner}\nin another terminal: {invoked_as()} status "
                f"--config {shown_path}")

    def remove(self) -> None:
        try:
            if self.path.read_text() == self.text:  # not another sandbox run's since
                self.path.unlink()
        except (OSError, ValueError):
            pass  # gone already, or not ours to remove


def invoked_as() -> str:
    """This command as it can be typed again from the working directory: ``ipqs-bulkd`` if
    that is what PATH finds, else the path it was started by (``.venv/bin/ipqs-bulkd``),
    or ``PYTHON -m daemon``."""
    started = Path(sys.argv[0])
    if started.name == "__main__.py":
        return f"{shlex.quote(shown(_relative(Path(sys.executable))))} -m daemon"
    found = shutil.which(started.name)
    if found and Path(found).resolve() == started.resolve():
        return started.name
    path = str(_relative(started.absolute()))
    return shlex.quote(shown(path if os.sep in path else f".{os.sep}{path}"))


def _relative(path: Path) -> Path:
    """``path`` from the working directory when it is under it (shorter to type)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def _sandbox_toml(config: Config) -> str:
    from daemon.sandbox import TEST_KEY

    sections = config.as_dict(redact=False)
    lines = ["# Written by `ipqs-bulkd run --sandbox` for the other commands while it runs;",
             "# the sandbox's port is new each run. Removed when it stops."]
    if sections["api"]["key"] != TEST_KEY:
        # A real key is never written to a file: the commands find it where the daemon did.
        sections["api"]["key"] = ""
        lines.append("# api.key is left out: give the commands the key this run was given "
                     f"(from {key_source(config.api, os.environ) or 'api.key'}).")
    return "\n".join([*lines, *_toml_lines(sections)])


async def _start_sandbox(config: Config) -> tuple[web.AppRunner, Config, str]:
    """Start the emulator on a free loopback port and point the config at it."""
    from daemon.sandbox import TEST_KEY, SandboxSettings, create_app

    settings = SandboxSettings(first_id=int(time.time()) % 10**9 * 1000)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    api = dataclasses.replace(config.api, base_url=f"http://127.0.0.1:{port}/api",
                              key=config.api.key or TEST_KEY)
    config = dataclasses.replace(config, api=api)
    inbox = config.spool.root / "inbox"
    banner = (f"ipqs-bulkd: sandbox IPQS at http://127.0.0.1:{port}; put CSV files into "
              f"{shown(inbox)}/<type>/ (types: {', '.join(config.spool.types)}) by writing "
              f"them elsewhere and renaming them in; results appear in "
              f"{shown(config.spool.root)}/done/.")
    return runner, config, banner


def _sandbox(ns: argparse.Namespace) -> int:
    from daemon.sandbox import create_app, settings_from_args

    configure("info", "auto")
    settings = settings_from_args(ns)
    print(f"ipqs-bulkd: sandbox listening on http://{ns.host}:{ns.port}/api", file=sys.stderr,
          flush=True)
    web.run_app(create_app(settings), host=ns.host, port=ns.port, print=None,
                access_log=None)
    return EXIT_OK
