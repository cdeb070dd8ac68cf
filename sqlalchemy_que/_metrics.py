"""Prometheus metrics (extra ``prometheus``), built on the job hooks.

Counters and histograms are updated by a job hook as jobs run. The gauges of the queues are
read by one query at scrape time, at most every ``refresh_seconds`` per process, whatever the
number of scrapes and workers; the workers' busy/idle gauge reads the tracked workers' state
at scrape time, costing the hot path nothing.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, text

from . import _hooks
from .errors import ConfigurationError
from .stats import _JOB_LOCKS

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["QueMetrics", "install_metrics"]

_QUEUE_GAUGES = text(
    f"""
SELECT j.queue,
       count(*) FILTER (WHERE j.run_at <= now() AND l.job_id IS NULL) AS ready,
       count(*) FILTER (WHERE j.run_at > now() AND l.job_id IS NULL) AS scheduled,
       count(l.job_id) AS working,
       coalesce(extract(epoch FROM now() - min(j.run_at)
                FILTER (WHERE j.run_at <= now() AND l.job_id IS NULL)), 0)::float AS oldest
FROM que_jobs AS j
LEFT JOIN ({_JOB_LOCKS}) AS l ON l.job_id = j.job_id
GROUP BY j.queue
"""
)

#: Runs noted before the hook counts them itself, between two scrapes.
FLUSH_EVERY = 1000

#: Run times of jobs, in seconds: from a millisecond to ten minutes.
RUN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)
#: Waits from run_at to start, in seconds: from a millisecond to an hour.
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as error:
        raise ConfigurationError(
            "Prometheus metrics need prometheus_client: pip install 'sqlalchemy-que[prometheus]'"
        ) from error
    return prometheus_client


class QueMetrics:
    """The metrics of this process's workers and of the database's queues.

    Made by :func:`install_metrics`; call :meth:`track` with the workers (or pools) whose
    busy/idle state to export, and :meth:`serve` to start an HTTP endpoint.
    """

    def __init__(
        self,
        engine: Engine | None,
        *,
        registry: CollectorRegistry | None = None,
        refresh_seconds: float = 5.0,
    ) -> None:
        prometheus = _prometheus()
        if (
            isinstance(refresh_seconds, bool)
            or not isinstance(refresh_seconds, int | float)
            or not refresh_seconds > 0
        ):
            raise ConfigurationError(
                f"refresh_seconds must be a positive number, got {refresh_seconds!r}"
            )
        self.engine = engine
        self.registry = registry if registry is not None else prometheus.REGISTRY
        self.refresh_seconds = float(refresh_seconds)
        labels = ("queue", "job_class")
        # Yielded by our collector, after it has counted the runs noted since the last scrape.
        options: dict[str, Any] = {"registry": None}
        self.completed = prometheus.Counter(
            "que_jobs_completed", "Job runs that completed.", labels, **options
        )
        self.failed = prometheus.Counter(
            "que_jobs_failed", "Job runs that failed (and were rescheduled).", labels, **options
        )
        self.retried = prometheus.Counter(
            "que_jobs_retried", "Job runs that were retries (error_count > 0).", labels, **options
        )
        self.run_seconds = prometheus.Histogram(
            "que_job_run_seconds",
            "Seconds a job run took, handler and completion.",
            labels,
            buckets=RUN_BUCKETS,
            **options,
        )
        self.wait_seconds = prometheus.Histogram(
            "que_job_wait_seconds",
            "Seconds from a job's run_at to the start of its run.",
            labels,
            buckets=WAIT_BUCKETS,
            **options,
        )
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any, Any]] = {}
        # Runs noted by the hook (queue, job_class, outcome, retry, duration, wait), counted
        # into the metrics at scrape time or every FLUSH_EVERY runs: a deque's append is all
        # a job pays, where the metrics' own locks would cost microseconds.
        self._noted: collections.deque[tuple[str, str, str, int, float, float | None]] = (
            collections.deque()
        )
        self._flush_lock = threading.Lock()
        self._workers: list[Any] = []
        self._lock = threading.Lock()
        self._refreshed_at = -float("inf")
        self._rows: dict[str, tuple[int, int, int, float]] = {}
        self.queries = 0  # how many times the queue gauges were read from the database
        self._hook = _Hook(self)
        self.registry.register(_Collector(self))
        self._server: Any = None

    # -- the job hook --------------------------------------------------------------------

    def _for(self, queue: str, job_class: str) -> tuple[Any, Any, Any, Any, Any]:
        key = (queue, job_class)
        children = self._children.get(key)
        if children is None:
            children = (
                self.completed.labels(queue, job_class),
                self.failed.labels(queue, job_class),
                self.retried.labels(queue, job_class),
                self.run_seconds.labels(queue, job_class),
                self.wait_seconds.labels(queue, job_class),
            )
            self._children[key] = children
        return children

    def flush(self) -> None:
        """Count the runs noted since the last flush into the counters and histograms."""
        noted = self._noted
        with self._flush_lock:
            while True:
                try:
                    queue, job_class, outcome, retry, duration, wait = noted.popleft()
                except IndexError:
                    return
                completed, failed, retried, run_seconds, wait_seconds = self._for(queue, job_class)
                (completed if outcome == "done" else failed).inc()
                if retry:
                    retried.inc()
                run_seconds.observe(duration)
                if wait is not None:
                    wait_seconds.observe(max(0.0, wait))

    # -- gauges --------------------------------------------------------------------------

    def track(self, workers: Iterable[Any]) -> None:
        """Export the busy/idle state of these workers (Worker objects, or WorkerPools)."""
        for worker in workers:
            self._workers.extend(getattr(worker, "workers", [worker]))

    def queue_gauges(self) -> dict[str, tuple[int, int, int, float]]:
        """Ready, scheduled and working jobs and the oldest ready job's age, by queue; read
        at most every ``refresh_seconds`` (queues seen once stay, at 0, once empty)."""
        if self.engine is None:
            return {}
        with self._lock:
            now = time.monotonic()
            if now - self._refreshed_at >= self.refresh_seconds:
                with self.engine.connect() as connection:
                    rows = connection.execute(_QUEUE_GAUGES).all()
                self.queries += 1
                self._refreshed_at = now
                fresh = {queue: (0, 0, 0, 0.0) for queue in self._rows}
                for queue, ready, scheduled, working, oldest in rows:
                    fresh[queue] = (int(ready), int(scheduled), int(working), float(oldest))
                self._rows = fresh
            return dict(self._rows)

    # -- serving -------------------------------------------------------------------------

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve the metrics over HTTP (prometheus_client's server, in a daemon thread) on
        ``addr:port``; port 0 picks a free port. Returns the port."""
        prometheus = _prometheus()
        server, _thread = prometheus.start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type (for a web route)."""
        prometheus = _prometheus()
        return prometheus.generate_latest(self.registry), prometheus.CONTENT_TYPE_LATEST

    def close(self) -> None:
        """Stop the hook and the HTTP server, and unregister the metrics."""
        _hooks.remove_job_hook(self._hook)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for collector in list(self.registry._collector_to_names):
            if isinstance(collector, _Collector) and collector.metrics is self:
                self.registry.unregister(collector)


class _Hook(_hooks.JobHook):
    def __init__(self, metrics: QueMetrics) -> None:
        self.metrics = metrics
        self.noted = metrics._noted

    def after(self, run: _hooks.JobRun, outcome: _hooks.JobOutcome) -> None:
        if outcome.outcome == "interrupted":
            return
        run_at = run.run_at
        self.noted.append(
            (
                run.queue,
                run.job_class,
                outcome.outcome,
                run.error_count,
                outcome.duration,
                None if run_at is None else run.started_at - run_at.timestamp(),
            )
        )
        if len(self.noted) >= FLUSH_EVERY:
            self.metrics.flush()


class _Collector:
    def __init__(self, metrics: QueMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []  # gauges read at collect time; nothing to check for duplicates up front

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        metrics = self.metrics
        metrics.flush()
        for metric in (
            metrics.completed,
            metrics.failed,
            metrics.retried,
            metrics.run_seconds,
            metrics.wait_seconds,
        ):
            yield from metric.collect()

        gauges = {
            name: GaugeMetricFamily(f"que_jobs_{name}", help_, labels=["queue"])
            for name, help_ in (
                ("ready", "Jobs ready to run and not locked."),
                ("scheduled", "Jobs whose run_at is in the future."),
                ("working", "Jobs locked by a worker (of any process or language)."),
            )
        }
        oldest = GaugeMetricFamily(
            "que_oldest_ready_job_age_seconds",
            "Seconds since the run_at of the oldest ready job.",
            labels=["queue"],
        )
        for queue, (ready, scheduled, working, age) in self.metrics.queue_gauges().items():
            gauges["ready"].add_metric([queue], ready)
            gauges["scheduled"].add_metric([queue], scheduled)
            gauges["working"].add_metric([queue], working)
            oldest.add_metric([queue], age)
        yield from gauges.values()
        yield oldest
        workers = GaugeMetricFamily(
            "que_workers",
            "Workers of this process, busy (running a job) or idle.",
            labels=["state"],
        )
        busy = sum(1 for worker in self.metrics._workers if worker.current_job is not None)
        workers.add_metric(["busy"], busy)
        workers.add_metric(["idle"], len(self.metrics._workers) - busy)
        yield workers


def install_metrics(
    engine: Engine | None = None,
    *,
    registry: CollectorRegistry | None = None,
    refresh_seconds: float = 5.0,
    workers: Iterable[Any] = (),
) -> QueMetrics:
    """Count and time every job run of this process's workers, and export the queues' gauges.

    :param engine: the database whose queues' gauges to export (None: no queue gauges).
    :param registry: the prometheus_client registry; default its global ``REGISTRY``.
    :param refresh_seconds: the longest the queue gauges are kept before the next scrape
        reads them again (one query per process).
    :param workers: Workers or WorkerPools whose busy/idle state to export (see
        :meth:`QueMetrics.track`).
    """
    metrics = QueMetrics(engine, registry=registry, refresh_seconds=refresh_seconds)
    metrics.track(workers)
    _hooks.add_job_hook(metrics._hook)
    return metrics
