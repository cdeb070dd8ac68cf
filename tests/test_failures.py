"""Attempts, failed jobs, crashes, FailJob/RetryJob, timeouts and cancelling, on a real server."""

from __future__ import annotations

import datetime
import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from sqlalchemy_que import (
    FailJob,
    InvalidJobError,
    JobContext,
    JobRegistry,
    RetryJob,
    Worker,
    WorkerError,
    WorkerPool,
    admin,
    insert_job,
    locked_job,
)
from sqlalchemy_que._worker import DEFAULT_MAX_ATTEMPTS

from .conftest import wait_for
from .crash_worker import CREATE_RUNS, DROP_RUNS, READ_RUNS
from .helpers import add_job, job_rows

REPO = Path(__file__).resolve().parent.parent

FAILED_ROWS = text(
    "SELECT priority, run_at, job_id, job_class, args::text AS args, error_count, last_error, "
    "queue, failed_at, reason FROM que_failed_jobs ORDER BY job_id"
)


def failed_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(FAILED_ROWS)]


def marks(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT job_id FROM que_job_runs")).scalars())


def work_until_idle(worker: Worker, limit: int = 50) -> int:
    """Work ready jobs one at a time until none is ready; return how many were worked."""
    worked = 0
    while worker.work_one():
        worked += 1
        assert worked < limit, "the worker kept finding jobs"
    return worked


# -- attempts and the failed table --------------------------------------------------------


def test_a_permanently_failing_job_is_failed_after_exactly_max_attempts(engine: Engine) -> None:
    runs: list[tuple[int, int | None]] = []
    registry = JobRegistry()

    @registry.job("Broken", max_attempts=3, retry_delay=0)
    def broken(job: JobContext, n: int) -> None:
        runs.append((job.attempt, job.attempts_remaining))
        raise TypeError(f"cannot handle {n}")

    job_id = add_job(engine, "Broken", 7)
    worker = Worker(engine, registry)
    assert work_until_idle(worker) == 3
    assert runs == [(1, 2), (2, 1), (3, 0)]
    assert job_rows(engine) == []
    [failed] = failed_rows(engine)
    assert failed["job_id"] == job_id
    assert failed["args"] == "[7]"
    assert failed["error_count"] == 3
    assert failed["reason"] == "error"
    assert failed["last_error"].startswith("TypeError: cannot handle 7\n")
    assert marks(engine) == []
    assert worker.failed == 3


def test_the_default_max_attempts_applies_to_unknown_job_classes(engine: Engine) -> None:
    job_id = add_job(engine, "Nobody::Knows")
    worker = Worker(engine, {}, max_attempts=2)
    assert worker.work_one()
    [row] = job_rows(engine)
    assert row["error_count"] == 1
    with engine.begin() as connection:  # due again now, for the last attempt
        connection.execute(text("UPDATE que_jobs SET run_at = now()"))
    assert worker.work_one()
    [failed] = failed_rows(engine)
    assert (failed["job_id"], failed["error_count"]) == (job_id, 2)
    assert failed["last_error"].startswith("sqlalchemy_que.UnknownJobClassError:")
    assert DEFAULT_MAX_ATTEMPTS == 16


def test_a_job_failed_by_a_ruby_worker_beyond_max_attempts_fails_at_its_next_failure(
    engine: Engine,
) -> None:
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO que_jobs (job_class, error_count) VALUES ('Boom', 30)")
        )

    def boom(job: JobContext) -> None:
        raise ValueError("still broken")

    assert Worker(engine, {"Boom": boom}, max_attempts=5).work_one()
    [failed] = failed_rows(engine)
    assert failed["error_count"] == 31


def test_bad_max_attempts_and_timeouts_are_refused_naming_the_value(engine: Engine) -> None:
    with pytest.raises(WorkerError, match="max_attempts must be a whole number >= 1, got 0"):
        Worker(engine, {}, max_attempts=0)
    with pytest.raises(WorkerError, match="timeout must be a positive number of seconds, got -1"):
        Worker(engine, {}, timeout=-1)
    registry = JobRegistry()
    with pytest.raises(InvalidJobError, match=r"max_attempts .* got 'x'"):
        registry.job("A", max_attempts="x")(lambda job: None)  # type: ignore[arg-type]
    with pytest.raises(InvalidJobError, match=r"RetryJob.* got -2"):
        RetryJob(in_=-2)


