"""Jobs run in the test's own transaction (``sqlalchemy_que.testing.drain``), the
``enqueued``/``assert_enqueued`` assertions, and handlers called without the queue
(``job_context``, ``call_handler``)."""

from __future__ import annotations

import datetime

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from sqlalchemy_que import (
    JobContext,
    JobRegistry,
    QueError,
    UnknownJobClassError,
    enqueue,
    insert_job,
)
from sqlalchemy_que.testing import (
    EnqueuedAssertionError,
    assert_enqueued,
    call_handler,
    drain,
    enqueued,
    job_context,
)

from .conftest import advisory_lock_count
from .helpers import add_job, job_rows

jobs = JobRegistry()


@jobs.job("Record")
def record(job: JobContext, note: str) -> None:
    job.connection.execute(text("INSERT INTO effects (note) VALUES (:note)"), {"note": note})


@jobs.job("RecordThenFail", retry_delay=30)
def record_then_fail(job: JobContext, note: str) -> None:
    record(job, note)
    raise ValueError(f"boom {note}")


@jobs.job("Chain")
def chain(job: JobContext, left: int) -> None:
    record(job, f"chain {left}")
    if left:
        insert_job(job.connection, "Chain", left - 1)


@jobs.job("Forever")
def forever(job: JobContext) -> None:
    insert_job(job.connection, "Forever")


@jobs.job("Committer")
def committer(job: JobContext) -> None:
    job.connection.commit()


@pytest.fixture
def test_tx(connection: Connection) -> Connection:
    """The suite's rolled-back connection, with a table the handlers write to (created in
    the same transaction, so it goes with the rollback too)."""
    connection.execute(text("CREATE TABLE effects (id serial PRIMARY KEY, note text)"))
    return connection


def notes(connection: Connection) -> list[str]:
    return list(connection.execute(text("SELECT note FROM effects ORDER BY id")).scalars())


def test_a_drain_inside_a_rolled_back_transaction_leaves_nothing_behind(engine: Engine) -> None:
    with engine.connect() as connection:
        outer = connection.begin()
        connection.execute(text("CREATE TABLE effects (id serial PRIMARY KEY, note text)"))
        insert_job(connection, "Record", "a")
        insert_job(connection, "Record", "b", priority=1)
        report = drain(connection, jobs)
        assert [job.args for job in report.completed] == [["b"], ["a"]]  # priority order
        assert notes(connection) == ["b", "a"]
        assert enqueued(connection) == []
        assert outer.is_active  # never committed
        outer.rollback()
        # The session-level job locks would outlive the rollback: none is left.
        assert advisory_lock_count(engine) == 0
    assert job_rows(engine) == []
    with engine.connect() as connection:
        assert connection.execute(text("SELECT to_regclass('effects')")).scalar() is None


def test_a_failing_jobs_writes_are_rolled_back_and_its_error_reported(
    test_tx: Connection,
) -> None:
    failing = insert_job(test_tx, "RecordThenFail", "x")
    insert_job(test_tx, "Record", "after", priority=200)
    report = drain(test_tx, jobs, raise_errors=False)
    assert [failure.job.job_id for failure in report.failed] == [failing]
    failure = report.failed[0]
    assert isinstance(failure.error, ValueError)
    assert failure.last_error.startswith("ValueError: boom x\n")
    assert [job.args for job in report.completed] == [["after"]]
    assert notes(test_tx) == ["after"]  # the failed job's insert went with its savepoint
    (row,) = enqueued(test_tx)
    assert (row.job_id, row.error_count) == (failing, 1)
    assert row.last_error is not None and row.last_error.startswith("ValueError: boom x")
    # Rescheduled by the job's retry delay (30 s) from the drain's time.
    seconds = test_tx.execute(
        text("SELECT extract(epoch FROM run_at - now()) FROM que_jobs")
    ).scalar_one()
    assert 29 < seconds < 31
    assert "1 completed, 1 failed" in str(report)
    with pytest.raises(ValueError, match="boom x"):
        report.raise_first()


