"""The layers of design.md hold: the import statements of a module, read with ``ast``
(function-level imports included), never reach a layer above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from daemon import ALL_TYPES
from daemon.sandbox.handlers import FILE_TYPES

PACKAGE = Path(__file__).resolve().parent.parent / "daemon"
# Stages and the service: an operator command must work without them.
ABOVE_COMMANDS = ("daemon.watcher", "daemon.uploader", "daemon.poller", "daemon.pipeline",
                  "daemon.finishing",
                  "daemon.service")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, *, text: str | None = None) -> set[str]:
    """Every module ``path`` imports, as dotted names; ``from a import b`` gives ``a`` and
    ``a.b`` (b may be a module). ``text`` stands in for the file's content."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], base]).strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def reaches(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("source", [
    "import daemon.watcher", "from daemon.service import Service", "from daemon import poller",
    "from .. import uploader", "from ..pipeline import Pipeline",
    "def f():\n    from daemon.pipeline import Pipeline\n"])
def test_the_import_reader_sees_every_form(source: str) -> None:
    # The checks below are only as good as this reader: it must catch each way of writing it.
    where = PACKAGE / "commands" / "probe.py"
    assert reaches(imported(where, text=source), ABOVE_COMMANDS) != []


def test_the_import_reader_passes_the_lower_layers() -> None:
    where = PACKAGE / "commands" / "probe.py"
    text = "from daemon.spool import Spool\nfrom ..api import make_client\nimport daemon.config"
    assert imported(where, text=text) >= {"daemon.spool", "daemon.api", "daemon.config"}
    assert reaches(imported(where, text=text), ABOVE_COMMANDS) == []


def commands() -> list[Path]:
    return sorted((PACKAGE / "commands").glob("*.py"))


@pytest.mark.parametrize("path", commands())
def test_commands_never_import_the_stages_or_the_service(path: Path) -> None:
    assert reaches(imported(path), ABOVE_COMMANDS) == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "job").glob("*.py")), ids=lambda p: p.name)
def test_the_job_layer_never_imports_stages_service_or_commands(path: Path) -> None:
    # The stages and submit both use the job layer; it must not lean on either.
    assert reaches(imported(path), (*ABOVE_COMMANDS, "daemon.commands", "daemon.cli")) == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "sandbox").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_sandbox_knows_nothing_of_the_daemon(path: Path) -> None:
    outside = sorted(n for n in imported(path) if (n == "daemon" or n.startswith("daemon."))
                     and not (n == "daemon.sandbox" or n.startswith("daemon.sandbox.")))
    assert outside == []


def test_the_sandbox_accepts_the_types_the_daemon_knows() -> None:
    # Two copies of IPQS's type list, one per side of the layer line: they must agree.
    assert FILE_TYPES == ALL_TYPES


# -- the tests: helpers live in helper modules, never in another test module (issue 12) --------

TESTS = Path(__file__).resolve().parent


def imported_tests(names: set[str]) -> list[str]:
    """The test modules among ``names``: ``tests.test_*`` (or a bare ``test_*``)."""
    return sorted(n for n in names if n.startswith("tests.test_") or n.startswith("test_"))


@pytest.mark.parametrize("source", [
    "from tests.test_first_run import clean_env", "import tests.test_shares",
    "from tests import test_packaging", "from . import test_finishing",
    "from .test_finishing import until", "import test_first_run",
    "def f():\n    from tests.test_shares import paid\n"])
def test_the_import_reader_sees_every_way_to_import_a_test_module(source: str) -> None:
    assert imported_tests(imported(TESTS / "test_probe.py", text=source)) != []


def test_the_import_reader_passes_the_helper_modules() -> None:
    text = ("from tests.support import REPO\nfrom tests import shares\nimport tests.deployed\n"
            "from .cli_helpers import cli")
    assert imported_tests(imported(TESTS / "test_probe.py", text=text)) == []


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.name)
def test_no_test_module_imports_another(path: Path) -> None:
    # Shared helpers belong in conftest.py or a helper module (support, shares, deployed,
    # cli_helpers, dockerfile): importing a test module runs and re-collects its tests.
    assert imported_tests(imported(path)) == []