# -- handlers decide ----------------------------------------------------------------------


def test_fail_job_fails_at_once_and_rolls_back_the_handlers_writes(engine: Engine) -> None:
    registry = JobRegistry()

    @registry.job("Give::Up", max_attempts=10)
    def give_up(job: JobContext) -> None:
        job.connection.execute(text("INSERT INTO que_jobs (job_class) VALUES ('Side::Effect')"))
        raise FailJob("user 42 does not exist")

    job_id = add_job(engine, "Give::Up")
    assert Worker(engine, registry).work_one()
    assert job_rows(engine) == []  # the handler's insert was rolled back with it
    [failed] = failed_rows(engine)
    assert (failed["job_id"], failed["reason"], failed["error_count"]) == (job_id, "failed", 1)
    assert failed["last_error"].startswith("sqlalchemy_que.FailJob: user 42 does not exist")


def test_retry_job_retries_at_the_handlers_time_and_counts_an_attempt(engine: Engine) -> None:
    registry = JobRegistry()
    seen: list[int | None] = []

    @registry.job("Later", max_attempts=2)
    def later(job: JobContext) -> None:
        seen.append(job.attempts_remaining)
        raise RetryJob("rate limited", in_=datetime.timedelta(minutes=10))

    add_job(engine, "Later")
    worker = Worker(engine, registry)
    assert worker.work_one()
    [row] = job_rows(engine)
    assert row["error_count"] == 1
    assert 590 < row["run_in"] <= 600
    assert row["last_error"].startswith("sqlalchemy_que.RetryJob: rate limited")
    with engine.begin() as connection:
        connection.execute(text("UPDATE que_jobs SET run_at = now()"))
    assert worker.work_one()  # its last attempt: RetryJob now fails it
    assert job_rows(engine) == []
    assert [row["error_count"] for row in failed_rows(engine)] == [2]
    assert seen == [1, 0]


# -- crashes ------------------------------------------------------------------------------


def test_a_job_that_kills_its_process_is_failed_after_max_attempts_with_growing_delays(
    engine: Engine, database_url: str
) -> None:
    with engine.begin() as connection:
        connection.execute(DROP_RUNS)
        connection.execute(CREATE_RUNS)
    try:
        job_id = add_job(engine, "Crash", queue="crash")
        deadline = time.monotonic() + 60
        processes = 0
        while not failed_rows(engine):
            assert time.monotonic() < deadline, "the crashing job was never failed"
            wait_for(
                lambda: failed_rows(engine) or _ready(engine, "crash"),
                timeout=30,
                message="the crashed job to be due again",
            )
            if failed_rows(engine):
                break
            subprocess.run(
                [sys.executable, "-m", "tests.crash_worker", database_url],
                cwd=REPO,
                timeout=60,
                check=False,
            )
            processes += 1
        with engine.connect() as connection:
            runs = list(connection.execute(READ_RUNS).scalars())
        assert len(runs) == 3  # exactly max_attempts runs of the handler
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(runs)]
        assert gaps[0] >= 1.5 and gaps[1] >= 6.0 and gaps[1] > gaps[0]
        [failed] = failed_rows(engine)
        assert (failed["job_id"], failed["reason"], failed["error_count"]) == (job_id, "crash", 3)
        assert failed["last_error"].startswith("sqlalchemy_que.JobCrashedError: job ")
        assert job_rows(engine) == [] and marks(engine) == []
    finally:
        with engine.begin() as connection:
            connection.execute(DROP_RUNS)


def _ready(engine: Engine, queue: str) -> bool:
    with engine.connect() as connection:
        return bool(
            connection.execute(
                text("SELECT EXISTS (SELECT FROM que_jobs WHERE queue = :q AND run_at <= now())"),
                {"q": queue},
            ).scalar_one()
        )


