"""Drain throughput: pre-enqueued no-op jobs worked to empty by a burst WorkerPool.

Before each run the table is refilled (bulk ``insert_jobs``) and vacuumed. Then either

* a :class:`~sqlalchemy_que.WorkerPool` of N threads in this process (``listen=False``,
  an Engine with ``pool_size = N + 2`` whose connections are opened beforehand) is timed
  from ``start(burst=True)`` to ``join()``; or
* P processes (:mod:`benchmarks.drain_process`) each running such a pool are started, wait
  at a barrier until all are ready, and are timed from their release until all have exited.

The table must be empty afterwards; a run that leaves jobs behind is reported on the run
(its rate counts only the jobs worked).

What is drained is :data:`PLAN`, one :class:`Drain` a line: a figure per worker count, per
process count and per set of WorkerPool options (``completion``, ``batch_size``...). An entry
whose options this WorkerPool does not accept yet is skipped with a message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Engine

from sqlalchemy_que import JobContext, WorkerPool, install_metrics

from . import ceiling
from .barrier import run_released
from .database import JOB_CLASS, BenchDatabase
from .measure import Run, take, take_end

__all__ = [
    "PLAN",
    "Drain",
    "noop",
    "open_connections",
    "run_processes",
    "run_threads",
    "unsupported_options",
]


def noop(job: JobContext, *args: Any) -> None:
    """The job every drain runs: nothing, so that only the queue's own cost is measured."""


def open_connections(engine: Engine, count: int) -> None:
    """Open ``count`` pooled connections at once and return them, so that no timed run pays
    for connecting."""
    connections = [engine.connect() for _ in range(count)]
    for connection in connections:
        connection.exec_driver_sql("SELECT 1")
        connection.close()


def unsupported_options(options: Mapping[str, Any]) -> list[str]:
    """The names in ``options`` that ``WorkerPool(...)`` does not take (none if it takes
    ``**kwargs``)."""
    parameters = inspect.signature(WorkerPool).parameters
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
        return []
    return [name for name in options if name not in parameters]


@dataclasses.dataclass(frozen=True)
class Drain:
    """One drain figure of ours.

    :param workers: worker threads (per process, with ``processes``).
    :param processes: 0 for threads in this process; else that many processes of
        ``workers`` threads (:mod:`benchmarks.drain_process`).
    :param completion: ``WorkerPool(completion=...)``, when given.
    :param batch_size: ``WorkerPool(batch_size=...)``, when given.
    """

    workers: int
    processes: int = 0
    completion: str | None = None
    batch_size: int | None = None
    #: With Prometheus metrics installed and scraped every second (threads only; the
    #: ``monitoring`` group measures drains with and without, in pairs).
    metrics: bool = False

    @property
    def options(self) -> dict[str, Any]:
        """The WorkerPool keyword arguments beside ``workers``, ``listen`` and ``check_schema``."""
        options: dict[str, Any] = {}
        if self.completion is not None:
            options["completion"] = self.completion
        if self.batch_size is not None:
            options["batch_size"] = self.batch_size
        return options

    @property
    def total_workers(self) -> int:
        return self.workers * max(self.processes, 1)

    @property
    def key(self) -> str:
        mode = "".join(
            [
                f".{self.completion}" if self.completion is not None else "",
                f".k{self.batch_size}" if self.batch_size is not None else "",
                ".metrics" if self.metrics else "",
            ]
        )
        if self.processes:
            return f"drain{mode}.processes.{self.processes}x{self.workers}"
        return f"drain{mode}.threads.{self.workers}"

    @property
    def label(self) -> str:
        if self.processes:
            label = f"{self.processes} processes x {self.workers} threads"
        else:
            label = f"{self.workers} thread{'s' if self.workers > 1 else ''}, 1 process"
        options = ", ".join(f"{name}={value!r}" for name, value in self.options.items())
        label = f"{label}, {options}" if options else label
        return f"{label}, metrics on" if self.metrics else label

    @property
    def ceiling(self) -> str:
        """The pgbench cycle this figure is compared with: the batched cycle for batched
        completion, else the per-job cycle; at the most clients measured that are not more
        than this figure's workers."""
        clients: tuple[int, ...]
        if self.completion == "batch":
            clients = ceiling.BATCH_CLIENTS
            prefix = "ceiling.batch"
        else:
            clients = ceiling.CYCLE_CLIENTS
            prefix = "ceiling.cycle"
        fitting = [count for count in clients if count <= self.total_workers]
        return f"{prefix}.{max(fitting) if fitting else min(clients)}"

    def measure(self, database: BenchDatabase, jobs: int) -> Run:
        if self.processes:
            return run_processes(
                database,
                processes=self.processes,
                workers=self.workers,
                jobs=jobs,
                options=self.options,
            )
        return run_threads(
            database, workers=self.workers, jobs=jobs, options=self.options, metrics=self.metrics
        )


