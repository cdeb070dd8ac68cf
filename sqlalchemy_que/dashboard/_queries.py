"""What the dashboard reads, as named statements, each bounded on a table of any size.

``que_jobs`` is indexed by its primary key ``(queue, priority, run_at, job_id)`` only (Que
0.x's schema, shared with Ruby and Go), so every read walks that index from a known prefix and
stops early:

* the queues are found by a skip scan along the index (one probe per queue);
* counts per queue read at most ``count_limit`` index entries of the queue (past that, the
  dashboard shows ``count_limit+``), and the table's size comes from ``pg_class.reltuples``;
* the job list is keyset-paged in the index's order, and filters by job_class or state are
  applied to a window of at most ``window`` rows per page, never to the whole table;
* one job is read by its queue and priority (an index range) and id, failed jobs by their
  primary key or the ``failed_at`` index.

Locked jobs (``working``) are found from ``pg_locks``; their rows come from
:func:`sqlalchemy_que.worker_states`, which has no index on ``job_id`` to use and so reads
``que_jobs`` once whenever some job is locked (see docs/dashboard.md for what that costs).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

from sqlalchemy import Connection, TextClause, text

from sqlalchemy_que._stats import _JOB_LOCKS
from sqlalchemy_que.admin import _job_state

__all__ = [
    "FailedPage",
    "JobPage",
    "JobRow",
    "QueueCounts",
    "failed_page",
    "find_job",
    "job_page",
    "lock_count",
    "queue_counts",
    "table_counters",
]

#: The states a waiting job can be in (``failed`` jobs are in ``que_failed_jobs``).
WAITING_STATES = ("ready", "scheduled", "retrying", "working")

#: Each queue of que_jobs (a skip scan: one index probe per queue, at most :max_queues), with
#: its jobs counted over at most :cap index entries (an index-only read of run_at).
_QUEUES = """
queues(queue, n) AS (
    (SELECT j.queue, 1 FROM que_jobs AS j ORDER BY j.queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM que_jobs AS j WHERE j.queue > q.queue ORDER BY j.queue LIMIT 1),
           q.n + 1
    FROM queues AS q
    WHERE q.queue IS NOT NULL AND q.n < :max_queues
)
"""

QUEUE_COUNTS = text(
    f"""
WITH RECURSIVE {_QUEUES}
SELECT q.queue, c.due, c.later, c.total
FROM queues AS q
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE s.run_at <= now()) AS due,
           count(*) FILTER (WHERE s.run_at > now()) AS later,
           count(*) AS total
    FROM (SELECT j.run_at FROM que_jobs AS j WHERE j.queue = q.queue LIMIT :cap) AS s
) AS c
WHERE q.queue IS NOT NULL
ORDER BY q.queue
"""
)

#: The jobs locked right now found among the first :probe jobs of each queue (workers lock
#: the first ready jobs of a queue in its index order: that is where a worker's jobs are),
#: with their sessions' activity, in the columns of sqlalchemy_que.worker_states. Each is read
#: back by its whole key (a LATERAL probe: never a join that could scan que_jobs).
WORKER_STATES_NEAR_THE_FRONT = text(
    f"""
WITH RECURSIVE {_QUEUES},
locks AS MATERIALIZED ({_JOB_LOCKS}),
found AS MATERIALIZED (
    SELECT f.queue, f.priority, f.run_at, f.job_id
    FROM queues AS q
    CROSS JOIN LATERAL (
        SELECT j.queue, j.priority, j.run_at, j.job_id FROM que_jobs AS j
        WHERE j.queue = q.queue
        ORDER BY j.priority, j.run_at, j.job_id
        LIMIT :probe
    ) AS f
    WHERE q.queue IS NOT NULL AND f.job_id IN (SELECT l.job_id FROM locks AS l)
)
SELECT j.priority, j.run_at, j.job_id, j.job_class, j.args::text AS args, j.error_count,
       j.last_error, j.queue,
       a.pid AS pg_backend_pid,
       a.state AS pg_state,
       a.state_change AS pg_state_changed_at,
       a.query AS pg_last_query,
       a.query_start AS pg_last_query_started_at,
       a.xact_start AS pg_transaction_started_at,
       a.wait_event_type IS NOT DISTINCT FROM 'Lock' AS pg_waiting_on_lock
