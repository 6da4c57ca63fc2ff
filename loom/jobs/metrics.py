"""Prometheus metrics of the durable jobs, read from the state database and the runner at scrape time
(registered in the server's own registry beside loom's other metrics)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from loom.jobs.service import JobService

BATCH_STATUSES = (
    "validating",
    "in_progress",
    "finalizing",
    "cancelling",
    "completed",
    "failed",
    "expired",
    "cancelled",
)
RUN_STATUSES = ("queued", "running", "ok", "failed", "cancelled", "deadline_exceeded")


class JobsCollector(Collector):
    def __init__(self, jobs: JobService):
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        jobs = self.jobs
        opened = getattr(jobs, "db", None) is not None
        batches = GaugeMetricFamily("loom_batches", "Batches by status.", labels=["status"])
        by_status = dict.fromkeys(BATCH_STATUSES, 0)
        runs_by_status = dict.fromkeys(RUN_STATUSES, 0)
        pending = total = 0
        if opened:
            for row in jobs.db.query("SELECT status, COUNT(*) AS n FROM batches GROUP BY status"):
                by_status[row["status"]] = row["n"]
            for row in jobs.db.query("SELECT status, COUNT(*) AS n FROM agent_runs GROUP BY status"):
                runs_by_status[row["status"]] = row["n"]
            for batch in jobs.batches.open_batches():
                total += batch["request_counts"]["total"]
                pending += jobs.queue.counts(batch["id"]).pending
        for status, n in by_status.items():
            batches.add_metric([status], n)
        yield batches
        yield GaugeMetricFamily(
            "loom_batch_requests_pending", "Lines of open batches not answered yet.", value=pending
        )
        yield GaugeMetricFamily(
            "loom_batch_requests_open", "Lines of open batches, answered or not.", value=total
        )
        runner = jobs.runner
        yield GaugeMetricFamily(
            "loom_batch_requests_running",
            "Batch lines this server is running now.",
            value=len(runner.in_flight) if runner is not None else 0,
        )
        yield CounterMetricFamily(
            "loom_batch_requests_finished",
            "Batch lines this server ran and recorded since it started.",
            value=runner.num_finished if runner is not None else 0,
        )
        yield CounterMetricFamily(
            "loom_batch_requests_preempted",
            "Batch lines aborted for an interactive request (and queued again) since the server started.",
            value=runner.num_preempted if runner is not None else 0,
        )
        runs = GaugeMetricFamily("loom_agent_runs", "Agent runs by status.", labels=["status"])
        for status, n in runs_by_status.items():
            runs.add_metric([status], n)
        yield runs
