"""What ``ipqs-bulkd run`` carries in memory: only what the daemon uses at run time."""

from __future__ import annotations

import json
import subprocess
import sys

# Imports the daemon's command line and service, parses `run`, and lists what got loaded.
_PROBE = """
import json, sys
import daemon.cli, daemon.service
daemon.cli.build_parser().parse_args(["run", "--once"])
print(json.dumps(sorted(sys.modules)))
"""


def _loaded_by_run() -> set[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return set(json.loads(out))


def test_run_loads_neither_tqdm_nor_the_emulators_server() -> None:
    loaded = _loaded_by_run()
    assert "daemon.service" in loaded and "daemon.sandbox.options" in loaded  # the probe ran
    assert not {m for m in loaded if m == "tqdm" or m.startswith("tqdm.")}
    assert not {"daemon.sandbox.app", "daemon.sandbox.handlers", "daemon.sandbox.state"} & loaded


def test_the_sandbox_package_still_offers_its_names() -> None:
    import daemon.sandbox as sandbox

    for name in sandbox.__all__:
        assert getattr(sandbox, name) is not None
    assert sandbox.create_app.__module__ == "daemon.sandbox.app"