FROM found AS f
CROSS JOIN LATERAL (
    SELECT j.* FROM que_jobs AS j
    WHERE j.queue = f.queue AND j.priority = f.priority AND j.run_at = f.run_at
      AND j.job_id = f.job_id
    LIMIT 1
) AS j
JOIN locks AS l ON l.job_id = j.job_id
JOIN pg_stat_activity AS a ON a.pid = l.pid
ORDER BY j.job_id
"""
)

#: Plans whose row estimates are a big queue's size and its due jobs (planned, never run:
#: PostgreSQL reads them from the statistics ANALYZE and autovacuum keep).
ESTIMATE_QUEUE = text("EXPLAIN (FORMAT JSON) SELECT 1 FROM que_jobs WHERE queue = :queue")
ESTIMATE_DUE = text(
    "EXPLAIN (FORMAT JSON) SELECT 1 FROM que_jobs WHERE queue = :queue AND run_at <= now()"
)

#: Failed jobs by queue (our own table, expected to stay small: see ``purge-failed``).
FAILED_COUNTS = text("SELECT queue, count(*) FROM que_failed_jobs GROUP BY queue")

#: The planner's estimate of the rows of que_jobs (kept by ANALYZE and autovacuum).
TABLE_ESTIMATE = text(
    "SELECT greatest(c.reltuples, 0)::bigint FROM pg_class AS c WHERE c.oid = 'que_jobs'::regclass"
)

#: How many job locks are held in this database, by anyone (cheap: pg_locks only).
LOCK_COUNT = text(f"SELECT count(*) FROM ({_JOB_LOCKS}) AS locks")

#: The cumulative rows inserted into and deleted from que_jobs (the statistics collector's
#: counters; deletes are completions, moves to que_failed_jobs, and deletes by hand).
TABLE_COUNTERS = text(
    "SELECT clock_timestamp(), s.n_tup_ins, s.n_tup_del FROM pg_stat_user_tables AS s "
    "WHERE s.relid = 'que_jobs'::regclass"
)

_JOB_COLUMNS = """
    w.queue, w.priority, w.run_at, w.run_at::text AS run_at_key, w.job_id, w.job_class,
    w.args::text AS args, w.error_count, w.last_error
"""


def _jobs_after(queue: str) -> str:
    return f"""
    FROM que_jobs AS j
    WHERE {queue}
      (j.queue, j.priority, j.run_at, j.job_id)
          > (:queue_after, CAST(:priority_after AS smallint),
             CAST(:run_at_after AS timestamptz), CAST(:job_id_after AS bigint))
    ORDER BY j.queue, j.priority, j.run_at, j.job_id
"""


def _job_page(queue: str, order: str) -> TextClause:
    return text(
        f"""
WITH locks AS MATERIALIZED ({_JOB_LOCKS})
SELECT {_JOB_COLUMNS}, w.locked_by, w.run_at <= now() AS due
FROM (
    SELECT j.queue, j.priority, j.run_at, j.job_id, j.job_class, j.args, j.error_count,
           j.last_error,
           (SELECT l.pid FROM locks AS l WHERE l.job_id = j.job_id LIMIT 1) AS locked_by
    {_jobs_after(queue)}
    LIMIT :window
) AS w
WHERE (CAST(:job_class AS text) IS NULL OR w.job_class = :job_class)
  AND (CAST(:state AS text) IS NULL
       OR (:state = 'working' AND w.locked_by IS NOT NULL)
       OR (:state = 'ready' AND w.locked_by IS NULL AND w.run_at <= now())
       OR (:state = 'scheduled' AND w.locked_by IS NULL AND w.run_at > now()
           AND w.error_count = 0)
       OR (:state = 'retrying' AND w.locked_by IS NULL AND w.run_at > now()
           AND w.error_count > 0))
