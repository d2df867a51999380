"""The upload stage: :mod:`~daemon.uploader.intake` claims settled files,
:mod:`~daemon.uploader.sending` takes each claimed job through its checks to IPQS, once."""

from daemon.uploader.intake import Source, Uploader
from daemon.uploader.sending import Sender, Tracker

__all__ = ["Sender", "Source", "Tracker", "Uploader"]
