"""Working jobs (contract sections 4 and 5): completion, failures and retries, the job's own
transaction, interruption, the worker loop and the pool's checks."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from sqlalchemy_que import (
    JobContext,
    JobRegistry,
    SchemaError,
    Worker,
    WorkerError,
    WorkerPool,
    job,
)
from sqlalchemy_que._worker import format_last_error

from .conftest import wait_for
from .helpers import add_job, future, held_job_locks, job_rows


def noop(job: JobContext, *args: Any) -> None:
    pass


def fail(job: JobContext, *args: Any) -> None:
    raise ValueError("boom")


def test_a_worked_job_is_deleted_and_unlocked(engine: Engine) -> None:
    seen: list[tuple[JobContext, tuple[Any, ...]]] = []

    def handler(job: JobContext, *args: Any) -> None:
        seen.append((job, args))
        assert held_job_locks(engine) == [job.job_id]  # exactly one lock while it runs

    job_id = add_job(engine, "Hello", 1, "two", {"three": [3]}, queue="q", priority=7)
    worker = Worker(engine, {"Hello": handler}, queue="q")
    assert worker.work_one() is True
    assert worker.work_one() is False
    ((context, args),) = seen
    assert args == (1, "two", {"three": [3]})
    assert (context.job_id, context.job_class, context.queue, context.priority) == (
        job_id,
        "Hello",
        "q",
        7,
    )
    assert (context.error_count, context.last_error, context.args) == (0, None, list(args))
    assert job_rows(engine) == []
    assert held_job_locks(engine) == []


def test_first_failure_counts_one_and_retries_in_about_four_seconds(engine: Engine) -> None:
    add_job(engine, "Fail", 1)
    assert Worker(engine, {"Fail": fail}).work_one()
    (row,) = job_rows(engine)
    assert row["error_count"] == 1
    assert 3.0 < row["run_in"] <= 4.0
    first_line, *frames = row["last_error"].split("\n")
    assert first_line == "ValueError: boom"
    assert frames[0].endswith(":in fail") and "test_worker.py" in frames[0]  # innermost first
    assert Worker(engine, {"Fail": fail}).work_one() is False  # not ready again yet


def test_a_job_failing_for_the_sixth_time_waits_1299_seconds(engine: Engine) -> None:
    job_id = add_job(engine, "Fail")
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE que_jobs SET error_count = 5 WHERE job_id = :id"), {"id": job_id}
        )
    assert Worker(engine, {"Fail": fail}).work_one()
    (row,) = job_rows(engine)
    assert row["error_count"] == 6
    assert 1298.0 < row["run_in"] <= 1299.0


@pytest.mark.parametrize(
    ("retry_delay", "expected"),
    [(30, 30.0), (0, 0.0), (lambda count: count * 100, 100.0), (2.5, 2.5)],
)
def test_a_custom_retry_delay_is_honoured(
    engine: Engine, retry_delay: Any, expected: float
) -> None:
    registry = JobRegistry()

    @registry.job("Custom", retry_delay=retry_delay)
    def custom(job: JobContext) -> None:
        raise RuntimeError("again")

    add_job(engine, "Custom")
    assert Worker(engine, registry).work_one()
    (row,) = job_rows(engine)
    assert row["error_count"] == 1
    assert expected - 1.0 < row["run_in"] <= expected


def test_an_unknown_job_class_is_kept_with_an_explanation(engine: Engine) -> None:
    add_job(engine, "Nobody::Knows", 1)
    assert Worker(engine, {"Known": noop}).work_one()
    (row,) = job_rows(engine)
    assert row["error_count"] == 1
    first_line = row["last_error"].split("\n")[0]
    assert first_line.startswith("sqlalchemy_que.UnknownJobClassError: ")
    assert "'Nobody::Knows'" in first_line and "Known" in first_line


def test_a_long_message_is_cut_to_500_characters_on_the_first_line(engine: Engine) -> None:
    def long_failure(job: JobContext) -> None:
        raise ValueError("x" * 2000)

    add_job(engine, "Long")
    assert Worker(engine, {"Long": long_failure}).work_one()
    first_line, *frames = job_rows(engine)[0]["last_error"].split("\n")
    assert first_line == ("ValueError: " + "x" * 2000)[:500]
    assert frames


def test_blank_message_gives_the_class_alone() -> None:
    class PaymentDeclined(Exception):
        pass

    try:
        raise PaymentDeclined()
    except PaymentDeclined as error:
        text_ = format_last_error(error)
    assert text_.split("\n")[0].endswith("PaymentDeclined")
    assert ":" not in text_.split("\n")[0].rsplit(".", 1)[-1]


def test_an_error_in_the_error_reporter_does_not_break_the_worker(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    reported: list[tuple[BaseException, int]] = []

    def reporter(error: BaseException, job: JobContext) -> None:
        reported.append((error, job.job_id))
        raise RuntimeError("reporter down")

    first = add_job(engine, "Fail")
    add_job(engine, "Ok")
    worker = Worker(engine, {"Fail": fail, "Ok": noop}, on_error=reporter)
    with caplog.at_level(logging.ERROR, logger="sqlalchemy_que.worker"):
        assert worker.run(burst=True) == 2
    assert [(type(error), job_id) for error, job_id in reported] == [(ValueError, first)]
    assert any("error reporter raised" in record.getMessage() for record in caplog.records)
    assert [row["job_class"] for row in job_rows(engine)] == ["Fail"]


def test_a_job_the_handler_deleted_itself_is_not_an_error(engine: Engine) -> None:
    def delete_myself(job: JobContext) -> None:
        job.connection.execute(text("DELETE FROM que_jobs WHERE job_id = :id"), {"id": job.job_id})

    add_job(engine, "SelfDelete")
    assert Worker(engine, {"SelfDelete": delete_myself}).work_one()
    assert job_rows(engine) == []


@pytest.fixture
def ledger(engine: Engine) -> Engine:
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS test_ledger"))
        connection.execute(text("CREATE TABLE test_ledger (note text)"))
    return engine


def ledger_notes(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT note FROM test_ledger")).scalars())


def test_the_handlers_work_commits_with_the_jobs_completion(ledger: Engine) -> None:
    def write(job: JobContext, note: str) -> None:
        job.session.execute(text("INSERT INTO test_ledger VALUES (:n)"), {"n": note})
        job.session.commit()  # only flushes: the worker owns the transaction
        job.connection.execute(text("INSERT INTO test_ledger VALUES (:n)"), {"n": note + "!"})

    add_job(ledger, "Write", "paid")
    assert Worker(ledger, {"Write": write}).work_one()
    assert sorted(ledger_notes(ledger)) == ["paid", "paid!"]
    assert job_rows(ledger) == []


def test_the_handlers_work_is_rolled_back_when_it_fails(ledger: Engine) -> None:
    def write_then_fail(job: JobContext, note: str) -> None:
        job.session.execute(text("INSERT INTO test_ledger VALUES (:n)"), {"n": note})
        job.session.commit()
        raise RuntimeError("after writing")

    add_job(ledger, "Write", "paid")
    assert Worker(ledger, {"Write": write_then_fail}).work_one()
    assert ledger_notes(ledger) == []
    assert job_rows(ledger)[0]["error_count"] == 1


def test_pending_orm_changes_are_flushed_before_completion(ledger: Engine) -> None:
    def pending(job: JobContext) -> None:
        job.session.execute(text("INSERT INTO test_ledger VALUES ('pending')"))

    add_job(ledger, "Pending")
    assert Worker(ledger, {"Pending": pending}).work_one()
    assert ledger_notes(ledger) == ["pending"]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_releases_the_job_untouched_and_stops_the_worker(
    ledger: Engine, interrupt: type[BaseException]
) -> None:
    def interrupted(job: JobContext) -> None:
        job.session.execute(text("INSERT INTO test_ledger VALUES ('half done')"))
        raise interrupt()

    def stored() -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k != "run_in"} for row in job_rows(ledger)]

    job_id = add_job(ledger, "Interrupted")
    before = stored()
    worker = Worker(ledger, {"Interrupted": interrupted})
    with pytest.raises(interrupt):
        worker.run()
    assert stored() == before  # row intact: no error counted, same run_at
    assert held_job_locks(ledger) == []
    assert ledger_notes(ledger) == []
    assert before[0]["job_id"] == job_id


def test_typed_definitions_work_with_keyword_bound_arguments(engine: Engine) -> None:
    calls: list[tuple[int, str]] = []

    @job("Greet", queue="greetings")
    def greet(job: JobContext, user_id: int, greeting: str = "hello") -> None:
        calls.append((user_id, greeting))

    with engine.begin() as connection:
        greet.insert(connection, 5, greeting="hi")
        greet.insert(connection, 6)
    assert Worker(engine, [greet], queue="greetings").run(burst=True) == 2
    assert calls == [(5, "hi"), (6, "hello")]


def test_a_worker_drains_its_queue_then_sleeps_and_a_failure_does_not_stop_it(
    engine: Engine,
) -> None:
    done: list[int] = []
    for index in range(5):
        add_job(engine, "Fail" if index == 1 else "Ok", index)
    worker = Worker(engine, {"Ok": lambda job, i: done.append(i), "Fail": fail}, wake_interval=60)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: len(done) == 4, message="the four good jobs")
        wait_for(lambda: worker.current_job is None, message="the worker to go idle")
        assert thread.is_alive()
        assert [row["job_class"] for row in job_rows(engine)] == ["Fail"]
        new = add_job(engine, "Ok", 99)
        worker.wake()
        wait_for(lambda: 99 in done, message="the woken worker to work the new job")
        assert new not in [row["job_id"] for row in job_rows(engine)]
    finally:
        worker.stop()
        thread.join(5)
    assert not thread.is_alive()
    assert sorted(done) == [0, 2, 3, 4, 99]


def test_stop_while_working_finishes_the_current_job_first(engine: Engine) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(job: JobContext) -> None:
        started.set()
        assert release.wait(10)

    add_job(engine, "Slow")
    add_job(engine, "Slow")
    worker = Worker(engine, {"Slow": slow}, wake_interval=60)
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert started.wait(10)
    worker.stop()
    release.set()
    thread.join(10)
    assert not thread.is_alive()
    assert len(job_rows(engine)) == 1  # the current job completed, the next never started


def test_stop_while_sleeping_returns_promptly(engine: Engine) -> None:
    worker = Worker(engine, {}, wake_interval=300)
    thread = threading.Thread(target=worker.run)
    thread.start()
    wait_for(lambda: worker.sleeping, message="the worker to go to sleep")
    worker.stop()
    # Far below the 300 s wake interval; generous for a loaded machine.
    thread.join(10)
    assert not thread.is_alive()


def test_burst_mode_works_until_no_job_is_ready(engine: Engine) -> None:
    for index in range(7):
        add_job(engine, "Ok", index)
    add_job(engine, "Ok", "later", run_at=future(60))
    assert Worker(engine, {"Ok": noop}).run(burst=True) == 7
    assert len(job_rows(engine)) == 1


def test_one_record_is_logged_per_job_with_structured_fields(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = add_job(engine, "Ok", queue="logs")
    with caplog.at_level(logging.INFO, logger="sqlalchemy_que.worker"):
        Worker(engine, {"Ok": noop}, queue="logs").work_one()
    (record,) = [r for r in caplog.records if getattr(r, "job_id", None) == job_id]
    assert record.levelno == logging.INFO
    assert (record.job_class, record.queue, record.outcome) == ("Ok", "logs", "done")  # type: ignore[attr-defined]
    assert record.elapsed >= 0  # type: ignore[attr-defined]


def test_a_pool_refuses_an_engine_too_small_for_its_workers(database_url: str) -> None:
    small = create_engine(database_url, pool_size=2, max_overflow=1)
    try:
        with pytest.raises(WorkerError, match=r"at most 3 connections.*4 workers.*pool_size=4"):
            WorkerPool(small, {}, workers=4).start()
    finally:
        small.dispose()


def test_a_pool_refuses_a_database_without_the_table(empty_database_url: str) -> None:
    empty = create_engine(empty_database_url)
    try:
        with pytest.raises(SchemaError, match="sqlalchemy-que migrate"):
            WorkerPool(empty, {}, workers=1).start()
    finally:
        empty.dispose()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 0}, "workers must be a whole number >= 1, got 0"),
        ({"wake_interval": 0}, "wake_interval must be a positive number of seconds, got 0"),
        ({"wake_interval": "5"}, "wake_interval must be a positive number of seconds, got '5'"),
        ({"queue": 3}, "queue must be a str, got 3"),
    ],
)
def test_bad_worker_options_are_refused(engine: Engine, options: Any, message: str) -> None:
    with pytest.raises(WorkerError, match=message):
        WorkerPool(engine, {}, **options)


def test_a_pool_works_a_queue_with_several_workers(engine: Engine) -> None:
    done: list[int] = []
    lock = threading.Lock()

    def record(job: JobContext, index: int) -> None:
        with lock:
            done.append(index)

    for index in range(40):
        add_job(engine, "Record", index)
    with WorkerPool(engine, {"Record": record}, workers=3, wake_interval=60) as pool:
        wait_for(lambda: len(done) == 40, message="all 40 jobs")
        assert pool.is_alive()
    assert not pool.is_alive()
    assert sorted(done) == list(range(40))


def test_a_handlers_session_rollback_undoes_only_its_own_writes(ledger: Engine) -> None:
    def change_of_mind(job: JobContext) -> None:
        job.session.execute(text("INSERT INTO test_ledger VALUES ('kept')"))
        job.session.commit()
        job.session.execute(text("INSERT INTO test_ledger VALUES ('undone')"))
        job.session.rollback()
        job.session.execute(text("INSERT INTO test_ledger VALUES ('after')"))

    add_job(ledger, "ChangeOfMind")
    assert Worker(ledger, {"ChangeOfMind": change_of_mind}).work_one()
    assert sorted(ledger_notes(ledger)) == ["after", "kept"]
    assert job_rows(ledger) == []


def test_a_failure_at_commit_fails_the_job_and_keeps_nothing(ledger: Engine) -> None:
    with ledger.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS test_child, test_parent"))
        connection.execute(text("CREATE TABLE test_parent (id int PRIMARY KEY)"))
        connection.execute(
            text(
                "CREATE TABLE test_child (parent int REFERENCES test_parent "
                "DEFERRABLE INITIALLY DEFERRED)"
            )
        )

    def orphan(job: JobContext) -> None:
        # Accepted now, refused by the deferred foreign key only at COMMIT.
        job.session.execute(text("INSERT INTO test_child VALUES (42)"))
        job.session.execute(text("INSERT INTO test_ledger VALUES ('written')"))

    add_job(ledger, "Orphan")
    try:
        assert Worker(ledger, {"Orphan": orphan}).work_one()
        (row,) = job_rows(ledger)
        assert row["error_count"] == 1
        assert "ForeignKeyViolation" in row["last_error"].split("\n")[0]
        assert ledger_notes(ledger) == []
        assert held_job_locks(ledger) == []
    finally:
        with ledger.begin() as connection:
            connection.execute(text("DROP TABLE test_child, test_parent"))


@pytest.mark.parametrize(
    ("message", "stored"),
    [
        ("bad \x00 byte", "ValueError: bad \\x00 byte"),
        ("bad \udcff byte", "ValueError: bad \\udcff byte"),
    ],
)
def test_an_error_message_postgresql_cannot_store_is_escaped(
    engine: Engine, message: str, stored: str
) -> None:
    def unstorable(job: JobContext) -> None:
        raise ValueError(message)

    add_job(engine, "Unstorable")
    assert Worker(engine, {"Unstorable": unstorable}).work_one()
    (row,) = job_rows(engine)
    assert row["error_count"] == 1
    assert row["last_error"].split("\n")[0] == stored
    assert row["run_in"] > 3  # rescheduled: not ready again at once


def test_a_huge_retry_delay_is_capped_not_failed(engine: Engine) -> None:
    registry = JobRegistry()

    @registry.job("Forever", retry_delay=1e16)
    def forever(job: JobContext) -> None:
        raise RuntimeError("later")

    add_job(engine, "Forever")
    assert Worker(engine, registry).work_one()
    (row,) = job_rows(engine)
    assert row["error_count"] == 1
    assert 99 * 365 * 24 * 3600 < row["run_in"] <= 100 * 366 * 24 * 3600


def test_the_job_transaction_survives_an_idle_in_transaction_timeout(
    engine: Engine, database_url: str
) -> None:
    # The server ends sessions idle in a transaction for 300 ms; the handler takes longer.
    timing_out = create_engine(
        database_url, connect_args={"options": "-c idle_in_transaction_session_timeout=300"}
    )
    calls: list[int] = []

    def slow(job: JobContext) -> None:
        job.connection.execute(text("SELECT 1"))  # the job's transaction is open from here
        calls.append(job.job_id)
        # Not synchronisation: the condition under test, idle in the open transaction for
        # longer than the server allows (load only makes it longer).
        time.sleep(0.8)
        job.connection.execute(text("SELECT 1"))

    try:
        add_job(engine, "Slow")
        assert Worker(timing_out, {"Slow": slow}).work_one()
        assert job_rows(engine) == []
        assert len(calls) == 1
    finally:
        timing_out.dispose()


def test_the_job_transaction_has_the_engines_isolation_level(
    engine: Engine, database_url: str
) -> None:
    serializable = create_engine(database_url, isolation_level="SERIALIZABLE")
    seen: list[str] = []

    def look(job: JobContext) -> None:
        seen.append(job.connection.execute(text("SHOW transaction_isolation")).scalar_one())

    try:
        add_job(engine, "Look")
        assert Worker(serializable, {"Look": look}).work_one()
        assert seen == ["serializable"]
        assert job_rows(engine) == []
    finally:
        serializable.dispose()


def test_an_idle_worker_gives_its_connection_back_for_reuse_not_discarded(
    database_url: str, engine: Engine
) -> None:
    """Going to sleep returns the connection to the pool clean: the next look (and the
    application's next checkout) gets the same session, not a new one opened at a cost."""
    one = create_engine(database_url, pool_size=1, max_overflow=0)
    pids: list[int] = []

    def record(job: JobContext) -> None:
        pids.append(job.connection.execute(text("SELECT pg_backend_pid()")).scalar_one())

    try:
        worker = Worker(one, {"Pid": record})
        for _ in range(2):
            add_job(engine, "Pid")
            assert worker.run(burst=True) == 1
        with one.connect() as connection:
            pids.append(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
            driver = connection.connection.driver_connection
            assert driver is not None and driver.autocommit is False
    finally:
        one.dispose()
    assert len(pids) == 3 and len(set(pids)) == 1, pids
