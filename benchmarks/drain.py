"""Drain throughput: pre-enqueued no-op jobs worked to empty by a burst WorkerPool.

Before each run the table is refilled (bulk ``insert_jobs``) and vacuumed. Then either

* a :class:`~sqlalchemy_que.WorkerPool` of N threads in this process (``listen=False``,
  an Engine with ``pool_size = N + 2`` whose connections are opened beforehand) is timed
  from ``start(burst=True)`` to ``join()``; or
* P processes (:mod:`benchmarks.drain_process`) each running such a pool are started, wait
  at a barrier until all are ready, and are timed from their release until all have exited.

The table must be empty afterwards; a run that leaves jobs behind is reported on the run
(its rate counts only the jobs worked).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from sqlalchemy_que import JobContext, WorkerPool

from .database import JOB_CLASS, BenchDatabase
from .measure import Run, take, take_end

__all__ = ["noop", "open_connections", "run_processes", "run_threads"]

#: Where ``python -m benchmarks...`` finds the package.
_ROOT = Path(__file__).resolve().parent.parent

#: The longest a multi-process run may take before it is stopped as failed.
_PROCESS_TIMEOUT = 600.0


def noop(job: JobContext, *args: Any) -> None:
    """The job every drain runs: nothing, so that only the queue's own cost is measured."""


def open_connections(engine: Engine, count: int) -> None:
    """Open ``count`` pooled connections at once and return them, so that no timed run pays
    for connecting."""
    connections = [engine.connect() for _ in range(count)]
    for connection in connections:
        connection.exec_driver_sql("SELECT 1")
        connection.close()


def run_threads(database: BenchDatabase, *, workers: int, jobs: int) -> Run:
    """``jobs`` jobs worked by a burst WorkerPool of ``workers`` threads in this process."""
    database.refill(jobs)
    engine = database.engine(pool_size=workers + 2)
    try:
        open_connections(engine, workers)
        pool = WorkerPool(
            engine, {JOB_CLASS: noop}, workers=workers, listen=False, check_schema=False
        )
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
        detail={"workers": workers, "jobs": jobs, "left_behind": left},
    )


def run_processes(database: BenchDatabase, *, processes: int, workers: int, jobs: int) -> Run:
    """``jobs`` jobs worked by ``processes`` processes of ``workers`` worker threads each.

    The client CPU is what the processes report for themselves from release to end (their
    start-up excluded); the CPU of the reaped processes over the whole timed span, start-up
    included (``RUSAGE_CHILDREN``), is kept in the run's detail.
    """
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
    children = [
        subprocess.Popen(argv, cwd=_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a drain process did not get ready: {line!r}")
        start = take(database.server_cpu)
        for child in children:  # the barrier's release
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        for child in children:
            child.wait(_PROCESS_TIMEOUT)
        end = take_end(database.server_cpu)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    reports: list[dict[str, Any]] = []
    for child in children:
        assert child.stdout is not None
        if child.returncode != 0:
            raise RuntimeError(f"a drain process failed with exit code {child.returncode}")
        reports.append(json.loads(child.stdout.read()))
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
            "cpu_children_rusage": end.cpu_children - start.cpu_children,
            "process_reports": reports,
        },
    )
    run.cpu_client = sum(report["cpu_seconds"] for report in reports)
    return run
