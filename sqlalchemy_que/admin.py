"""Operating on jobs one by one: list, show, retry, delete, clear, cancel, purge failed jobs.

Each function works in the caller's transaction (given a ``Connection``) and never commits it;
given an ``Engine`` it runs in a transaction of its own and commits. The CLI's ``jobs``,
``job``, ``retry``, ``delete``, ``clear``, ``cancel`` and ``purge-failed`` commands each call
one of them::

    from sqlalchemy_que import admin

    with engine.begin() as connection:
        for info in admin.list_jobs(connection, errored=True):
            print(info.job_id, info.job_class, info.error_count, info.first_error_line)
        result = admin.retry(connection, [42])
        print(result.done, result.locked, result.missing)

None of them ever touches a job a worker holds: each takes the job's own advisory lock
(``pg_try_advisory_xact_lock(job_id)``, the key Que's workers lock, released when the
caller's transaction ends) in the statement that changes the job, and leaves the job alone,
reporting it as locked, when that lock is taken. So no worker can start a job while it is
being changed, and no running job is changed under its worker.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from sqlalchemy import Connection, Engine, text

from ._errors import InvalidJobError
from ._notify import CANCEL_CHANNEL, notify_job
from ._scheduler import ScheduleState, schedule_states

__all__ = [
    "Cleared",
    "Counts",
    "JobInfo",
    "Outcome",
    "ScheduleState",
    "cancel",
    "clear",
    "counts",
    "delete",
    "get_job",
    "list_jobs",
    "purge_failed",
    "retry",
    "schedule_states",
]

#: What a job is: ``ready`` (due now), ``scheduled`` (due later, never failed), ``retrying``
#: (due later after a failure), ``working`` (a worker holds it), ``failed`` (in
#: ``que_failed_jobs``).
State = Literal["ready", "scheduled", "retrying", "working", "failed"]

# Job locks as Que rebuilds them from pg_locks (one-bigint advisory locks, this database).
_LOCKS = """
    SELECT (l.classid::bigint << 32) + l.objid::bigint AS job_id, l.pid
    FROM pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
      AND l.pid <> pg_backend_pid()
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

_COLUMNS = """
    j.job_id, j.queue, j.priority, j.run_at, j.job_class, j.args::text AS args,
    j.error_count, j.last_error
"""

_LIST_WAITING = f"""
SELECT {_COLUMNS}, locks.pid AS locked_by, NULL::timestamptz AS failed_at,
       NULL::text AS reason, j.run_at <= now() AS due
FROM que_jobs AS j
LEFT JOIN ({_LOCKS}) AS locks ON locks.job_id = j.job_id
WHERE (CAST(:queue AS text) IS NULL OR j.queue = :queue)
  AND (CAST(:job_class AS text) IS NULL OR j.job_class = :job_class)
  AND (NOT :errored OR j.error_count > 0)
  AND (NOT :scheduled OR j.run_at > now())
  AND (CAST(:job_id AS bigint) IS NULL OR j.job_id = :job_id)
ORDER BY j.queue, j.priority, j.run_at, j.job_id
LIMIT :limit
"""

_LIST_FAILED = f"""
SELECT {_COLUMNS}, NULL::int AS locked_by, j.failed_at, j.reason, false AS due
FROM que_failed_jobs AS j
WHERE (CAST(:queue AS text) IS NULL OR j.queue = :queue)
  AND (CAST(:job_class AS text) IS NULL OR j.job_class = :job_class)
  AND (CAST(:job_id AS bigint) IS NULL OR j.job_id = :job_id)
ORDER BY j.failed_at DESC, j.job_id
LIMIT :limit
"""

