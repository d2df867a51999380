"""``spool.file_mode`` is applied exactly to what the daemon writes for people (issue 19
item 8), not cut by the service's UMask 0027."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from tests.deployed import daemon_as_deployed, deployed_spool
from tests.support import (
    Sandbox,
    daemon_config,
    drop,
    emails,
    free_port,
    is_ready,
    records,
    until,
    write_config_file,
)


def _mode(path: Path) -> str:
    return f"{stat.S_IMODE(path.stat().st_mode):04o}"


@pytest.mark.slow
async def test_records_and_results_get_file_mode_exactly_under_umask_0027(
        sandbox: Sandbox) -> None:
    with deployed_spool() as spool:
        root, port = spool.root, free_port()
        config = daemon_config(root, sandbox.api_base, health={"enabled": True, "port": port},
                               spool={"file_mode": 0o664})
        config = dataclasses.replace(config, spool=dataclasses.replace(
            config.spool, types=("email",)))
        config_file = write_config_file(spool.base / "config.toml", config)
        async with daemon_as_deployed(spool, config_file):
            await until(lambda: is_ready(port), "the daemon ready")
            drop(root, "email", "list.csv", emails(3))
            drop(root, "email", "empty.csv", b"")

            async def both() -> bool:
                return "list.csv" in records(root, "done") and \
                    "empty.csv" in records(root, "failed")
            await until(both, "both files finished")
        done, failed = root / "done" / "email", root / "failed" / "email"
        modes = {p.name: _mode(p) for p in (done / "list.csv.json", done / "list.csv.all.csv",
                                            failed / "empty.csv.json")}
        assert modes == {"list.csv.json": "0664", "list.csv.all.csv": "0664",
                         "empty.csv.json": "0664"}
