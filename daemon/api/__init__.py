"""The IPQS Bulk CSV API client and the reading of its answers.

* :mod:`.client`: :class:`IpqsClient`, one session per process, every call bounded in time.
* :mod:`.answers`: :class:`CsvJob` and the one table that maps answers to error classes.
* :mod:`.download`: one-time result links, fetched by hand and checked before they are kept.
* :mod:`.body`: an upload's body, which reports when it has all gone out.
"""

from daemon.api.answers import FINISHED, RESULT_SETS, Account, CsvJob, CsvPage
from daemon.api.body import InputChangedError
from daemon.api.client import LIST_PAGE_SIZE, IpqsClient, make_client
from daemon.api.download import ResultFile

__all__ = [
    "FINISHED",
    "LIST_PAGE_SIZE",
    "RESULT_SETS",
    "Account",
    "CsvJob",
    "CsvPage",
    "InputChangedError",
    "IpqsClient",
    "ResultFile",
    "make_client",
]
