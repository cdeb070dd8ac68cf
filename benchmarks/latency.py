"""Latency: from the commit of an enqueue to the start of the job's handler, at low load.

A WorkerPool of 4 runs in this process, all its workers asleep; jobs are enqueued one per
transaction (``insert_job`` on a Core Connection), spaced evenly. Each job's argument is its
sequence number: the enqueuer records ``perf_counter()`` as soon as ``commit()`` returns, the
handler records it on entry, and the latency is the difference (one process, one clock). Run
with LISTEN/NOTIFY (a long wake interval, so that only the notification can wake a worker)
and with polling (no listener, a short wake interval).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from sqlalchemy_que import JobContext, WorkerPool, insert_job

from .database import JOB_CLASS, BenchDatabase
from .drain import open_connections
from .measure import Run, take, take_end

__all__ = ["WORKERS", "percentiles", "run_latency"]

WORKERS = 4

#: How long to wait for the last job to start after the last enqueue.
_DRAIN_TIMEOUT = 30.0


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max of ``samples``."""
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "max": max(samples)}


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.005)


def run_latency(
    database: BenchDatabase, *, listen: bool, wake_interval: float, jobs: int, spacing: float
) -> Run:
    """One run of ``jobs`` jobs enqueued ``spacing`` seconds apart.

    :returns: a run whose value is the p50 in ms; its detail holds p90, p99, max and every
        sample (ms, in enqueue order).
    """
    database.truncate()
    engine = database.engine(pool_size=WORKERS + 2)
    started: dict[int, float] = {}

    def record(job: JobContext, sequence: int) -> None:
        started[sequence] = time.perf_counter()

    committed: dict[int, float] = {}
    try:
        open_connections(engine, WORKERS + 1)
        pool = WorkerPool(
            engine,
            {JOB_CLASS: record},
            workers=WORKERS,
            wake_interval=wake_interval,
            listen=listen,
            check_schema=False,
        )
        pool.start()
        try:
            if pool.listener is not None:
                listener = pool.listener
                _wait(listener.connected.is_set, 10, "the listening connection")
            _wait(lambda: all(w.sleeping for w in pool.workers), 10, "the workers to sleep")
            with engine.connect() as connection:
                start = take(database.server_cpu)
                first = time.perf_counter()
                for sequence in range(jobs):
                    delay = first + sequence * spacing - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    insert_job(connection, JOB_CLASS, sequence)
                    connection.commit()
                    committed[sequence] = time.perf_counter()
                _wait(lambda: len(started) == jobs, _DRAIN_TIMEOUT, f"{jobs} jobs to start")
                end = take_end(database.server_cpu)
        finally:
            pool.shutdown(timeout=10)
    finally:
        engine.dispose()
    samples = [(started[sequence] - committed[sequence]) * 1000 for sequence in range(jobs)]
    summary = percentiles(samples)
    return Run.between(
        start,
        end,
        summary["p50"],
        detail={
            "listen": listen,
            "wake_interval": wake_interval,
            "jobs": jobs,
            "spacing": spacing,
            **summary,
            "samples_ms": samples,
        },
    )