# The jobs among :ids, each with whether this transaction got its lock (tried exactly once
# per row: the CTE is materialised) and, if not, the backend that holds it.
_TRY_LOCK = f"""
WITH target AS MATERIALIZED (
    SELECT j.job_id FROM que_jobs AS j WHERE j.job_id = ANY(CAST(:ids AS bigint[]))
), tried AS MATERIALIZED (
    SELECT t.job_id, pg_try_advisory_xact_lock(t.job_id) AS free FROM target AS t
)
SELECT tried.job_id, tried.free, locks.pid
FROM tried LEFT JOIN ({_LOCKS}) AS locks ON locks.job_id = tried.job_id AND NOT tried.free
"""

_RUN_NOW = text(
    "UPDATE que_jobs SET run_at = now() WHERE job_id = ANY(CAST(:ids AS bigint[])) "
    "RETURNING job_id, queue"
)

# A failed job goes back into que_jobs as a plain row, as Ruby Que writes them: due now,
# error_count 0 (its attempts reset), its last_error kept for the record, its job_id kept.
_RETRY_FAILED = text(
    """
WITH moved AS (
    DELETE FROM que_failed_jobs WHERE job_id = ANY(CAST(:ids AS bigint[])) RETURNING *
)
INSERT INTO que_jobs (priority, run_at, job_id, job_class, args, error_count, last_error, queue)
SELECT priority, now(), job_id, job_class, args, 0, last_error, queue FROM moved
RETURNING job_id, queue
"""
)

_DELETE_WAITING = text(
    "WITH unmarked AS (DELETE FROM que_job_runs WHERE job_id = ANY(CAST(:ids AS bigint[]))) "
    "DELETE FROM que_jobs WHERE job_id = ANY(CAST(:ids AS bigint[])) RETURNING job_id"
)

_DELETE_FAILED = text(
    "DELETE FROM que_failed_jobs WHERE job_id = ANY(CAST(:ids AS bigint[])) RETURNING job_id"
)

_CANCEL_WAITING = text(
    """
WITH moved AS (
    DELETE FROM que_jobs WHERE job_id = ANY(CAST(:ids AS bigint[])) RETURNING *
), unmarked AS (
    DELETE FROM que_job_runs WHERE job_id = ANY(CAST(:ids AS bigint[]))
)
INSERT INTO que_failed_jobs
    (priority, run_at, job_id, job_class, args, error_count, last_error, queue, reason)
SELECT priority, run_at, job_id, job_class, args, error_count,
       'sqlalchemy_que.JobCancelledError: cancelled before it ran', queue, 'cancelled'
FROM moved
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id
"""
)

_NOTIFY_CANCEL = text("SELECT pg_notify(:channel, :payload)")

_MATCHING_WAITING = """
SELECT j.job_id FROM que_jobs AS j
WHERE (CAST(:queue AS text) IS NULL OR j.queue = :queue)
  AND (CAST(:job_class AS text) IS NULL OR j.job_class = :job_class)
"""

_CLEAR_WAITING = text(
    f"""
WITH target AS MATERIALIZED ({_MATCHING_WAITING}),
tried AS MATERIALIZED (
    SELECT t.job_id, pg_try_advisory_xact_lock(t.job_id) AS free FROM target AS t
), deleted AS (
    DELETE FROM que_jobs WHERE job_id IN (SELECT job_id FROM tried WHERE free)
    RETURNING job_id
), unmarked AS (
    DELETE FROM que_job_runs WHERE job_id IN (SELECT job_id FROM deleted)
)
SELECT (SELECT count(*) FROM deleted), (SELECT count(*) FROM tried WHERE NOT free)
"""
)

_CLEAR_FAILED = text(
    """
DELETE FROM que_failed_jobs
WHERE (CAST(:queue AS text) IS NULL OR queue = :queue)
  AND (CAST(:job_class AS text) IS NULL OR job_class = :job_class)
"""
)

# Crash marks whose job is gone from que_jobs (completed by a Ruby or Go worker after a
# crash of ours, deleted by hand): bookkeeping left over, removed with the purge.
_PURGE = text(
    """
WITH purged AS (
    DELETE FROM que_failed_jobs
    WHERE failed_at < now() - make_interval(secs => :seconds) RETURNING job_id
), orphans AS (
    DELETE FROM que_job_runs AS r
    WHERE NOT EXISTS (SELECT 1 FROM que_jobs AS j WHERE j.job_id = r.job_id)
)
SELECT count(*) FROM purged
"""
)

