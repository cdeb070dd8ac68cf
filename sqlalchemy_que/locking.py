"""Locking one job at a time with session-level advisory locks, as Que 0.x does.

A job is locked with ``pg_try_advisory_lock(job_id)`` (the one-bigint form Que's
introspection reads back from ``pg_locks``) on the connection that will work it. The lock
query walks the ready jobs of one queue along the primary key, in
``(priority, run_at, job_id)`` order, trying the lock on each row it visits and stopping at
the first one it gets: at most one lock per call, and rows other sessions hold are skipped.

Because the lock query's snapshot can predate another worker's ``DELETE`` of the same job,
the locked job is looked up again by its full key in a fresh statement; if it is gone, it is
unlocked and the walk starts over (a bounded number of times)::

    with engine.connect() as connection:
        job = lock_job(connection, queue="")
        if job is not None:
            try:
                ...  # work it
            finally:
                unlock_job(connection, job.job_id)

The statements are kept here, named, so that a batched locker can later sit beside them.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Any

import psycopg
from sqlalchemy import Connection, TextClause, text
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.exc import DBAPIError, StatementError

from .errors import QueError

__all__ = [
    "LOCK_ATTEMPTS",
    "LockedJob",
    "driver_connection",
    "driver_sql",
    "lock_job",
    "lock_on_driver",
    "recheck_job",
    "unlock_job",
]

logger = logging.getLogger("sqlalchemy_que.locking")

#: How many vanished jobs one lock attempt tolerates before reporting "nothing ready".
LOCK_ATTEMPTS = 10

# The walk is a recursive CTE: each step fetches the next ready row after the previous one
# along the primary key (queue, priority, run_at, job_id) and tries its lock. The outer query
# asks for the first locked row only, and PostgreSQL evaluates a recursive CTE lazily, one step
# per row pulled, so no row beyond the first locked one is ever visited (or locked).
LOCK_NEXT_JOB = text(
    """
WITH RECURSIVE candidates AS (
    SELECT (first_job).*, pg_try_advisory_lock((first_job).job_id) AS locked
    FROM (
        SELECT j AS first_job
        FROM que_jobs AS j
        WHERE j.queue = :queue AND j.run_at <= now()
        ORDER BY j.priority, j.run_at, j.job_id
        LIMIT 1
    ) AS head
    UNION ALL (
        SELECT (next_job).*, pg_try_advisory_lock((next_job).job_id) AS locked
        FROM (
            SELECT (
                SELECT j
                FROM que_jobs AS j
                WHERE j.queue = :queue AND j.run_at <= now()
                  AND (j.priority, j.run_at, j.job_id)
                      > (candidates.priority, candidates.run_at, candidates.job_id)
                ORDER BY j.priority, j.run_at, j.job_id
                LIMIT 1
            ) AS next_job
            FROM candidates
            WHERE candidates.job_id IS NOT NULL
            LIMIT 1
        ) AS step
    )
)
SELECT queue, priority, run_at, job_id, job_class, args::text AS args, error_count, last_error
FROM candidates
WHERE locked
LIMIT 1
"""
)

RECHECK_JOB = text(
    "SELECT 1 FROM que_jobs "
    "WHERE queue = :queue AND priority = :priority AND run_at = :run_at AND job_id = :job_id"
)

UNLOCK_JOB = text("SELECT pg_advisory_unlock(:job_id)")

_DIALECT = psycopg_dialect()  # type: ignore[no-untyped-call]


def driver_sql(statement: TextClause) -> str:
    """A named statement as psycopg takes it (``%(name)s`` parameters), for the hot path
    that runs on the driver's connection directly."""
    return str(statement.compile(dialect=_DIALECT))


_LOCK_NEXT_JOB_SQL = driver_sql(LOCK_NEXT_JOB)
_RECHECK_JOB_SQL = driver_sql(RECHECK_JOB)
_UNLOCK_JOB_SQL = driver_sql(UNLOCK_JOB)
_NOT_YET = object()
# The job's transaction opens with the isolation level the connection is set to, and with
# idle_in_transaction_session_timeout off: the session sits idle in the transaction while the
# handler runs in Python, and a server that ended it there would end the job's lock with it,
# letting a second worker start the same job.
# BEGIN comes first, so that its options apply; the re-check is still a fresh statement, the
# first of the new transaction, with a snapshot taken after the lock query.
_BEGIN_THEN_RECHECK_SQL = (
    f"BEGIN{{options}}; SET LOCAL idle_in_transaction_session_timeout = 0; {_RECHECK_JOB_SQL}"
)
_COMMIT_THEN_UNLOCK_SQL = f"COMMIT; {_UNLOCK_JOB_SQL}"


def as_dbapi_error(error: psycopg.Error) -> StatementError:
    """A driver error raised on the hot path, wrapped as SQLAlchemy wraps driver errors
    (``sqlalchemy.exc.OperationalError``, ``DataError``...), so callers catch one family."""
    return DBAPIError.instance(None, None, error, psycopg.Error)