ORDER BY {order}
LIMIT :page_size + 1
"""
    )


_IN_QUEUE = "j.queue = :queue AND"

#: One page of que_jobs after the key (:queue_after, :priority_after, :run_at_after,
#: :job_id_after), in the index's order: the filters are applied to a window of at most
#: :window rows read along the index, and the walk stops as soon as :page_size + 1 rows
#: matched. The outer ORDER BY is the window's own order (within one queue, the queue is a
#: constant), so PostgreSQL never sorts the window whatever it estimates.
JOB_PAGE = _job_page("", "w.queue, w.priority, w.run_at, w.job_id")

#: :data:`JOB_PAGE` within the queue :queue.
JOB_PAGE_IN_QUEUE = _job_page(_IN_QUEUE, "w.priority, w.run_at, w.job_id")

#: The key of the last row of the window a page read (asked only when the page did not
#: fill: the next page resumes after it). No row: the window reached the end of the table.
JOB_WINDOW_END = text(
    f"""
SELECT ARRAY[j.queue, j.priority::text, j.run_at::text, j.job_id::text]
{_jobs_after("")}
OFFSET :window - 1 LIMIT 1
"""
)

#: :data:`JOB_WINDOW_END` within the queue :queue.
JOB_WINDOW_END_IN_QUEUE = text(
    f"""
SELECT ARRAY[j.queue, j.priority::text, j.run_at::text, j.job_id::text]
{_jobs_after(_IN_QUEUE)}
OFFSET :window - 1 LIMIT 1
"""
)

_JOB_BY = f"""
SELECT {_JOB_COLUMNS}, locks.pid AS locked_by, w.run_at <= now() AS due
FROM que_jobs AS w
LEFT JOIN ({_JOB_LOCKS}) AS locks ON locks.job_id = w.job_id
WHERE w.queue = :queue AND w.priority = :priority AND w.job_id = :job_id
"""

#: One job of que_jobs by its whole primary key (one index probe).
JOB_BY_KEY = text(f"{_JOB_BY} AND w.run_at = CAST(:run_at AS timestamptz)")

#: One job of que_jobs by its queue, priority and id: an index range (for a job whose run_at
#: moved since its link was made: a retry).
JOB_BY_PRIORITY = text(_JOB_BY)

_FAILED_COLUMNS = f"{_JOB_COLUMNS}, w.failed_at, w.failed_at::text AS failed_at_key, w.reason"

#: One failed job by its primary key.
FAILED_BY_ID = text(f"SELECT {_FAILED_COLUMNS} FROM que_failed_jobs AS w WHERE w.job_id = :job_id")

_FAILED_BEFORE = """
    FROM que_failed_jobs AS f
    WHERE (f.failed_at, f.job_id)
          < (CAST(:failed_at_before AS timestamptz), CAST(:job_id_before AS bigint))
    ORDER BY f.failed_at DESC, f.job_id DESC
"""

#: One page of que_failed_jobs, most recent first, before (:failed_at_before, :job_id_before):
#: the filters are applied to a window of at most :window rows read along the failed_at
#: index.
FAILED_PAGE = text(
    f"""
SELECT {_FAILED_COLUMNS}
FROM (SELECT f.* {_FAILED_BEFORE} LIMIT :window) AS w
WHERE (CAST(:queue AS text) IS NULL OR w.queue = :queue)
  AND (CAST(:job_class AS text) IS NULL OR w.job_class = :job_class)
ORDER BY w.failed_at DESC, w.job_id DESC
LIMIT :page_size + 1
"""
)

#: The key of the last row of the window a page of failed jobs read.
FAILED_WINDOW_END = text(
    f"SELECT ARRAY[f.failed_at::text, f.job_id::text] {_FAILED_BEFORE} OFFSET :window - 1 LIMIT 1"
)

#: The ids of failed jobs matching the filters, most recent first, at most :limit (for
#: "retry all", which retries them by id through sqlalchemy_que.admin).
FAILED_IDS = text(
    """
SELECT f.job_id FROM que_failed_jobs AS f
WHERE (CAST(:queue AS text) IS NULL OR f.queue = :queue)
  AND (CAST(:job_class AS text) IS NULL OR f.job_class = :job_class)
