"""The statements a worker sends about its jobs, named, in one place.

They run on the driver connection of a :class:`~sqlalchemy_que._session.LockedSession`
(libpq's extended protocol, ``$n`` parameters in text format), most of them as statements the
server has prepared once per session. Each is written so that PostgreSQL evaluates
``pg_try_advisory_lock`` and ``pg_advisory_unlock`` exactly once per row it is meant for,
whatever plan it picks (a generic plan included).

``run_at`` travels as text between the server and the worker (``run_at_key``): the server's
own spelling of the instant, which it reads back exactly, and which never fails to decode,
even for ``-infinity`` or a year the client's datetime cannot hold.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Statement"]


@dataclasses.dataclass(frozen=True, slots=True)
class Statement:
    """A named statement: the name it is prepared under and its text."""

    name: bytes
    sql: bytes


def _statement(name: str, sql: str) -> Statement:
    return Statement(f"sqlalchemy_que_{name}".encode(), " ".join(sql.split()).encode())


#: Lock up to ``$2`` ready jobs of queue ``$1``: one walk along the primary key in
#: ``(priority, run_at, job_id)`` order, trying each visited row's lock once, stepping over
#: rows other sessions hold, and stopping as soon as ``$2`` locks are taken. The lock is a
#: condition of the outer query over an ordered subquery, fenced with ``OFFSET 0``: PostgreSQL
#: never pushes a condition with a volatile function into a subquery, never flattens a
#: subquery that sorts, and pulls its rows one at a time, so only the rows the walk reaches are
#: tried, once each, whatever plan it picks (an index scan in key order, or a sort of the ready
#: rows first). Only the rows it locked are returned. ``run_at`` is decoded only when it
#: certainly fits a Python datetime in any time zone; ``run_at_key`` always carries its value.
LOCK_JOBS = _statement(
    "lock_jobs",
    """
SELECT ready.queue, ready.priority,
       CASE WHEN ready.run_at BETWEEN '0002-01-01 00:00+00' AND '9998-12-31 00:00+00'
            THEN ready.run_at END,
       ready.job_id, ready.job_class, ready.args::text, ready.error_count, ready.last_error,
       ready.run_at::text AS run_at_key
FROM (
    SELECT j.queue, j.priority, j.run_at, j.job_id, j.job_class, j.args, j.error_count,
           j.last_error
    FROM que_jobs AS j
    WHERE j.queue = $1 AND j.run_at <= now()
    ORDER BY j.priority, j.run_at, j.job_id
    OFFSET 0
) AS ready
WHERE pg_try_advisory_lock(ready.job_id)
LIMIT $2::int
""",
)

# The batch statements look each key up on its own (a LATERAL subquery with LIMIT 1 is a
# parameterized index probe, which PostgreSQL never turns into a hash join over a scan of the
# whole queue, whatever its statistics say: a fresh, unanalyzed queue made that plan cost
# milliseconds a batch).
_EACH_KEY = """
    FROM unnest($2::smallint[], $3::timestamptz[], $4::bigint[]) AS k(priority, run_at, job_id)
    CROSS JOIN LATERAL (
        SELECT j.job_id, j.ctid FROM que_jobs AS j
        WHERE j.queue = $1 AND j.priority = k.priority AND j.run_at = k.run_at
          AND j.job_id = k.job_id
        LIMIT 1
    ) AS found
"""

#: The rows of the given full keys (queue ``$1``; priorities, run_at texts and ids as arrays)
#: that still exist, read in a statement of its own (a snapshot newer than the lock's).
RECHECK_JOBS = _statement("recheck_jobs", f"SELECT found.job_id {_EACH_KEY}")

#: Release the given job locks; one row per id, true where this session held it.
UNLOCK_JOBS = _statement(
    "unlock_jobs",
    "SELECT pg_advisory_unlock(id) FROM unnest($1::bigint[]) AS t(id)",
)

UNLOCK_JOB = _statement("unlock_job", "SELECT pg_advisory_unlock($1::bigint)")

#: Complete one job: delete it by its full key.
DELETE_JOB = _statement(
    "delete_job",
    "DELETE FROM que_jobs "
    "WHERE queue = $1 AND priority = $2 AND run_at = $3::timestamptz AND job_id = $4",
)

#: Complete several jobs of one queue at once (batched completion): the rows found by their
#: full keys are deleted by their physical address (a TID scan). A row another client changed
#: meanwhile has a new address and is left alone, as a full-key DELETE would leave it.
DELETE_JOBS = _statement(
    "delete_jobs",
    f"DELETE FROM que_jobs WHERE ctid = ANY(ARRAY(SELECT found.ctid {_EACH_KEY}))",
)

#: Record a failure as Que does: one more error, the retry delay, the error text.
RECORD_ERROR = _statement(
    "record_error",
    "UPDATE que_jobs "
    "SET error_count = error_count + 1, "
    "    run_at = now() + make_interval(secs => $5::float8), "
    "    last_error = $6 "
    "WHERE queue = $1 AND priority = $2 AND run_at = $3::timestamptz AND job_id = $4",
)

#: At check-in, and after a job whose handler used the connection (it may have taken advisory
#: locks of its own): let go of every advisory lock of the session.
UNLOCK_ALL = _statement("unlock_all", "SELECT pg_advisory_unlock_all()")

#: Sent with the job's BEGIN (in one round trip): see LockedSession.open_transaction.
NO_IDLE_TIMEOUT = b"SET LOCAL idle_in_transaction_session_timeout = 0"

BEGIN = b"BEGIN"
COMMIT = b"COMMIT"
ROLLBACK = b"ROLLBACK"

#: The statements prepared on a worker's session (the others run unnamed, being rare).
PREPARED = (LOCK_JOBS, RECHECK_JOBS, UNLOCK_JOBS, UNLOCK_JOB, DELETE_JOB, DELETE_JOBS)

# -- attempts, crash marks and failed jobs (tables of our own; que_jobs is not changed) ------

#: The re-check of :data:`RECHECK_JOBS` that also writes the crash marks of the jobs it
#: confirms, in the same statement (so in the same round trip, and committed with it since
#: the worker's session is in autocommit): one ``INSERT ... SELECT`` for the whole batch. It
#: returns each confirmed job's id with the mark found there before (its start time and
#: backend pid), which is not null when an earlier run of the job ended without an outcome.
#: The CTEs share one snapshot, so ``earlier`` reads the marks as they were before the insert.
#: Its commit does not wait for the WAL flush (``synchronous_commit`` off for this one
#: transaction): the marks are visible to every session at once and outlive the worker's
#: process, which is what they are for; only a crash of the server itself within the WAL
#: writer's delay could lose them, and the job's next commit flushes them anyway. That keeps
#: the marks from doubling the flushes of a batch completed in one transaction.
RECHECK_AND_MARK_JOBS = _statement(
    "recheck_and_mark_jobs",
    """