def test_the_first_error_is_raised_by_default_after_its_job_was_rescheduled(
    test_tx: Connection,
) -> None:
    insert_job(test_tx, "RecordThenFail", "x")
    later = insert_job(test_tx, "Record", "later", priority=200)
    with pytest.raises(ValueError, match="boom x"):
        drain(test_tx, jobs)
    assert notes(test_tx) == []
    assert [(job.job_class, job.error_count) for job in enqueued(test_tx)] == [
        ("RecordThenFail", 1),
        ("Record", 0),
    ]
    assert enqueued(test_tx)[1].job_id == later  # not run: the drain stopped at the error


def test_an_unknown_job_class_fails_like_in_a_worker(test_tx: Connection) -> None:
    insert_job(test_tx, "Nobody")
    with pytest.raises(UnknownJobClassError, match="'Nobody'"):
        drain(test_tx, jobs)
    assert enqueued(test_tx)[0].error_count == 1


def test_jobs_that_handlers_enqueue_are_drained_too(test_tx: Connection) -> None:
    insert_job(test_tx, "Chain", 2)
    report = drain(test_tx, jobs)
    assert notes(test_tx) == ["chain 2", "chain 1", "chain 0"]
    assert report.worked == 3
    assert not report.limit_reached


def test_max_jobs_bounds_a_job_that_enqueues_itself(test_tx: Connection) -> None:
    insert_job(test_tx, "Forever")
    report = drain(test_tx, jobs, max_jobs=5)
    assert report.worked == 5
    assert report.limit_reached
    assert [job.job_class for job in enqueued(test_tx)] == ["Forever"]


def test_scheduled_jobs_run_when_now_is_given(test_tx: Connection) -> None:
    insert_job(test_tx, "Record", "in an hour", run_in=datetime.timedelta(hours=1))
    insert_job(test_tx, "Record", "tomorrow", run_in=datetime.timedelta(days=1))
    assert drain(test_tx, jobs).worked == 0
    assert drain(test_tx, jobs, now=datetime.timedelta(hours=2)).worked == 1
    assert notes(test_tx) == ["in an hour"]
    tomorrow = test_tx.execute(text("SELECT now() + interval '25 hours'")).scalar_one()
    assert drain(test_tx, jobs, now=tomorrow).worked == 1
    assert notes(test_tx) == ["in an hour", "tomorrow"]


def test_a_queue_or_queues_restrict_the_drain(test_tx: Connection) -> None:
    insert_job(test_tx, "Record", "default")
    insert_job(test_tx, "Record", "mail", queue="mail")
    insert_job(test_tx, "Record", "sms", queue="sms")
    drain(test_tx, jobs, queue="mail")
    assert notes(test_tx) == ["mail"]
    drain(test_tx, jobs, queues=["sms", ""])
    assert sorted(notes(test_tx)) == ["default", "mail", "sms"]


def test_a_handler_cannot_commit_the_tests_transaction(test_tx: Connection) -> None:
    insert_job(test_tx, "Record", "before")
    drain(test_tx, jobs)
    insert_job(test_tx, "Committer")
    with pytest.raises(QueError, match="may not commit"):
        drain(test_tx, jobs)
    assert test_tx.in_transaction()
    assert notes(test_tx) == ["before"]  # still the test's transaction, uncommitted


def test_a_session_is_flushed_and_drained_on_its_connection(
    test_tx: Connection, session: Session
) -> None:
    session.add(enqueue("Record", "from the session"))  # pending, not flushed
    report = drain(session, jobs)
    assert report.worked == 1
    assert notes(test_tx) == ["from the session"]