ORDER BY f.failed_at DESC, f.job_id DESC
LIMIT :limit
"""
)

# The first key of each order: below every real key (job ids start at 1), above every
# failed_at.
_FIRST_JOB_KEY = ("", "-32768", "-infinity", "0")
_FIRST_FAILED_KEY = ("infinity", "0")


@dataclasses.dataclass(frozen=True, slots=True)
class QueueCounts:
    """One queue's jobs by state; ``capped`` when the queue holds more than the count limit
    (then ``ready``, ``scheduled`` and ``total`` are the planner's estimates, never below
    what was counted)."""

    queue: str
    ready: int
    scheduled: int
    working: int
    failed: int
    total: int
    capped: bool


@dataclasses.dataclass(frozen=True, slots=True)
class JobRow:
    """A job as the dashboard shows it; ``key`` is where it sits in its table's order."""

    job_id: int
    queue: str
    priority: int
    run_at: datetime.datetime
    job_class: str
    args: Any
    error_count: int
    last_error: str | None
    state: str
    locked_by: int | None
    failed_at: datetime.datetime | None
    reason: str | None
    run_at_key: str
    failed_at_key: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class JobPage:
    """A page of jobs and the key after which the next page starts (None: the last page);
    ``exhausted`` when the page read its whole window of rows before it filled (the next
    page then resumes after the window)."""

    jobs: list[JobRow]
    next_key: tuple[str, ...] | None
    exhausted: bool


FailedPage = JobPage


