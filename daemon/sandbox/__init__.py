"""The sandbox: a local emulator of the IPQualityScore Bulk CSV API, with fault knobs.

``create_app(settings)`` returns an aiohttp application that answers like IPQS (as its
Bulk CSV API documentation and OpenAPI description have it) on ``/api/{json|xml}/csv/...``,
``/api/{json|xml}/account`` and ``/download``, and offers ``/_sandbox/...`` admin
endpoints to loopback peers. ``app[SANDBOX]`` is the live state: ``.settings``,
``.faults`` (change it freely), ``.uploads`` (the upload log), ``.advance(seconds)`` (the
clock), ``.stats``.

Each module's docstring lists the fidelity assumptions it makes where IPQS documents
nothing: :mod:`.answers` (failure bodies, XML), :mod:`.receive` (parameters, methods),
:mod:`.handlers` (names, status fields, list, dead links), :mod:`.account` (balance,
usage), :mod:`.state` (ids, lifecycle, tokens), :mod:`.results` (header rows, result
sets), :mod:`.faults` (fault order), :mod:`.odd` (answers reshaped as CDNs, gateways or an
untidy IPQS might send them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.sandbox.app import create_app
    from daemon.sandbox.options import add_arguments, settings_from_args
    from daemon.sandbox.settings import TEST_KEY, Faults, SandboxSettings
    from daemon.sandbox.state import SANDBOX, SandboxState

# Loaded on first use (PEP 562): ``ipqs-bulkd run`` builds its command line with the
# sandbox's flags, and should not carry the emulator's server code in memory for that.
_HOME = {
    "create_app": "app",
    "add_arguments": "options",
    "settings_from_args": "options",
    "TEST_KEY": "settings",
    "Faults": "settings",
    "SandboxSettings": "settings",
    "SANDBOX": "state",
    "SandboxState": "state",
}

__all__ = [
    "SANDBOX",
    "TEST_KEY",
    "Faults",
    "SandboxSettings",
    "SandboxState",
    "add_arguments",
    "create_app",
    "settings_from_args",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