def test_a_job_locked_elsewhere_is_left_alone(engine: Engine) -> None:
    job_id = add_job(engine, "Record", "committed")
    with engine.connect() as holder, engine.connect() as connection:
        holder.execute(text("SELECT pg_advisory_lock(:id)"), {"id": job_id})
        with connection.begin():
            connection.execute(text("CREATE TEMP TABLE effects (id serial, note text)"))
            assert drain(connection, jobs).worked == 0
            assert [job.job_id for job in enqueued(connection)] == [job_id]
            connection.rollback()
        holder.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": job_id})
        holder.commit()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"now": datetime.datetime(2030, 1, 1)}, "timezone-aware"),
        ({"now": "tomorrow"}, "'tomorrow'"),
        ({"max_jobs": 0}, "max_jobs must be a whole number >= 1, got 0"),
        ({"queue": "a", "queues": ["b"]}, "not both"),
        ({"queues": "mail"}, "'mail'"),
        ({"queue": 3}, "got 3"),
    ],
)
def test_bad_arguments_are_refused_before_any_job_runs(
    test_tx: Connection, options: dict[str, object], message: str
) -> None:
    insert_job(test_tx, "Record", "x")
    with pytest.raises(QueError, match=message):
        drain(test_tx, jobs, **options)  # type: ignore[arg-type]
    assert notes(test_tx) == []


def test_enqueued_decodes_and_filters(connection: Connection) -> None:
    insert_job(connection, record, "a", queue="mail")
    insert_job(connection, "Other", {"k": [1, 2]}, priority=5)
    assert [(job.job_class, job.args) for job in enqueued(connection)] == [
        ("Other", [{"k": [1, 2]}]),
        ("Record", ["a"]),
    ]
    assert [job.args for job in enqueued(connection, record)] == [["a"]]
    assert [job.args for job in enqueued(connection, queue="")] == [[{"k": [1, 2]}]]


def test_assert_enqueued_returns_the_matches_and_says_what_was_there_instead(
    connection: Connection,
) -> None:
    insert_job(connection, "SendEmail", 41, queue="mail")
    insert_job(connection, "SendEmail", 42, queue="mail")
    (job,) = assert_enqueued(connection, "SendEmail", args=[42], queue="mail")
    assert job.args == [42]
    assert len(assert_enqueued(connection, "SendEmail", count=2)) == 2
    assert_enqueued(connection, "Other", count=0)
    with pytest.raises(EnqueuedAssertionError) as caught:
        assert_enqueued(connection, "SendEmail", args=[43], queue="mail")
    message = str(caught.value)
    assert message.startswith(
        "expected at least one job with job_class='SendEmail', args=[43], queue='mail', "
        "found 0; enqueued:\n"
    )
    assert "SendEmail args=[41] queue='mail' priority=100" in message
    assert "SendEmail args=[42] queue='mail'" in message
    with pytest.raises(AssertionError, match="expected 1 job"):
        assert_enqueued(connection, "SendEmail", count=1)


def test_assert_enqueued_on_an_empty_table_says_so(connection: Connection) -> None:
    with pytest.raises(AssertionError, match=r"\(no jobs at all\)"):
        assert_enqueued(connection, record)


def test_a_handler_called_with_a_job_context(test_tx: Connection) -> None:
    context = job_context(record, ["direct"], connection=test_tx, job_id=7)
    assert (context.job_id, context.job_class, context.queue, context.priority) == (
        7,
        "Record",
        "",
        100,
    )
    record(context, "direct")
    assert notes(test_tx) == ["direct"]
    with pytest.raises(QueError, match="without a connection"):
        record(job_context(record, ["x"]), "x")


def test_call_handler_binds_arguments_and_keeps_session_writes(test_tx: Connection) -> None:
    @JobRegistry().job("ViaSession", queue="mail", priority=3)
    def via_session(job: JobContext, note: str, suffix: str = "!") -> str:
        job.session.execute(text("INSERT INTO effects (note) VALUES (:n)"), {"n": note + suffix})
        return f"{job.queue}/{job.priority}"

    assert call_handler(via_session, "hi", suffix="?", connection=test_tx) == "mail/3"
    assert notes(test_tx) == ["hi?"]


def test_an_interrupted_job_is_left_as_it_was_and_unlocked(test_tx: Connection) -> None:
    @JobRegistry().job("Interrupted")
    def interrupted(job: JobContext) -> None:
        record(job, "half-way")
        raise KeyboardInterrupt

    insert_job(test_tx, "Interrupted")
    with pytest.raises(KeyboardInterrupt):
        drain(test_tx, [interrupted])
    assert notes(test_tx) == []
    (job,) = enqueued(test_tx)
    assert job.error_count == 0
    held = test_tx.execute(
        text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
    ).scalar_one()
    assert held == 0