#: Our drains, one a line. Today's defaults first; then the per-job and batched completion
#: modes, which are skipped (with a message) until WorkerPool takes ``completion``.
PLAN: tuple[Drain, ...] = (
    Drain(workers=1),
    Drain(workers=2),
    Drain(workers=4),
    Drain(workers=8),
    Drain(workers=4, processes=2),
    Drain(workers=4, processes=4),
    Drain(workers=1, completion="batch"),
    Drain(workers=4, completion="batch"),
    Drain(workers=8, completion="batch"),
    Drain(workers=4, processes=2, completion="batch"),
)


def run_threads(
    database: BenchDatabase,
    *,
    workers: int,
    jobs: int,
    options: Mapping[str, Any] | None = None,
    metrics: bool = False,
) -> Run:
    """``jobs`` jobs worked by a burst WorkerPool of ``workers`` threads in this process
    (``options``: further WorkerPool keyword arguments; ``metrics``: with Prometheus metrics
    installed, in a registry of their own, and scraped every second while it works)."""
    options = dict(options or {})
    database.refill(jobs)
    engine = database.engine(pool_size=workers + 2)
    try:
        open_connections(engine, workers)
        pool = WorkerPool(
            engine, {JOB_CLASS: noop}, workers=workers, listen=False, check_schema=False, **options
        )
        with _monitored(engine, pool, metrics):
            start = take(database.server_cpu)
            pool.start(burst=True)
            pool.join()
            end = take_end(database.server_cpu)
    finally:
        engine.dispose()
    left = database.count()
    return Run.between(
        start,
        end,
        (jobs - left) / (end.wall - start.wall),
        detail={"workers": workers, "jobs": jobs, "left_behind": left, "options": options},
    )


@contextlib.contextmanager
def _monitored(engine: Engine, pool: WorkerPool, metrics: bool) -> Iterator[None]:
    """With ``metrics``: Prometheus metrics on the pool, scraped every second meanwhile."""
    if not metrics:
        yield
        return
    from prometheus_client import CollectorRegistry, generate_latest

    installed = install_metrics(engine, registry=CollectorRegistry(), workers=[pool])
    done = threading.Event()

    def scrape() -> None:
        while True:
            generate_latest(installed.registry)
            if done.wait(1.0):
                return

    scraper = threading.Thread(target=scrape, name="bench-scraper", daemon=True)
    scraper.start()
    try:
        yield
    finally:
        done.set()
        scraper.join()
        installed.close()


def run_processes(
    database: BenchDatabase,
    *,
    processes: int,
    workers: int,
    jobs: int,
    options: Mapping[str, Any] | None = None,
) -> Run:
    """``jobs`` jobs worked by ``processes`` processes of ``workers`` worker threads each.

    The client CPU is what the processes report for themselves from release to end (their
    start-up excluded); the CPU of the reaped processes over the whole timed span, start-up
    included (``RUSAGE_CHILDREN``), is kept in the run's detail.
    """
    options = dict(options or {})
    database.refill(jobs)
    argv = [
        sys.executable,
        "-m",
        "benchmarks.drain_process",
        "--url",
        database.url.render_as_string(hide_password=False),
        "--workers",
        str(workers),
    ]
    if options:
        argv += ["--options", json.dumps(options)]
    start, end, reports = run_released([argv] * processes, database.server_cpu)
    left = database.count()
    run = Run.between(
        start,
        end,
        (jobs - left) / (end.wall - start.wall),
        children=True,
        detail={
            "processes": processes,
            "workers_per_process": workers,
            "jobs": jobs,
            "left_behind": left,
            "options": options,
            "cpu_children_rusage": end.cpu_children - start.cpu_children,
            "process_reports": reports,
        },
    )
    run.cpu_client = sum(report["cpu_seconds"] for report in reports)
    return run
