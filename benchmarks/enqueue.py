"""Enqueue throughput: one job per transaction (ORM Session, Core Connection) and bulk COPY.

Each form is run as an application would write it, timed from the first job to the last
commit, on a connection opened (and warmed up) beforehand; the table is emptied before each
run. The one-per-transaction forms also send the wake-up ``NOTIFY`` in each transaction, as
every enqueue does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from sqlalchemy_que import enqueue, insert_job, insert_jobs, insert_many

from .database import JOB_CLASS, BenchDatabase
from .measure import Run, Snapshot, take, take_end

__all__ = ["run_bulk", "run_bulk_many", "run_core", "run_session"]

_WARM_UP = 50


def _session_loop(session: Session, jobs: int) -> None:
    for index in range(jobs):
        session.add(enqueue(JOB_CLASS, index))
        session.commit()


def _core_loop(connection: Connection, jobs: int) -> None:
    for index in range(jobs):
        insert_job(connection, JOB_CLASS, index)
        connection.commit()


def _bulk(connection: Connection, jobs: int) -> None:
    insert_jobs(connection, (enqueue(JOB_CLASS, index) for index in range(jobs)))
    connection.commit()


def _bulk_many(connection: Connection, jobs: int) -> None:
    insert_many(connection, JOB_CLASS, ([index] for index in range(jobs)))
    connection.commit()


def _timed(
    database: BenchDatabase,
    jobs: int,
    body: Callable[[Any, int], None],
    *,
    session: bool = False,
) -> Run:
    """Warm ``body`` up on one connection (or Session), empty the table, then time it."""
    engine = database.engine(pool_size=1)
    try:
        with Session(engine) if session else engine.connect() as bind:
            body(bind, _WARM_UP)
            database.truncate()
            start = take(database.server_cpu)
            body(bind, jobs)
            end = take_end(database.server_cpu)
    finally:
        engine.dispose()
    return _checked(database, start, end, jobs)


def run_session(database: BenchDatabase, *, jobs: int) -> Run:
    """``session.add(enqueue(...))`` and ``session.commit()``, ``jobs`` times, one Session."""
    return _timed(database, jobs, _session_loop, session=True)


def run_core(database: BenchDatabase, *, jobs: int) -> Run:
    """``insert_job(connection, ...)`` and ``connection.commit()``, ``jobs`` times."""
    return _timed(database, jobs, _core_loop)


def run_bulk(database: BenchDatabase, *, jobs: int) -> Run:
    """``insert_jobs(connection, (enqueue(...) for ...))`` for ``jobs`` jobs, one commit.

    The jobs are built by :func:`~sqlalchemy_que.enqueue` inside the timed part, as an
    application builds them.
    """
    return _timed(database, jobs, _bulk)


def run_bulk_many(database: BenchDatabase, *, jobs: int) -> Run:
    """``insert_many(connection, JOB_CLASS, ([index] for ...))`` for ``jobs`` jobs, one
    commit: the bulk form for many jobs of one class."""
    return _timed(database, jobs, _bulk_many)


def _checked(database: BenchDatabase, start: Snapshot, end: Snapshot, jobs: int) -> Run:
    stored = database.count()
    if stored != jobs:
        raise RuntimeError(f"{stored} jobs were stored instead of {jobs}")
    return Run.between(start, end, jobs / (end.wall - start.wall), detail={"jobs": jobs})