_COUNTS = text(
    f"""
SELECT
    count(*) FILTER (WHERE j.run_at <= now() AND locks.job_id IS NULL) AS ready,
    count(*) FILTER (WHERE j.run_at > now() AND j.error_count = 0) AS scheduled,
    count(*) FILTER (WHERE j.error_count > 0 AND locks.job_id IS NULL) AS retrying,
    count(locks.job_id) AS working,
    (SELECT count(*) FROM que_failed_jobs) AS failed
FROM que_jobs AS j
LEFT JOIN ({_LOCKS}) AS locks ON locks.job_id = j.job_id
"""
)


@dataclasses.dataclass(frozen=True, slots=True)
class JobInfo:
    """One job, waiting in ``que_jobs`` or failed in ``que_failed_jobs``.

    ``args`` is the decoded argument list; ``locked_by`` the backend pid of the session
    holding the job (a worker in any language), else None; ``failed_at`` and ``reason``
    are set for failed jobs only.
    """

    job_id: int
    queue: str
    priority: int
    run_at: datetime.datetime
    job_class: str
    args: Any
    error_count: int
    last_error: str | None
    state: State
    locked_by: int | None = None
    failed_at: datetime.datetime | None = None
    reason: str | None = None

    @property
    def first_error_line(self) -> str | None:
        """The first line of ``last_error`` (``"Class: message"`` in every language)."""
        return None if self.last_error is None else self.last_error.split("\n", 1)[0]


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What an operation on given job ids did: ``done``, the ids it changed; ``locked``, the
    ids a worker holds, left untouched (id to the holding backend's pid); ``missing``, the
    ids found nowhere."""

    done: list[int]
    locked: dict[int, int | None]
    missing: list[int]


@dataclasses.dataclass(frozen=True, slots=True)
class Counts:
    """Jobs by state across every queue (the ``stats`` command's summary)."""

    ready: int
    scheduled: int
    retrying: int
    working: int
    failed: int


@dataclasses.dataclass(frozen=True, slots=True)
class Cleared:
    """What :func:`clear` did: how many jobs it deleted, how many it left because a worker
    holds them."""

    deleted: int
    locked: int


def _ids(job_ids: Iterable[int]) -> list[int]:
    ids = list(job_ids)
    for job_id in ids:
        if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 < job_id < 2**63:
            raise InvalidJobError(f"a job id must be a positive whole number, got {job_id!r}")
    return list(dict.fromkeys(ids))


def _in_transaction(bind: Engine | Connection, function: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(bind, Engine):
        with bind.begin() as connection:
            return function(connection, *args, **kwargs)
    return function(bind, *args, **kwargs)


def _job_state(row: Any, *, failed: bool) -> State:
    """The state of a job row read with ``locked_by`` and ``due`` (the admin reads' and the
    dashboard's): ``failed`` when it comes from ``que_failed_jobs``."""
    if failed:
        return "failed"
    if row.locked_by is not None:
        return "working"
    if row.due:
        return "ready"
    return "retrying" if row.error_count > 0 else "scheduled"


def _info(row: Any) -> JobInfo:
    state = _job_state(row, failed=row.failed_at is not None)
    return JobInfo(
        job_id=row.job_id,
        queue=row.queue,
        priority=row.priority,
        run_at=row.run_at,
        job_class=row.job_class,
        args=json.loads(row.args),
        error_count=row.error_count,
        last_error=row.last_error,
        state=state,
        locked_by=row.locked_by,
        failed_at=row.failed_at,
        reason=row.reason,
    )


def list_jobs(
    bind: Engine | Connection,
    *,
    queue: str | None = None,
    job_class: str | None = None,
    errored: bool = False,
    scheduled: bool = False,
    failed: bool = False,
    limit: int = 100,
) -> list[JobInfo]:
    """Jobs of ``que_jobs`` in the order workers take them (with ``failed``, the failed jobs
    instead, most recent first), at most ``limit``.

    :param queue: only this queue; default every queue.
    :param job_class: only this job_class.
    :param errored: only jobs that have failed at least once (``error_count > 0``).
    :param scheduled: only jobs due later.
    :param failed: list ``que_failed_jobs`` instead.
    :raises InvalidJobError: for a ``limit`` that is not a whole number >= 1.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidJobError(f"limit must be a whole number >= 1, got {limit!r}")
    params = {
        "queue": queue,
        "job_class": job_class,
        "errored": errored,
        "scheduled": scheduled,
        "job_id": None,
        "limit": limit,
    }
    statement = _LIST_FAILED if failed else _LIST_WAITING
    if failed:
        del params["errored"], params["scheduled"]
    rows = _in_transaction(bind, lambda c: list(c.execute(text(statement), params)))
    return [_info(row) for row in rows]


def get_job(bind: Engine | Connection, job_id: int) -> JobInfo | None:
    """One job in full, waiting or failed; None when it is in neither table."""
    (job_id,) = _ids([job_id])

    def read(connection: Connection) -> JobInfo | None:
        for statement in (_LIST_WAITING, _LIST_FAILED):
            params: dict[str, Any] = {"queue": None, "job_class": None, "job_id": job_id}
            params["limit"] = 1
            if statement is _LIST_WAITING:
                params.update(errored=False, scheduled=False)
            row = connection.execute(text(statement), params).first()
            if row is not None:
                return _info(row)
        return None

    result: JobInfo | None = _in_transaction(bind, read)
    return result


def _lock_waiting(connection: Connection, ids: Sequence[int]) -> tuple[list[int], dict[int, Any]]:
    """Lock the jobs of ``que_jobs`` among ``ids`` for this transaction; return those locked
    and those a worker holds (id to backend pid)."""
    free: list[int] = []
    locked: dict[int, Any] = {}
    for row in connection.execute(text(_TRY_LOCK), {"ids": list(ids)}):
        if row.free:
            free.append(row.job_id)
        else:
            locked[row.job_id] = row.pid
    return free, locked


def _wake(connection: Connection, rows: Iterable[Any]) -> None:
    for queue in {row.queue for row in rows}:
        notify_job(connection, queue, None)


def retry(bind: Engine | Connection, job_ids: Iterable[int]) -> Outcome:
    """Run the given jobs now: a waiting job's ``run_at`` becomes ``now()`` (its
    ``error_count`` kept); a failed job is moved back into ``que_jobs`` as a plain row due
    now, with ``error_count`` 0 (its attempts reset) and its ``last_error`` kept, where any
    worker (Ruby, Go or ours) takes it. Jobs a worker holds are left alone.

    :raises InvalidJobError: for an id that is not a positive whole number.
    """
    ids = _ids(job_ids)

    def run(connection: Connection) -> Outcome:
        free, locked = _lock_waiting(connection, ids)
        done: list[int] = []
        if free:
            rows = list(connection.execute(_RUN_NOW, {"ids": free}))
            done += [row.job_id for row in rows]
            _wake(connection, rows)
        rest = [job_id for job_id in ids if job_id not in free and job_id not in locked]
        if rest:
            rows = list(connection.execute(_RETRY_FAILED, {"ids": rest}))
            done += [row.job_id for row in rows]
            _wake(connection, rows)
        return _outcome(ids, done, locked)

    result: Outcome = _in_transaction(bind, run)
    return result


def _outcome(ids: Sequence[int], done: Sequence[int], locked: dict[int, Any]) -> Outcome:
    done_set = set(done)
    return Outcome(
        done=[job_id for job_id in ids if job_id in done_set],
        locked=locked,
        missing=[job_id for job_id in ids if job_id not in done_set and job_id not in locked],
    )


def delete(bind: Engine | Connection, job_ids: Iterable[int]) -> Outcome:
    """Delete the given jobs, waiting or failed, at once; jobs a worker holds are left
    alone (cancel those instead).

    :raises InvalidJobError: for an id that is not a positive whole number.
    """
    ids = _ids(job_ids)

    def run(connection: Connection) -> Outcome:
        free, locked = _lock_waiting(connection, ids)
        done: list[int] = []
        if free:
            done += list(connection.execute(_DELETE_WAITING, {"ids": free}).scalars())
        rest = [job_id for job_id in ids if job_id not in free and job_id not in locked]
        if rest:
            done += list(connection.execute(_DELETE_FAILED, {"ids": rest}).scalars())
        return _outcome(ids, done, locked)

    result: Outcome = _in_transaction(bind, run)
    return result


def clear(
    bind: Engine | Connection,
    *,
    queue: str | None = None,
    job_class: str | None = None,
    failed: bool = False,
) -> Cleared:
    """Delete every waiting job (with ``failed``, every failed job instead) matching the
    filters; jobs a worker holds are left and counted in :attr:`Cleared.locked`."""

    def run(connection: Connection) -> Cleared:
        params = {"queue": queue, "job_class": job_class}
        if failed:
            return Cleared(deleted=connection.execute(_CLEAR_FAILED, params).rowcount, locked=0)
        deleted, locked = connection.execute(_CLEAR_WAITING, params).one()
        return Cleared(deleted=deleted, locked=locked)

    result: Cleared = _in_transaction(bind, run)
    return result


def cancel(bind: Engine | Connection, job_id: int) -> Literal["cancelled", "requested", "missing"]:
    """Cancel a job. A waiting job is moved to ``que_failed_jobs`` at once (reason
    ``cancelled``; :func:`retry` brings it back): ``"cancelled"``. A running job is not
    touched: a cancel request is sent (at the caller's commit) to the worker pools'
    listeners, the handler sees ``job.cancel_requested``, and when it returns its worker
    fails the job as cancelled: ``"requested"``. ``"missing"`` when the job is not in
    ``que_jobs``.

    A running job is reached only through a listening pool of ours (``listen=True``, not
    in burst mode); a Ruby or Go worker never hears the request.
    """
    (job_id,) = _ids([job_id])

    def run(connection: Connection) -> Literal["cancelled", "requested", "missing"]:
        free, locked = _lock_waiting(connection, [job_id])
        if locked:
            connection.execute(_NOTIFY_CANCEL, {"channel": CANCEL_CHANNEL, "payload": str(job_id)})
            return "requested"
        if free and connection.execute(_CANCEL_WAITING, {"ids": free}).first() is not None:
            return "cancelled"
        return "missing"

    result: Literal["cancelled", "requested", "missing"] = _in_transaction(bind, run)
    return result


def purge_failed(bind: Engine | Connection, *, older_than: datetime.timedelta | float) -> int:
    """Delete the failed jobs that failed more than ``older_than`` ago (a ``timedelta`` or
    seconds; 0 purges them all); return how many. Also removes crash marks left by jobs
    that are gone.

    :raises InvalidJobError: for a negative or non-numeric ``older_than``.
    """
    seconds = (
        older_than.total_seconds() if isinstance(older_than, datetime.timedelta) else older_than
    )
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < 1e12:
        raise InvalidJobError(f"older_than must be seconds >= 0 or a timedelta, got {older_than!r}")
    result: int = _in_transaction(
        bind, lambda c: c.execute(_PURGE, {"seconds": float(seconds)}).scalar_one()
    )
    return result


def counts(bind: Engine | Connection) -> Counts:
    """How many jobs are ready, scheduled, retrying (failed before, waiting to run again),
    working, and failed for good."""
    row = _in_transaction(bind, lambda c: c.execute(_COUNTS).one())
    return Counts(*row)
