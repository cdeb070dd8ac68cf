"""Prometheus metrics (extra ``prometheus``), built on the job hooks.

Counters and histograms are updated by a job hook, a :class:`~sqlalchemy_que._hooks.Tally`
that workers give their finished runs in bulk once committed (after each job, or once per
batch with batched completion). The gauges of the queues are read by one query at scrape
time, at most every ``refresh_seconds`` per process, whatever the number of scrapes and
workers; the workers' busy/idle gauge reads the tracked workers' state at scrape time,
costing the hot path nothing.
"""

from __future__ import annotations

import bisect
import datetime
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, text

from . import _hooks
from ._errors import ConfigurationError
from ._stats import _JOB_LOCKS

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

_FAILED_GAUGES = text("SELECT queue, count(*) FROM que_failed_jobs GROUP BY queue")

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
        # Each worker thread counts its runs in a tally of its own (plain integers, no lock);
        # a scrape adds the tallies up. Counting into prometheus_client's metrics directly
        # (a lock and a bucket loop per observation) would cost a job microseconds.
        self._local = threading.local()
        self._tallies: list[dict[tuple[str, str], _Tally]] = []
        self._workers: list[Any] = []
        self._lock = threading.Lock()
        self._refreshed_at = -float("inf")
        self._rows: dict[str, tuple[int, int, int, float]] = {}
        self._failed: dict[str, int] = {}
        self.queries = 0  # how many times the queue gauges were read from the database
        self._hook = _Hook(self)
        self.registry.register(_Collector(self))
        self._server: Any = None

    def _tally(self) -> dict[tuple[str, str], _Tally]:
        tally: dict[tuple[str, str], _Tally] = {}
        self._local.tally = tally
        with self._lock:
            self._tallies.append(tally)  # kept when its thread ends: counters never go down
        return tally

    def totals(self) -> dict[tuple[str, str], _Tally]:
        """Every thread's tallies added up, by (queue, job_class)."""
        with self._lock:
            tallies = list(self._tallies)
        totals: dict[tuple[str, str], _Tally] = {}
        for tally in tallies:
            for key, counts in list(tally.items()):
                total = totals.get(key)
                if total is None:
                    total = totals[key] = _Tally()
                total.add(counts)
        return totals

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
                    failed = {str(q): int(n) for q, n in connection.execute(_FAILED_GAUGES)}
                self.queries += 1
                self._refreshed_at = now
                fresh = {queue: (0, 0, 0, 0.0) for queue in self._rows}
                for queue, ready, scheduled, working, oldest in rows:
                    fresh[queue] = (int(ready), int(scheduled), int(working), float(oldest))
                self._rows = fresh
                self._failed = dict.fromkeys(self._failed, 0) | failed
            return dict(self._rows)

    def failed_gauges(self) -> dict[str, int]:
        """Failed jobs (in ``que_failed_jobs``) by queue, read with :meth:`queue_gauges`."""
        self.queue_gauges()
        return dict(self._failed)

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


class _Tally:
    """The runs of one (queue, job_class) counted by one thread."""

    __slots__ = (
        "completed",
        "failed",
        "retried",
        "run_buckets",
        "run_sum",
        "wait_buckets",
        "wait_sum",
    )

    def __init__(self) -> None:
        self.completed = 0
        self.failed = 0
        self.retried = 0
        self.run_sum = 0.0
        self.wait_sum = 0.0
        self.run_buckets = [0] * (len(RUN_BUCKETS) + 1)  # the last one: above every bound
        self.wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)

    def add(self, other: _Tally) -> None:
        self.completed += other.completed
        self.failed += other.failed
        self.retried += other.retried
        self.run_sum += other.run_sum
        self.wait_sum += other.wait_sum
        self.run_buckets = [
            a + b for a, b in zip(self.run_buckets, other.run_buckets, strict=False)
        ]
        self.wait_buckets = [
            a + b for a, b in zip(self.wait_buckets, other.wait_buckets, strict=False)
        ]


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
#: Zones of the IANA database that are UTC under another name (the Etc/ area is all fixed).
_UTC_ZONES = frozenset(("UTC", "UCT", "Universal", "Zulu", "GMT", "GMT0", "GMT+0", "GMT-0"))


def _epoch_in(zone: datetime.tzinfo | None) -> datetime.datetime | None:
    """The Unix epoch as a datetime of ``zone``, when ``zone`` has one UTC offset for all
    time (a ``datetime.timezone``, the IANA Etc/ zones, UTC's other names), else None.

    Python subtracts two datetimes of the same tzinfo as naive ones, without asking the zone
    its offsets (which costs a zoneinfo zone a microsecond, as much as the rest of a job's
    metrics): for a fixed zone that difference is exact.
    """
    key = getattr(zone, "key", None)
    fixed = isinstance(zone, datetime.timezone) or (
        isinstance(key, str) and (key.startswith("Etc/") or key in _UTC_ZONES)
    )
    return _EPOCH.astimezone(zone) if fixed else None