def test_jobs_released_unstarted_leave_no_mark_and_are_not_counted_as_crashes(
    engine: Engine,
) -> None:
    done: list[int] = []

    def quick(job: JobContext) -> None:
        done.append(job.job_id)
        worker.stop()  # the rest of the batch is released untouched

    with engine.begin() as connection:
        for _ in range(5):
            insert_job(connection, "Quick")
    worker = Worker(engine, {"Quick": quick}, batch_size=5)
    worker._ramp = 5  # take the whole batch at once
    worker.run()
    assert len(done) == 1
    assert marks(engine) == []
    rows = job_rows(engine)
    assert len(rows) == 4 and all(row["error_count"] == 0 for row in rows)


# -- timeouts -----------------------------------------------------------------------------


def test_a_job_that_overruns_its_timeout_is_recorded_as_a_timeout(engine: Engine) -> None:
    registry = JobRegistry()
    seen: list[tuple[bool, bool]] = []

    @registry.job("Slow", timeout=0.05)
    def slow(job: JobContext) -> None:
        left = job.time_left()
        # At most the timeout (on a loaded machine it may be spent already: only the upper
        # bound is certain).
        seen.append((job.deadline is not None, left is not None and left <= 0.05))
        while (job.time_left() or 0) > -0.01:
            time.sleep(0.005)  # the work that takes too long

    add_job(engine, "Slow")
    assert Worker(engine, registry).work_one()
    [row] = job_rows(engine)
    assert row["error_count"] == 1
    assert row["last_error"].startswith("sqlalchemy_que.JobTimeoutError: job ")
    assert seen == [(True, True)]


def test_the_timeout_cancels_the_jobs_statements(engine: Engine) -> None:
    def sleepy(job: JobContext) -> None:
        job.connection.execute(text("SELECT pg_sleep(30)"))

    add_job(engine, "Sleepy")
    started = time.monotonic()
    assert Worker(engine, {"Sleepy": sleepy}, timeout=0.3).work_one()
    # Generous on purpose: without the timeout the statement sleeps 30 s.
    assert time.monotonic() - started < 20
    [row] = job_rows(engine)
    assert row["last_error"].startswith("sqlalchemy_que.JobTimeoutError: job ")
    assert "QueryCanceled" in row["last_error"].split("\n", 1)[0]


def test_without_a_timeout_a_job_has_no_deadline(engine: Engine) -> None:
    seen: list[object] = []

    def plain(job: JobContext) -> None:
        seen.extend([job.deadline, job.time_left()])
        job.connection.execute(text("SELECT 1"))

    add_job(engine, "Plain")
    assert Worker(engine, {"Plain": plain}).work_one()
    assert seen == [None, None]
    assert job_rows(engine) == []


# -- cancelling ---------------------------------------------------------------------------


def test_cancelling_a_running_job_reaches_its_handler_and_fails_it_as_cancelled(
    engine: Engine,
) -> None:
    started = threading.Event()
    saw_cancel: list[bool] = []

    def long_job(job: JobContext) -> None:
        started.set()
        deadline = time.monotonic() + 20
        while not job.cancel_requested and time.monotonic() < deadline:
            job._cancel.wait(0.05)
        saw_cancel.append(job.cancel_requested)

    job_id = add_job(engine, "Long")
    with WorkerPool(engine, {"Long": long_job}, workers=1, wake_interval=0.05) as pool:
        assert pool.listener is not None
        wait_for(pool.listener.connected.is_set, message="the listener to connect")
        assert started.wait(10)
        assert admin.cancel(engine, job_id) == "requested"
        wait_for(lambda: failed_rows(engine), message="the cancelled job to be failed")
    assert saw_cancel == [True]
    [failed] = failed_rows(engine)
    assert (failed["job_id"], failed["reason"]) == (job_id, "cancelled")
    assert failed["last_error"].startswith("sqlalchemy_que.JobCancelledError:")


def test_cancelling_a_waiting_job_fails_it_at_once(engine: Engine) -> None:
    job_id = add_job(engine, "Waiting")
    assert admin.cancel(engine, job_id) == "cancelled"
    assert job_rows(engine) == []
    assert [row["reason"] for row in failed_rows(engine)] == ["cancelled"]
    assert admin.cancel(engine, job_id) == "missing"


# -- operations ---------------------------------------------------------------------------