WITH present AS (
    SELECT j.job_id FROM que_jobs AS j
    WHERE j.queue = $1
      AND (j.priority, j.run_at, j.job_id) IN (
          SELECT * FROM unnest($2::smallint[], $3::timestamptz[], $4::bigint[]))
), earlier AS (
    SELECT r.job_id, r.started_at, r.pid FROM que_job_runs AS r
    WHERE r.job_id IN (SELECT job_id FROM present)
), marked AS (
    INSERT INTO que_job_runs (job_id, started_at, pid)
    SELECT job_id, now(), pg_backend_pid() FROM present
    ON CONFLICT (job_id) DO UPDATE SET started_at = excluded.started_at, pid = excluded.pid
)
SELECT p.job_id, e.started_at::text, e.pid
FROM present AS p LEFT JOIN earlier AS e ON e.job_id = p.job_id
CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS async
""",
)

#: Release jobs locked but not started: their marks are deleted (committed) before their
#: locks go, in this order in one pipeline, so that nobody who locks them next finds a mark.
UNMARK_JOBS = _statement(
    "unmark_jobs",
    "DELETE FROM que_job_runs WHERE job_id = ANY($1::bigint[])",
)

#: :data:`DELETE_JOB` that also deletes the job's crash mark, in the same transaction; its
#: row count is that of ``que_jobs``.
COMPLETE_JOB = _statement(
    "complete_job",
    "WITH unmarked AS (DELETE FROM que_job_runs WHERE job_id = $4) "
    "DELETE FROM que_jobs "
    "WHERE queue = $1 AND priority = $2 AND run_at = $3::timestamptz AND job_id = $4",
)

#: :data:`DELETE_JOBS` that also deletes the jobs' crash marks.
COMPLETE_JOBS = _statement(
    "complete_jobs",
    """
WITH unmarked AS (DELETE FROM que_job_runs WHERE job_id = ANY($4::bigint[]))
DELETE FROM que_jobs AS j
WHERE j.queue = $1
  AND (j.priority, j.run_at, j.job_id) IN (
      SELECT * FROM unnest($2::smallint[], $3::timestamptz[], $4::bigint[]))
""",
)

#: :data:`RECORD_ERROR` that also deletes the job's crash mark.
RECORD_RETRY = _statement(
    "record_retry",
    "WITH unmarked AS (DELETE FROM que_job_runs WHERE job_id = $4) "
    "UPDATE que_jobs "
    "SET error_count = error_count + 1, "
    "    run_at = now() + make_interval(secs => $5::float8), "
    "    last_error = $6 "
    "WHERE queue = $1 AND priority = $2 AND run_at = $3::timestamptz AND job_id = $4",
)

#: Fail a job for good: move its row, by full key, from ``que_jobs`` to ``que_failed_jobs``
#: with one more error, its final error ``$5`` and the reason ``$6``, and delete its crash
#: mark, in one statement. Its row count is that of the rows moved.
MOVE_TO_FAILED = _statement(
    "move_to_failed",
    """
WITH moved AS (
    DELETE FROM que_jobs
    WHERE queue = $1 AND priority = $2 AND run_at = $3::timestamptz AND job_id = $4
    RETURNING *
), unmarked AS (
    DELETE FROM que_job_runs WHERE job_id = $4
)
INSERT INTO que_failed_jobs
    (priority, run_at, job_id, job_class, args, error_count, last_error, queue, reason)
SELECT priority, run_at, job_id, job_class, args, error_count + 1, $5, queue, $6
FROM moved
ON CONFLICT (job_id) DO UPDATE SET
    priority = excluded.priority, run_at = excluded.run_at, job_class = excluded.job_class,
    args = excluded.args, error_count = excluded.error_count,
    last_error = excluded.last_error, queue = excluded.queue,
    failed_at = excluded.failed_at, reason = excluded.reason
""",
)