def _args(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:  # not ours to judge: show the stored text
        return value


def _row(row: Any, *, failed: bool = False) -> JobRow:
    state = _job_state(row, failed=failed)
    return JobRow(
        job_id=row.job_id,
        queue=row.queue,
        priority=row.priority,
        run_at=row.run_at,
        job_class=row.job_class,
        args=_args(row.args),
        error_count=row.error_count,
        last_error=row.last_error,
        state=state,
        locked_by=None if failed else row.locked_by,
        failed_at=row.failed_at if failed else None,
        reason=row.reason if failed else None,
        run_at_key=row.run_at_key,
        failed_at_key=row.failed_at_key if failed else None,
    )


def queue_counts(
    connection: Connection,
    *,
    count_limit: int,
    working: dict[str, int],
    max_queues: int = 1000,
) -> list[QueueCounts]:
    """Every queue with jobs waiting or failed, with its counts by state; ``working`` gives
    the locked jobs by queue (from the worker states)."""
    failed = {queue: int(n) for queue, n in connection.execute(FAILED_COUNTS)}
    counted = {
        row.queue: row
        for row in connection.execute(QUEUE_COUNTS, {"cap": count_limit, "max_queues": max_queues})
    }
    result = []
    for queue in sorted(set(counted) | set(failed) | set(working)):
        row = counted.get(queue)
        held = working.get(queue, 0)
        due, later, total = (row.due, row.later, row.total) if row is not None else (0, 0, 0)
        capped = int(total) >= count_limit
        if capped:  # the planner's estimates instead, from the column statistics
            total = max(int(total), _estimate(connection, ESTIMATE_QUEUE, queue))
            due = max(int(due), _estimate(connection, ESTIMATE_DUE, queue))
            later = max(0, total - due)
        result.append(
            QueueCounts(
                queue=queue,
                ready=max(0, int(due) - held),
                scheduled=int(later),
                working=held,
                failed=failed.get(queue, 0),
                total=int(total),
                capped=capped,
            )
        )
    return result


def _estimate(connection: Connection, statement: TextClause, queue: str) -> int:
    plan = connection.execute(statement, {"queue": queue}).scalar_one()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


def worker_states_near_the_front(
    connection: Connection, *, probe: int, max_queues: int = 1000
) -> list[Any]:
    """The locked jobs among the first ``probe`` jobs of each queue, as worker states."""
    from sqlalchemy_que import WorkerState

    params = {"probe": probe, "max_queues": max_queues}
    return [WorkerState(*row) for row in connection.execute(WORKER_STATES_NEAR_THE_FRONT, params)]


def table_estimate(connection: Connection) -> int:
    """The planner's estimate of the number of rows of que_jobs."""
    return int(connection.execute(TABLE_ESTIMATE).scalar_one())


def lock_count(connection: Connection) -> int:
    """How many job locks are held in this database."""
    return int(connection.execute(LOCK_COUNT).scalar_one())


def table_counters(connection: Connection) -> tuple[datetime.datetime, int, int] | None:
    """(now, rows inserted, rows deleted) of que_jobs since the statistics were reset."""
    row = connection.execute(TABLE_COUNTERS).first()
    return None if row is None else (row[0], int(row[1]), int(row[2]))


def job_page(
    connection: Connection,
    *,
    queue: str | None,
    job_class: str | None,
    state: str | None,
    after: tuple[str, ...] | None,
    page_size: int,
    window: int,
) -> JobPage:
    """The jobs of que_jobs after the key ``after`` (queue, priority, run_at, job_id as
    text), filtered, at most ``page_size``."""
    key = after or ((queue, *_FIRST_JOB_KEY[1:]) if queue is not None else _FIRST_JOB_KEY)
    params = {
        "queue": queue,
        "job_class": job_class,
        "state": state,
        "queue_after": key[0],
        "priority_after": key[1],
        "run_at_after": key[2],
        "job_id_after": key[3],
        "page_size": page_size,
        "window": window,
    }
    in_queue = queue is not None
    rows = list(connection.execute(JOB_PAGE_IN_QUEUE if in_queue else JOB_PAGE, params))
    end = JOB_WINDOW_END_IN_QUEUE if in_queue else JOB_WINDOW_END
    return _page(connection, end, params, rows, page_size, window, failed=False)


def failed_page(
    connection: Connection,
    *,
    queue: str | None,
    job_class: str | None,
    before: tuple[str, ...] | None,
    page_size: int,
    window: int,
) -> JobPage:
    """The failed jobs that failed before the key ``before`` (failed_at, job_id as text),
    most recent first, filtered, at most ``page_size``."""
    key = before or _FIRST_FAILED_KEY
    params = {
        "queue": queue,
        "job_class": job_class,
        "failed_at_before": key[0],
        "job_id_before": key[1],
        "page_size": page_size,
        "window": window,
    }
    rows = list(connection.execute(FAILED_PAGE, params))
    return _page(connection, FAILED_WINDOW_END, params, rows, page_size, window, failed=True)


def _page(
    connection: Connection,
    window_end: Any,
    params: dict[str, Any],
    rows: list[Any],
    page_size: int,
    window: int,
    *,
    failed: bool,
) -> JobPage:
    jobs = [_row(row, failed=failed) for row in rows]
    if len(jobs) > page_size:
        jobs = jobs[:page_size]
        last = jobs[-1]
        if failed:
            next_key: tuple[str, ...] = (str(last.failed_at_key), str(last.job_id))
        else:
            next_key = (last.queue, str(last.priority), last.run_at_key, str(last.job_id))
        return JobPage(jobs, next_key, exhausted=False)
    end = connection.execute(window_end, params).scalar()
    if end is not None:  # the window ran out before the page filled: go on after it
        return JobPage(jobs, tuple(end), exhausted=True)
    return JobPage(jobs, None, exhausted=False)


def find_job(
    connection: Connection,
    job_id: int,
    *,
    queue: str | None,
    priority: int | None,
    run_at: str | None = None,
) -> JobRow | None:
    """One job: in que_jobs by its key when queue and priority are given (by its whole key,
    then without run_at), else (or when it is not there) in que_failed_jobs by its id."""
    if queue is not None and priority is not None:
        params = {"queue": queue, "priority": priority, "job_id": job_id, "run_at": run_at}
        row = None
        if run_at is not None:
            row = connection.execute(JOB_BY_KEY, params).first()
        if row is None:
            row = connection.execute(JOB_BY_PRIORITY, params).first()
        if row is not None:
            return _row(row)
    row = connection.execute(FAILED_BY_ID, {"job_id": job_id}).first()
    return None if row is None else _row(row, failed=True)


def failed_ids(
    connection: Connection, *, queue: str | None, job_class: str | None, limit: int
) -> list[int]:
    """The ids of the failed jobs matching the filters, most recent first, at most ``limit``."""
    params = {"queue": queue, "job_class": job_class, "limit": limit}
    return [int(job_id) for job_id in connection.execute(FAILED_IDS, params).scalars()]