def test_operations_never_touch_a_job_a_worker_holds(engine: Engine) -> None:
    held = add_job(engine, "Held", queue="q")
    other = add_job(engine, "Other", queue="q")
    with locked_job(engine, queue="q") as lock:
        assert lock is not None and lock.job.job_id == held
        for operation in (admin.retry, admin.delete):
            outcome = operation(engine, [held, other, 999_999])
            assert list(outcome.locked) == [held]
            assert outcome.locked[held] is not None  # the holder's backend pid
            assert outcome.missing == [999_999]
        cleared = admin.clear(engine, queue="q")
        assert (cleared.deleted, cleared.locked) == (0, 1)  # `other` went with delete
        assert admin.cancel(engine, held) == "requested"
        [info] = admin.list_jobs(engine)
        assert (info.job_id, info.state) == (held, "working")
        assert [job["job_id"] for job in job_rows(engine)] == [held]
        lock.complete()


def test_list_show_retry_delete_and_purge(engine: Engine) -> None:
    def boom(job: JobContext, *args: Any) -> None:
        raise FailJob("bad input")

    failed_id = add_job(engine, "Boom", 1, queue="a")
    Worker(engine, {"Boom": boom}, queue="a").work_one()
    waiting = add_job(engine, "Mail", "x@y", queue="b")
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE que_jobs SET error_count = 2, last_error = 'E: no\nframe', "
                "run_at = now() + interval '1 hour' WHERE job_id = :id"
            ),
            {"id": waiting},
        )
    assert [i.job_id for i in admin.list_jobs(engine)] == [waiting]
    assert [i.job_id for i in admin.list_jobs(engine, errored=True, queue="b")] == [waiting]
    assert admin.list_jobs(engine, job_class="Nope") == []
    [scheduled] = admin.list_jobs(engine, scheduled=True)
    assert (scheduled.state, scheduled.first_error_line) == ("retrying", "E: no")
    [failed] = admin.list_jobs(engine, failed=True)
    assert (failed.job_id, failed.state, failed.reason) == (failed_id, "failed", "failed")
    info = admin.get_job(engine, waiting)
    assert info is not None and info.args == ["x@y"] and info.last_error == "E: no\nframe"
    assert admin.get_job(engine, 123_456_789) is None
    with pytest.raises(InvalidJobError, match="a job id must be a positive whole number, got -1"):
        admin.delete(engine, [-1])

    outcome = admin.retry(engine, [waiting, failed_id])
    assert outcome.done == [waiting, failed_id] and not outcome.locked and not outcome.missing
    by_id = {row["job_id"]: row for row in job_rows(engine)}
    assert by_id[waiting]["error_count"] == 2 and by_id[waiting]["run_in"] <= 0
    assert by_id[failed_id]["error_count"] == 0 and by_id[failed_id]["args"] == "[1]"
    assert failed_rows(engine) == []

    assert admin.delete(engine, [waiting]).done == [waiting]
    assert admin.counts(engine).ready == 1
    assert admin.clear(engine, job_class="Boom").deleted == 1

    add_job(engine, "Boom", queue="a")
    Worker(engine, {"Boom": boom}, queue="a").work_one()
    assert admin.counts(engine).failed == 1
    assert admin.purge_failed(engine, older_than=3600) == 0
    assert admin.purge_failed(engine, older_than=0) == 1
    with pytest.raises(InvalidJobError, match=r"older_than .* got -5"):
        admin.purge_failed(engine, older_than=-5)