def driver_connection(connection: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a SQLAlchemy Connection."""
    raw = connection.connection.driver_connection
    if not isinstance(raw, psycopg.Connection):
        raise QueError(
            f"sqlalchemy-que needs the psycopg (3) driver; this connection uses {raw!r} "
            "(use a postgresql+psycopg:// URL)"
        )
    return raw


@dataclasses.dataclass(frozen=True, slots=True)
class LockedJob:
    """A row of ``que_jobs`` whose advisory lock this connection holds.

    ``args`` is the stored JSON text, exactly as written.
    """

    queue: str
    priority: int
    run_at: datetime.datetime
    job_id: int
    job_class: str
    args: str
    error_count: int
    last_error: str | None

    @property
    def key(self) -> dict[str, object]:
        """The full primary key, which every statement about the job matches on."""
        return {
            "queue": self.queue,
            "priority": self.priority,
            "run_at": self.run_at,
            "job_id": self.job_id,
        }


def recheck_job(connection: Connection, job: LockedJob) -> bool:
    """True when the job still exists under its full key (a fresh statement's snapshot)."""
    return connection.execute(RECHECK_JOB, job.key).first() is not None


def unlock_job(connection: Connection, job_id: int) -> bool:
    """Release the job's advisory lock; True when this session held it."""
    return bool(connection.execute(UNLOCK_JOB, {"job_id": job_id}).scalar_one())


_ISOLATION_SQL = {
    psycopg.IsolationLevel.READ_UNCOMMITTED: " ISOLATION LEVEL READ UNCOMMITTED",
    psycopg.IsolationLevel.READ_COMMITTED: " ISOLATION LEVEL READ COMMITTED",
    psycopg.IsolationLevel.REPEATABLE_READ: " ISOLATION LEVEL REPEATABLE READ",
    psycopg.IsolationLevel.SERIALIZABLE: " ISOLATION LEVEL SERIALIZABLE",
}


def _begin_sql(raw: psycopg.Connection[Any]) -> str:
    """The job's ``BEGIN`` and the re-check, honouring the isolation level, read-only and
    deferrable settings of the connection (as SQLAlchemy's ``isolation_level`` sets them)."""
    options = _ISOLATION_SQL.get(raw.isolation_level, "") if raw.isolation_level else ""
    if raw.read_only is not None:
        options += " READ ONLY" if raw.read_only else " READ WRITE"
    if raw.deferrable is not None:
        options += " DEFERRABLE" if raw.deferrable else " NOT DEFERRABLE"
    return _BEGIN_THEN_RECHECK_SQL.replace("{options}", options)


def lock_job(
    connection: Connection, queue: str = "", *, attempts: int = LOCK_ATTEMPTS
) -> LockedJob | None:
    """Lock the most urgent ready job of ``queue`` on ``connection``, or return None.

    The lock is session-level: it outlives the transactions that follow and must be released
    with :func:`unlock_job` on the same connection (or by closing the session). The lock
    query and the re-check run as statements of their own (autocommit), one round trip each;
    if the caller has a transaction open, the first lock query runs in it and it is
    committed. The connection is left with no transaction open.

    Should anything fail after a lock may have been taken, the connection is invalidated, so
    that the server ends the session and its locks rather than the pool keeping them.

    :param attempts: how many locked-but-vanished jobs to skip before giving up with None,
        as que-go does ("try again later").
    """
    try:
        row: Any = _NOT_YET
        if connection.in_transaction():
            row = connection.execute(LOCK_NEXT_JOB, {"queue": queue}).first()
            connection.commit()
        raw = driver_connection(connection)
        autocommit = raw.autocommit
        raw.autocommit = True
        try:
            return lock_on_driver(raw, queue, attempts=attempts, first_row=row)
        except psycopg.Error as error:
            raise as_dbapi_error(error) from error
        finally:
            if not (raw.closed or raw.broken):
                raw.autocommit = autocommit
    except BaseException:
        # A lock may have been taken (even by a statement whose result could not be read)
        # and cannot be released on a connection in an unknown state: discard the
        # connection, so that the server ends the session and its locks.
        connection.invalidate()
        raise


def lock_on_driver(
    raw: psycopg.Connection[Any],
    queue: str,
    *,
    attempts: int = LOCK_ATTEMPTS,
    begin: bool = False,
    first_row: Any = _NOT_YET,
) -> LockedJob | None:
    """:func:`lock_job` on a psycopg connection in autocommit mode: the worker's hot path.

    :param begin: open the job's transaction (``BEGIN``) in the same round trip as the
        re-check, so that a returned job's connection is inside a transaction.

    Round trips, which dominate the cost of a job: one for the lock query (a prepared
    statement), one for the re-check (with ``BEGIN`` when asked).
    :param first_row: the result of a lock query already run, if any.

    The caller discards the connection if this raises.
    """
    row = first_row
    for _ in range(attempts):
        if row is _NOT_YET:
            row = raw.execute(_LOCK_NEXT_JOB_SQL, {"queue": queue}, prepare=True).fetchone()
        if row is None:
            return None
        job = LockedJob(*row)
        row = _NOT_YET
        if begin:
            # One round trip: BEGIN for the job's transaction, then the re-check, sent as
            # one multi-statement query (parameters bound client-side, safely quoted).
            cursor = psycopg.ClientCursor(raw)
            cursor.execute(_begin_sql(raw), job.key)
            cursor.nextset()  # past BEGIN
            cursor.nextset()  # past SET LOCAL
            found = cursor.fetchone() is not None
        else:
            found = raw.execute(_RECHECK_JOB_SQL, job.key, prepare=True).fetchone() is not None
        if found:
            return job
        logger.debug(
            "job %s vanished between the lock query and the re-check; looking again",
            job.job_id,
            extra={"job_id": job.job_id, "queue": queue},
        )
        if begin:
            # End the (empty) transaction with COMMIT rather than ROLLBACK: psycopg answers
            # a ROLLBACK by dropping all its prepared statements.
            cursor.execute(_COMMIT_THEN_UNLOCK_SQL, {"job_id": job.job_id})
            cursor.nextset()
            unlocked = cursor.fetchone()
        else:
            unlocked = raw.execute(_UNLOCK_JOB_SQL, {"job_id": job.job_id}, prepare=True).fetchone()
        if not (unlocked or (False,))[0]:
            raise QueError(f"the advisory lock of job {job.job_id} was not held by this session")
    return None
