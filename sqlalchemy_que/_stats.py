"""Looking at the queue: job stats, worker states, and clearing.

These read the same facts Ruby Que's ``job_stats`` and ``worker_states`` read, from any
process and any language working the table: a job is "working" when its ``job_id`` is held
as an advisory lock (rebuilt from ``pg_locks``)::

    from sqlalchemy_que import job_stats, worker_states

    with engine.connect() as connection:
        for row in job_stats(connection):
            print(row.queue, row.job_class, row.count, row.count_working)
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from sqlalchemy import Connection, Engine, text

__all__ = ["JobStats", "WorkerState", "clear", "job_stats", "worker_states"]

# Job locks are one-bigint advisory locks (objsubid 1); the key is rebuilt the way Que does.
_JOB_LOCKS = """
    SELECT (l.classid::bigint << 32) + l.objid::bigint AS job_id, l.pid
    FROM pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

JOB_STATS = text(
    f"""
SELECT j.queue, j.job_class, count(*) AS count,
       count(locks.job_id) AS count_working,
       count(*) FILTER (WHERE j.error_count > 0) AS count_errored,
       max(j.error_count) AS highest_error_count,
       min(j.run_at) AS oldest_run_at
FROM que_jobs AS j
LEFT JOIN ({_JOB_LOCKS}) AS locks ON locks.job_id = j.job_id
GROUP BY j.queue, j.job_class
ORDER BY count(*) DESC, j.queue, j.job_class
"""
)

WORKER_STATES = text(
    f"""
SELECT j.priority, j.run_at, j.job_id, j.job_class, j.args::text AS args, j.error_count,
       j.last_error, j.queue,
       a.pid AS pg_backend_pid,
       a.state AS pg_state,
       a.state_change AS pg_state_changed_at,
       a.query AS pg_last_query,
       a.query_start AS pg_last_query_started_at,
       a.xact_start AS pg_transaction_started_at,
       a.wait_event_type IS NOT DISTINCT FROM 'Lock' AS pg_waiting_on_lock
FROM que_jobs AS j
JOIN ({_JOB_LOCKS}) AS locks ON locks.job_id = j.job_id
JOIN pg_stat_activity AS a ON a.pid = locks.pid
ORDER BY j.job_id
"""
)

CLEAR = text("DELETE FROM que_jobs")


@dataclasses.dataclass(frozen=True, slots=True)
class JobStats:
    """One ``(queue, job_class)`` group of jobs, columns in Que's order."""

    queue: str
    job_class: str
    count: int
    count_working: int
    count_errored: int
    highest_error_count: int
    oldest_run_at: datetime.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerState:
    """A job locked right now by some session, with that session's activity.

    ``args`` is the stored JSON text.
    """

    priority: int
    run_at: datetime.datetime
    job_id: int
    job_class: str
    args: str
    error_count: int
    last_error: str | None
    queue: str
    pg_backend_pid: int
    pg_state: str | None
    pg_state_changed_at: datetime.datetime | None
    pg_last_query: str | None
    pg_last_query_started_at: datetime.datetime | None
    pg_transaction_started_at: datetime.datetime | None
    pg_waiting_on_lock: bool


def _read(bind: Engine | Connection, statement: Any) -> list[Any]:
    if isinstance(bind, Engine):
        with bind.connect() as connection:
            return _read(connection, statement)
    return list(bind.execute(statement))


def job_stats(bind: Engine | Connection) -> list[JobStats]:
    """One row per ``(queue, job_class)``, largest count first (Que's ``job_stats``)."""
    return [JobStats(*row) for row in _read(bind, JOB_STATS)]


def worker_states(bind: Engine | Connection) -> list[WorkerState]:
    """Every job locked right now on this database, by any process or language, with the
    locking session's ``pg_stat_activity`` fields (Que's ``worker_states``)."""
    return [WorkerState(*row) for row in _read(bind, WORKER_STATES)]


def clear(bind: Engine | Connection) -> int:
    """Delete every job (the id sequence is not reset); return how many were deleted.

    Given an Engine it commits; given a Connection it runs in the caller's transaction.
    """
    if isinstance(bind, Engine):
        with bind.begin() as connection:
            return clear(connection)
    return bind.execute(CLEAR).rowcount