# Que 0.14.3's lock_job, check_job and destroy_job statements, as a Ruby worker sends them.
RUBY_LOCK_JOB = text(
    """
WITH RECURSIVE job AS (
  SELECT (j).*, pg_try_advisory_lock((j).job_id) AS locked
  FROM (
    SELECT j FROM que_jobs AS j
    WHERE queue = CAST(:queue AS text) AND run_at <= now()
    ORDER BY priority, run_at, job_id LIMIT 1
  ) AS t1
  UNION ALL (
    SELECT (j).*, pg_try_advisory_lock((j).job_id) AS locked
    FROM (
      SELECT (
        SELECT j FROM que_jobs AS j
        WHERE queue = CAST(:queue AS text) AND run_at <= now()
          AND (priority, run_at, job_id) > (job.priority, job.run_at, job.job_id)
        ORDER BY priority, run_at, job_id LIMIT 1
      ) AS j
      FROM job WHERE NOT job.locked LIMIT 1
    ) AS t1
  )
)
SELECT queue, priority, run_at, job_id, job_class, args, error_count
FROM job WHERE locked LIMIT 1
"""
)
RUBY_CHECK_JOB = text(
    "SELECT 1 AS one FROM que_jobs WHERE queue = :queue AND priority = :priority "
    "AND run_at = :run_at AND job_id = :job_id"
)
RUBY_DESTROY_JOB = text(
    "DELETE FROM que_jobs WHERE queue = :queue AND priority = :priority "
    "AND run_at = :run_at AND job_id = :job_id"
)


def test_a_retried_failed_job_goes_back_to_que_jobs_as_a_row_ruby_works(engine: Engine) -> None:
    with engine.begin() as connection:
        job_id = connection.execute(
            text(
                "INSERT INTO que_jobs (queue, priority, run_at, job_class, args) VALUES "
                "(CAST(coalesce(:queue, '') AS text), CAST(coalesce(:priority, 100) AS smallint),"
                " CAST(coalesce(:run_at, now()) AS timestamptz), CAST(:job_class AS text), "
                "CAST(coalesce(:args, '[]') AS json)) RETURNING job_id"
            ),
            {
                "queue": None,
                "priority": 5,
                "run_at": None,
                "job_class": "Ruby::Job",
                "args": '[1,{"a":"b"}]',
            },
        ).scalar_one()

    def refuse(job: JobContext, *args: Any) -> None:
        raise FailJob("not in Python")

    Worker(engine, {"Ruby::Job": refuse}).work_one()
    assert [row["job_id"] for row in failed_rows(engine)] == [job_id]
    assert admin.retry(engine, [job_id]).done == [job_id]
    [row] = job_rows(engine)
    assert (row["priority"], row["job_class"], row["args"], row["queue"]) == (
        5,
        "Ruby::Job",
        '[1,{"a":"b"}]',
        "",
    )
    assert row["error_count"] == 0
    # A Ruby worker's pass: lock, check, destroy, unlock, on one session.
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        locked = connection.execute(RUBY_LOCK_JOB, {"queue": ""}).one()
        assert (locked.job_id, locked.job_class, locked.args) == (
            job_id,
            "Ruby::Job",
            [1, {"a": "b"}],
        )
        key = {
            "queue": locked.queue,
            "priority": locked.priority,
            "run_at": locked.run_at,
            "job_id": locked.job_id,
        }
        assert connection.execute(RUBY_CHECK_JOB, key).scalar_one() == 1
        assert connection.execute(RUBY_DESTROY_JOB, key).rowcount == 1
        assert connection.execute(
            text("SELECT pg_advisory_unlock(:id)"), {"id": job_id}
        ).scalar_one()
        connection.commit()
    assert job_rows(engine) == []


def test_a_job_released_unstarted_keeps_the_mark_of_an_earlier_crash(engine: Engine) -> None:
    ran: list[str] = []

    def first(job: JobContext) -> None:
        ran.append("First")
        worker.stop()  # the second job of the batch is released without being started

    def second(job: JobContext) -> None:
        ran.append("Second")

    add_job(engine, "First", priority=1)
    crashed = add_job(engine, "Second", priority=2)
    with engine.begin() as connection:  # a run of it whose process died
        connection.execute(
            text("INSERT INTO que_job_runs (job_id, pid) VALUES (:id, 0)"), {"id": crashed}
        )
    handlers = {"First": first, "Second": second}
    worker = Worker(engine, handlers, batch_size=2)
    worker._ramp = 2
    worker.run()
    assert ran == ["First"]
    assert marks(engine) == [crashed]  # still to be counted
    assert Worker(engine, handlers).work_one()
    assert ran == ["First"]  # counted as a crash, not run
    [row] = job_rows(engine)
    assert row["error_count"] == 1
    assert row["last_error"].startswith(f"sqlalchemy_que.JobCrashedError: job {crashed} Second")
    assert marks(engine) == []