_NO_ZONE = object()  # no run_at's zone seen yet


class _Hook(_hooks.Tally):
    def __init__(self, metrics: QueMetrics) -> None:
        self.metrics = metrics
        self.local = metrics._local
        self.epochs: dict[datetime.tzinfo | None, datetime.datetime | None] = {}

    def tally(self, runs: list[_hooks.TalliedRun]) -> None:
        try:
            tally = self.local.tally
        except AttributeError:
            tally = self.metrics._tally()
        epochs = self.epochs
        wall = time.time() - time.perf_counter()  # a run's start, as time.time() would give it
        find, run_bounds, wait_bounds = bisect.bisect_left, RUN_BUCKETS, WAIT_BUCKETS
        # This loop is most of what metrics cost a job: a batch's runs are mostly of one job
        # class, so their counts (and their run_at's zone) are looked up when they change.
        queue = job_class = ""
        counts: _Tally | None = None
        run_buckets: list[int] = []
        wait_buckets: list[int] = []
        zone: Any = _NO_ZONE
        epoch: datetime.datetime | None = None
        for job, failed, started, duration in runs:
            if counts is None or job.job_class != job_class or job.queue != queue:
                queue, job_class = job.queue, job.job_class
                counts = tally.get((queue, job_class))
                if counts is None:
                    counts = tally[queue, job_class] = _Tally()
                run_buckets, wait_buckets = counts.run_buckets, counts.wait_buckets
            if failed:
                counts.failed += 1
            else:
                counts.completed += 1
            if job.error_count:
                counts.retried += 1
            counts.run_sum += duration
            run_buckets[find(run_bounds, duration)] += 1
            run_at = job.run_at
            if run_at is None:
                continue
            if run_at.tzinfo is not zone:
                zone = run_at.tzinfo
                if zone not in epochs:
                    epochs[zone] = _epoch_in(zone)
                epoch = epochs[zone]
            due = (run_at - epoch).total_seconds() if epoch is not None else run_at.timestamp()
            wait = wall + started - due
            if wait < 0.0:
                wait = 0.0  # a clock step, or a run_at just ahead of this machine's clock
            counts.wait_sum += wait
            wait_buckets[find(wait_bounds, wait)] += 1


def _histogram(
    family: Any, labels: list[str], bounds: tuple[float, ...], counts: list[int], total: float
) -> None:
    from prometheus_client.utils import floatToGoString

    cumulative, running = [], 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        running += count
        cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
    family.add_metric(labels, cumulative, total)


class _Collector:
    def __init__(self, metrics: QueMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []  # gauges read at collect time; nothing to check for duplicates up front

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        names = ["queue", "job_class"]
        completed = CounterMetricFamily(
            "que_jobs_completed", "Job runs that completed.", labels=names
        )
        failed = CounterMetricFamily(
            "que_jobs_failed", "Job runs that failed (and were rescheduled).", labels=names
        )
        retried = CounterMetricFamily(
            "que_jobs_retried", "Job runs that were retries (error_count > 0).", labels=names
        )
        run_seconds = HistogramMetricFamily(
            "que_job_run_seconds", "Seconds a job run took, handler and completion.", labels=names
        )
        wait_seconds = HistogramMetricFamily(
            "que_job_wait_seconds",
            "Seconds from a job's run_at to the start of its run.",
            labels=names,
        )
        for (queue, job_class), total in sorted(self.metrics.totals().items()):
            labels = [queue, job_class]
            completed.add_metric(labels, total.completed)
            failed.add_metric(labels, total.failed)
            retried.add_metric(labels, total.retried)
            _histogram(run_seconds, labels, RUN_BUCKETS, total.run_buckets, total.run_sum)
            _histogram(wait_seconds, labels, WAIT_BUCKETS, total.wait_buckets, total.wait_sum)
        yield from (completed, failed, retried, run_seconds, wait_seconds)

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
        # Not que_jobs_failed: that is the counter of failed runs.
        failed_jobs = GaugeMetricFamily(
            "que_failed_jobs", "Jobs failed for good (in que_failed_jobs).", labels=["queue"]
        )
        for queue, count in self.metrics.failed_gauges().items():
            failed_jobs.add_metric([queue], count)
        yield from gauges.values()
        yield oldest
        yield failed_jobs
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
