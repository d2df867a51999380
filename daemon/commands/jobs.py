"""``ipqs-bulkd jobs``: one page of the account's bulk CSV jobs, from the IPQS list API.

Only id, file name, type, status, aborted and invalid records are shown: the list answer
also carries each job's ``status_url``, which holds the API key, and that is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import ALL_TYPES
from daemon.api import LIST_PAGE_SIZE, CsvPage, make_client
from daemon.commands.common import (
    DEFAULT_TIMEOUT,
    EXIT_ACCOUNT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Console,
    Patience,
    exit_help,
    failure,
    positive_float,
    positive_int,
    require_key,
    table,
)
from daemon.config import Config
from daemon.errors import IpqsError

DESCRIPTION = f"""\
List the bulk CSV jobs of the account, newest first, {LIST_PAGE_SIZE} per page, as IPQS
reports them (the list API): id, the file_name it was sent as, type, status and the
number of invalid records. The daemon sends each file as <name>-<token>; this is how to
find a file's job. The API key is never shown.
"""

EPILOG = f"""\
examples:
  ipqs-bulkd jobs
  ipqs-bulkd jobs --type email --page 2
  ipqs-bulkd jobs --json

{exit_help(EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ACCOUNT, EXIT_UNREACHABLE, EXIT_INTERRUPTED,
           meanings={EXIT_OK: "shown", EXIT_FAILED: "IPQS refused the request"})}"""


def add_parser(commands: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    p = commands.add_parser(
        "jobs", help="list the account's jobs at IPQS (the list API)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", choices=ALL_TYPES, metavar="TYPE",
                   help=f"only jobs of this type: {', '.join(ALL_TYPES)}")
    p.add_argument("--page", type=positive_int, default=1, metavar="N",
                   help="which page, from 1 (newest)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of a table, for scripts")
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT,
                   metavar="SECONDS",
                   help="keep retrying while IPQS is unreachable for this long, then give up "
                        f"with status 4 (default {DEFAULT_TIMEOUT:g})")
    add_config(p)


def run(ns: argparse.Namespace, config: Config, console: Console) -> int:
    require_key(config)
    page = asyncio.run(_fetch(config, console, ns))
    if ns.json:
        console.line(json.dumps(as_json(page), indent=2))
    else:
        render(page, ns.type, console, config=getattr(ns, "config", None))
    return EXIT_OK


async def _fetch(config: Config, console: Console, ns: argparse.Namespace) -> CsvPage:
    patience = Patience(config, ns.timeout, console.note)
    async with make_client(config) as client:
        try:
            return await patience.call("list", functools.partial(client.list, ns.type,
                                                                 ns.page))
        except IpqsError as exc:
            raise failure(exc, "listing jobs", ns.timeout) from None


def as_json(page: CsvPage) -> dict[str, Any]:
    return {"page": page.page, "total_pages": page.total_pages, "total_csvs": page.total_csvs,
            "csvs": [{"id": j.id, "file_name": j.file_name, "type": j.type,
                      "status": j.status, "aborted": j.aborted,
                      "invalid_records": j.invalid_records} for j in page.csvs]}


def render(page: CsvPage, file_type: str | None, console: Console, *,
           config: Path | None = None) -> None:
    if not page.csvs and not page.total_csvs:  # not "page 1 of 0"
        console.line(f"no jobs{f' of type {file_type}' if file_type else ''} at IPQS yet")
        return
    if page.csvs:
        console.line(table(
            ["ID", "FILE_NAME", "TYPE", "STATUS", "INVALID"],
            [[j.id, j.file_name, j.type, "ABORTED" if j.aborted else j.status,
              j.invalid_records] for j in page.csvs]))
    else:
        console.line("no jobs on this page")
    console.line(f"page {page.page} of {page.total_pages} ({page.total_csvs} jobs"
                 f"{f' of type {file_type}' if file_type else ''})")
    if page.page < page.total_pages:
        more = f" --type {file_type}" if file_type else ""
        if config is not None:  # the same account's next page
            more += f" --config {shlex.quote(str(config))}"
        console.line(f"next: ipqs-bulkd jobs{more} --page {page.page + 1}")
