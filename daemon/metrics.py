"""Prometheus metrics of one daemon, in a registry of its own (tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Every metric the daemon exports. Labels never carry file names or secrets."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.files = Counter("ipqs_bulkd_files", "Files finished, by type and outcome",
                             ["type", "outcome", "reason"], registry=r)
        self.uploads = Counter("ipqs_bulkd_uploads", "Upload requests sent, by method",
                               ["method"], registry=r)
        self.upload_bytes = Counter("ipqs_bulkd_upload_bytes", "Bytes uploaded", registry=r)
        self.retries = Counter("ipqs_bulkd_retries", "Retries of IPQS calls, by cause",
                               ["operation", "cause"], registry=r)
        self.adopted = Counter("ipqs_bulkd_adopted_uploads",
                               "Uploads whose answer was lost, found again by the list API",
                               registry=r)
        self.orphaned = Counter("ipqs_bulkd_orphaned_uploads",
                                "IPQS jobs paid for after the job was taken over (see "
                                "orphans/)", registry=r)
        self.in_flight = Gauge("ipqs_bulkd_jobs_in_flight", "Jobs in processing, by stage",
                               ["stage"], registry=r)
        self.queue_depth = Gauge("ipqs_bulkd_inbox_pending",
                                 "Files noticed in inboxes, not yet claimed", registry=r)
        self.oldest_pending = Gauge("ipqs_bulkd_inbox_oldest_seconds",
                                    "Age of the oldest file waiting in an inbox", registry=r)
        self.api_latency = Histogram(
            "ipqs_bulkd_api_seconds", "Latency of IPQS API calls", ["operation"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.unreadable = Gauge("ipqs_bulkd_inbox_unreadable",
                                "Files waiting in an inbox that the daemon may not read",
                                registry=r)
        self.events_unavailable = Gauge(
            "ipqs_bulkd_watch_events_unavailable",
            "1 while inotify events for the inboxes are unavailable (limits reached): "
            "the inboxes are rescanned more often meanwhile", registry=r)
        self.misplaced = Gauge("ipqs_bulkd_misplaced_files",
                               "Files in inbox/ outside any type folder: never taken",
                               registry=r)
        self.finish_blocked = Gauge(
            "ipqs_bulkd_finish_blocked",
            "Finished jobs waiting because their done/ or failed/ folder refuses the move",
            ["folder"], registry=r)
        self.held_by_lease = Counter(
            "ipqs_bulkd_files_held_by_writer",
            "Files a lease probe found open for writing, and held back until the writer let go",
            registry=r)
        self.hooks_pending = Gauge("ipqs_bulkd_hooks_pending",
                                   "Finished files whose on_finish hook has not exited 0 yet",
                                   registry=r)
        self.hooks_failing = Gauge("ipqs_bulkd_hooks_failing",
                                   "Of those, files whose hook failed at least once",
                                   registry=r)
        self.hook_runs = Counter("ipqs_bulkd_hook_runs", "Runs of the on_finish hook, by "
                                 "result (ok, failed, timeout)", ["result"], registry=r)
        self.expired = Counter("ipqs_bulkd_expired", "Removed by housekeeping: finished "
                               "files (done, failed, history) past their retention, and "
                               "duplicate markers past the window", ["kind"], registry=r)
        self.spool_free_bytes = Gauge("ipqs_bulkd_spool_free_bytes",
                                      "Free space on the spool's file system", registry=r)
        self.low_disk = Gauge("ipqs_bulkd_low_disk",
                              "1 while free space is under spool.min_free_mb", registry=r)
        self.breaker_open = Gauge("ipqs_bulkd_uploads_paused",
                                  "1 while uploads are paused by an account error", registry=r)
        self.rows = Counter("ipqs_bulkd_rows", "Rows accepted by IPQS (billed), by type",
                            ["type"], registry=r)
        self.credits = Gauge("ipqs_bulkd_credits_remaining",
                             "The account's credits as last read, less uploads since (NaN "
                             "while unknown)", registry=r)
        self.credits.set(float("nan"))
        self.budget_left = Gauge("ipqs_bulkd_budget_rows_left",
                                 "Rows still within today's (UTC) budgets, by type (types "
                                 "without a budget are absent)", ["type"], registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
