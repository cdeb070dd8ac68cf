"""The rewritten worker core (issue 9) against a real server: the defects it had to fix, lazy
job transactions, batched completion, several queues per pool, and the batch size.

Each test checks the server's own view (``pg_locks``, ``pg_stat_activity``, the rows) rather
than the library's bookkeeping, and waits on conditions, never on time.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import DBAPIError

from sqlalchemy_que import (
    JobContext,
    QueError,
    Worker,
    WorkerError,
    WorkerPool,
    enqueue,
    insert_job,
    insert_jobs,
    job,
    job_stats,
    locked_job,
    worker_states,
)
from sqlalchemy_que._notify import channel_for

from .conftest import wait_for
from .helpers import add_job, held_job_locks, job_rows, notifications, past

OWN_ADVISORY_LOCKS = text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
)

#: Two-int advisory locks (``pg_advisory_lock(a, b)``) anywhere in the test database.
TWO_INT_LOCKS = text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND database = "
    "(SELECT oid FROM pg_database WHERE datname = current_database())"
)

#: True when this session holds the one-bigint (job) lock of ``:key``.
HOLDS_JOB_LOCK = text(
    "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
    "AND pid = pg_backend_pid() AND (classid::bigint << 32) + objid::bigint = :key"
)

IDLE = psycopg.pq.TransactionStatus.IDLE
INERROR = psycopg.pq.TransactionStatus.INERROR


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def make_engine(database_url: str) -> Iterator[Callable[..., Engine]]:
    """Engines of the test database with options of the test's choosing, disposed after it."""
    made: list[Engine] = []

    def make(**options: Any) -> Engine:
        made.append(create_engine(database_url, **options))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


@pytest.fixture
def scratch(engine: Engine) -> Iterator[str]:
    """A table for handlers to write to; its values are unique, checked only at COMMIT."""
    name = f"que_core_{uuid.uuid4().hex[:10]}"
    with engine.begin() as connection:
        connection.execute(
            text(
                f"CREATE TABLE {name} (value text NOT NULL, "
                f"CONSTRAINT {name}_once UNIQUE (value) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    yield name
    with engine.begin() as connection:
        connection.execute(text(f"DROP TABLE IF EXISTS {name}"))


def values_in(engine: Engine, table: str) -> list[str]:
    with engine.connect() as connection:
        return sorted(connection.execute(text(f"SELECT value FROM {table}")).scalars())


def write(connection: Connection, table: str, value: str) -> None:
    connection.execute(text(f"INSERT INTO {table} (value) VALUES (:value)"), {"value": value})


def stored(engine: Engine) -> list[dict[str, Any]]:
    """The rows of ``que_jobs`` as stored (without the ``run_in`` that moves with the clock)."""
    return [{k: v for k, v in row.items() if k != "run_in"} for row in job_rows(engine)]


def driver(connection: Connection) -> psycopg.Connection[Any]:
    raw = connection.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    return raw


def settings(connection: Connection) -> tuple[object, ...]:
    raw = driver(connection)
    return (raw.autocommit, raw.isolation_level, raw.read_only, raw.deferrable)


def run_in_thread(worker: Worker, *, burst: bool = False) -> threading.Thread:
    thread = threading.Thread(
        target=worker.run, kwargs={"burst": burst}, name=worker.name, daemon=True
    )
    thread.start()
    return thread


def terminate(engine: Engine, pid: int) -> None:
    with engine.connect() as admin:
        assert admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()


class Boom(Exception):
    """The caller's own failure."""


# -- defect 1: hand locking cannot leak a lock into the pool --------------------------------


@pytest.mark.parametrize(
    "ending",
    [
        "aborted",  # a failing statement, caught: the block then ends normally
        "aborted_then_raises",
        "raises",
        "raises_untouched",  # raises without ever using the connection
        "complete_after_abort",  # complete() on the aborted transaction
        "commit_refused",  # lock.connection.commit()
        "session_killed",  # the server ends the session under the block
    ],
)
def test_a_hand_locked_job_leaves_no_lock_on_the_pooled_connection(
    engine: Engine, make_engine: Callable[..., Engine], ending: str
) -> None:
    job_id = add_job(engine, "Hand", 1)
    before = stored(engine)
    one = make_engine(pool_size=1, max_overflow=0)
    with one.connect() as first:
        expected = settings(first)
    escaped: list[type[BaseException]] = []
    try:
        with locked_job(one) as lock:
            assert lock is not None and lock.job.job_id == job_id
            if ending != "raises_untouched":
                pid = lock.connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
                assert lock.connection.execute(OWN_ADVISORY_LOCKS).scalar_one() == 1
            if ending in ("aborted", "aborted_then_raises", "complete_after_abort"):
                with pytest.raises(DBAPIError):
                    lock.connection.execute(text("SELECT 1/0"))
                assert driver(lock.connection).info.transaction_status == INERROR
            if ending in ("aborted_then_raises", "raises", "raises_untouched"):
                raise Boom("the caller's own failure")
            if ending == "complete_after_abort":
                lock.complete()
            if ending == "commit_refused":
                lock.connection.commit()
            if ending == "session_killed":
                terminate(engine, pid)
                wait_for(lambda: held_job_locks(engine) == [], message="the killed lock to go")
    except Exception as error:
        escaped.append(type(error))
    if ending in ("aborted_then_raises", "raises", "raises_untouched"):
        assert escaped == [Boom]
    elif ending in ("commit_refused", "session_killed"):
        assert len(escaped) == 1 and issubclass(escaped[0], QueError), escaped
    elif ending == "complete_after_abort":  # which error: see the test after this one
        assert len(escaped) == 1, escaped
    else:
        assert escaped == []
    with one.connect() as fresh:  # the one connection the engine may hand out
        assert driver(fresh).info.transaction_status == IDLE
        assert settings(fresh) == expected
        assert fresh.execute(OWN_ADVISORY_LOCKS).scalar_one() == 0
    assert held_job_locks(engine) == []
    assert stored(engine) == before


def test_completing_a_hand_locked_job_on_an_aborted_transaction_says_why(
    engine: Engine, make_engine: Callable[..., Engine]
) -> None:
    add_job(engine, "Hand")
    one = make_engine(pool_size=1, max_overflow=0)
    with locked_job(one) as lock:
        assert lock is not None
        with contextlib.suppress(DBAPIError):
            lock.connection.execute(text("SELECT 1/0"))
        with pytest.raises(QueError, match="aborted"):
            lock.complete()
    assert job_rows(engine)[0]["error_count"] == 0
    assert held_job_locks(engine) == []


def test_a_handler_that_leaves_its_transaction_aborted_fails_its_job_once(
    engine: Engine, make_engine: Callable[..., Engine]
) -> None:
    job_id = add_job(engine, "Swallows")
    calls: list[int] = []

    def swallows(job: JobContext) -> None:
        calls.append(job.job_id)
        with contextlib.suppress(DBAPIError):
            job.connection.execute(text("SELECT 1/0"))

    worker = Worker(
        make_engine(pool_size=1, max_overflow=0),
        {"Swallows": swallows},
        wake_interval=0.01,
        name="que-worker-swallows",
    )
    thread = run_in_thread(worker, burst=True)
    thread.join(5)  # a fixed worker ends this burst in milliseconds
    if thread.is_alive():
        worker.stop()
        thread.join(40)
        pytest.fail(f"the burst never ended: the handler ran {len(calls)} times")
    assert calls == [job_id]
    (row,) = job_rows(engine)
    assert row["error_count"] == 1
    assert "aborted" in row["last_error"].split("\n")[0]


# -- defect 2: a job is never written by a session that lost its lock ----------------------


@pytest.mark.parametrize(
    ("after_kill", "isolation_level"),
    [
        ("raises", None),  # the handler raises without touching the database again
        ("statements", None),  # its own statements on the dead connection, then it raises
        pytest.param("rollback_then_statements", None),
        pytest.param("rollback_then_statements", "AUTOCOMMIT"),
    ],
)
def test_a_job_is_never_written_by_a_session_that_lost_its_lock(
    engine: Engine,
    make_engine: Callable[..., Engine],
    scratch: str,
    after_kill: str,
    isolation_level: str | None,
) -> None:
    job_id = add_job(engine, "Lost", run_at=past(5))
    before = stored(engine)
    options: dict[str, Any] = {"isolation_level": isolation_level} if isolation_level else {}
    worker_engine = make_engine(pool_size=2, pool_pre_ping=True, **options)
    started, terminated, reported = threading.Event(), threading.Event(), threading.Event()
    outcomes: list[str] = []
    after: list[int] = []

    def attempt(action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as error:
            outcomes.append(type(error).__name__)
        else:
            outcomes.append("ran")

    def lost(job: JobContext) -> None:
        if after_kill != "raises":
            write(job.connection, scratch, "before the kill")  # the job's transaction is open
        started.set()
        if not terminated.wait(10):
            raise TimeoutError("the test did not terminate the backend")
        if after_kill != "raises":
            unlocked_write = text(
                "UPDATE que_jobs SET last_error = 'written without the lock' WHERE job_id = :id"
            )
            attempt(lambda: job.connection.execute(unlocked_write, {"id": job.job_id}))
            if after_kill == "rollback_then_statements":
                attempt(job.connection.rollback)
            attempt(lambda: job.connection.execute(unlocked_write, {"id": job.job_id}))
            attempt(lambda: write(job.connection, scratch, "after the kill"))
        raise RuntimeError("the handler fails after its session was killed")

    worker = Worker(
        worker_engine,
        {"Lost": lost, "After": lambda job: after.append(job.job_id)},
        wake_interval=0.05,
        name="que-worker-lost",
        on_error=lambda _error, _job: reported.set(),
    )
    thread = run_in_thread(worker)
    try:
        assert started.wait(10)
        (state,) = worker_states(engine)
        assert state.job_id == job_id
        terminate(engine, state.pg_backend_pid)
        wait_for(lambda: held_job_locks(engine) == [], message="the killed session's lock to go")
        with locked_job(engine) as taken:  # another worker takes the now unlocked job
            assert taken is not None and taken.job.job_id == job_id
            terminated.set()
            assert reported.wait(10), "the first worker did not finish failing the job"
            assert stored(engine) == before, "a session without the job's lock wrote its row"
            assert "ran" not in outcomes, outcomes
            expected_attempts = {"raises": 0, "statements": 3, "rollback_then_statements": 4}
            assert len(outcomes) == expected_attempts[after_kill], outcomes
            assert taken.complete(), "the other worker's completion matched nothing"
        second = add_job(engine, "After")
        wait_for(lambda: after == [second], message="the worker to work the next job")
        assert thread.is_alive()
    finally:
        terminated.set()
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert job_rows(engine) == []
    assert values_in(engine, scratch) == []


# -- defect 3: the engine's connection settings survive the worker ------------------------


@pytest.mark.parametrize(
    ("isolation_level", "autocommits", "job_isolation"),
    [("AUTOCOMMIT", True, "read committed"), ("REPEATABLE READ", False, "repeatable read")],
)
def test_the_engines_connection_settings_survive_the_worker(
    engine: Engine,
    make_engine: Callable[..., Engine],
    scratch: str,
    isolation_level: str,
    autocommits: bool,
    job_isolation: str,
) -> None:
    configured = make_engine(isolation_level=isolation_level, pool_size=1, max_overflow=0)
    with configured.connect() as connection:
        expected = settings(connection)
    assert expected[0] is autocommits
    seen: list[tuple[int, str]] = []

    def writes(job: JobContext, value: str) -> None:
        write(job.connection, scratch, value)
        seen.append(
            (
                job.connection.execute(text("SELECT pg_backend_pid()")).scalar_one(),
                job.connection.execute(text("SHOW transaction_isolation")).scalar_one(),
            )
        )

    def fails(job: JobContext, value: str) -> None:
        write(job.connection, scratch, value)
        raise Boom("after writing")

    add_job(engine, "Noop")
    add_job(engine, "Writes", "written")
    add_job(engine, "Fails", "rolled back")
    handlers = {"Noop": lambda job: None, "Writes": writes, "Fails": fails}
    assert Worker(configured, handlers).run(burst=True) == 3
    ((worker_pid, isolation),) = seen
    assert isolation == job_isolation
    # Even on an AUTOCOMMIT engine a job's writes are one transaction with its completion.
    assert values_in(engine, scratch) == ["written"]
    assert [row["job_class"] for row in job_rows(engine)] == ["Fails"]
    with configured.connect() as connection:
        # The very connection the worker used, given back (not discarded) and as it came.
        assert connection.execute(text("SELECT pg_backend_pid()")).scalar_one() == worker_pid
        assert settings(connection) == expected
        write(connection, scratch, "outside")  # never committed by this code
    visible = "outside" in values_in(engine, scratch)
    assert visible is autocommits, "the pooled connection stopped behaving as configured"
    assert held_job_locks(engine) == []


@pytest.mark.parametrize("jobs", [[], ["Noop"], ["Noop", "Touches"]])
def test_a_worker_gives_a_clean_connection_back_to_the_pool(
    engine: Engine, make_engine: Callable[..., Engine], jobs: list[str]
) -> None:
    one = make_engine(pool_size=1, max_overflow=0)
    with one.connect() as connection:
        pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    for job_class in jobs:
        add_job(engine, job_class)
    handlers = {"Noop": lambda job: None, "Touches": lambda job: job.connection}
    assert Worker(one, handlers).run(burst=True) == len(jobs)
    with locked_job(one) as lock:
        assert lock is None
    with one.connect() as connection:
        assert connection.execute(text("SELECT pg_backend_pid()")).scalar_one() == pid


# -- defect 4: advisory locks a handler takes do not outlive its job ----------------------


def _lock(connection: Connection, key: int, *, two_int: bool) -> None:
    if two_int:
        connection.execute(text("SELECT pg_advisory_lock(7, :key)"), {"key": key})
    else:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})


@pytest.mark.parametrize(
    ("taker_ends", "completion", "two_int", "through_session"),
    [
        ("completes", "job", False, False),
        ("completes", "job", False, True),
        ("completes", "job", True, False),
        ("completes", "batch", False, False),
        pytest.param("fails", "job", False, False),
        pytest.param("fails", "job", True, False),
    ],
)
def test_an_advisory_lock_a_handler_takes_does_not_outlive_its_job(
    engine: Engine,
    make_engine: Callable[..., Engine],
    taker_ends: str,
    completion: Any,
    two_int: bool,
    through_session: bool,
) -> None:
    """The taker locks the victim's job id (or a two-int key) on its own session; while the
    observer runs next, only the observer's job may be locked, and the victim is worked."""
    victim = add_job(engine, "Victim", priority=3)
    observer = add_job(engine, "Observer", priority=2)
    add_job(engine, "Taker", priority=1)
    observed: list[tuple[list[int], int, int]] = []
    victims: list[int] = []

    @job("Taker", retry_delay=3600)
    def taker(job: JobContext) -> None:
        _lock(
            job.session.connection() if through_session else job.connection, victim, two_int=two_int
        )
        if taker_ends == "fails":
            raise Boom("after taking a lock")

    def observe(job: JobContext) -> None:
        working = sum(s.count_working for s in job_stats(engine) if s.job_class == "Victim")
        with engine.connect() as connection:
            two_ints = int(connection.execute(TWO_INT_LOCKS).scalar_one())
        observed.append((held_job_locks(engine), working, two_ints))

    handlers = [
        taker,
        job("Observer")(observe),
        job("Victim")(lambda job: victims.append(job.job_id)),
    ]
    pool_engine = make_engine(pool_size=1, max_overflow=0)
    pool = WorkerPool(
        pool_engine, handlers, workers=1, batch_size=1, completion=completion, listen=False
    )
    pool.start(burst=True)
    assert pool.join(30)
    assert observed == [([observer], 0, 0)], "the taker's lock outlived its job"
    assert victims == [victim], "the victim was not worked by the same pool"
    assert [row["job_class"] for row in job_rows(engine)] == (
        ["Taker"] if taker_ends == "fails" else []
    )
    assert held_job_locks(engine) == []


def test_a_handler_lock_on_a_job_of_its_own_batch_does_not_outlive_that_job(
    engine: Engine, make_engine: Callable[..., Engine]
) -> None:
    """Batches (with the worker's ramp): [first], [taker, victim], [observer]. The victim
    fails (its row stays, parked): it must not then show as working."""
    add_job(engine, "First", priority=0)
    add_job(engine, "Taker", priority=1)
    victim = add_job(engine, "Victim", priority=2)
    observer = add_job(engine, "Observer", priority=3)
    in_batch: list[bool] = []
    observed: list[tuple[list[int], int]] = []

    def taker(job: JobContext) -> None:
        in_batch.append(bool(job.connection.execute(HOLDS_JOB_LOCK, {"key": victim}).scalar()))
        _lock(job.connection, victim, two_int=False)

    @job("Victim", retry_delay=3600)
    def failing_victim(job: JobContext) -> None:
        raise Boom("parked")

    def observe(job: JobContext) -> None:
        working = sum(s.count_working for s in job_stats(engine) if s.job_class == "Victim")
        observed.append((held_job_locks(engine), working))

    handlers = [
        job("First")(lambda job: None),
        job("Taker")(taker),
        failing_victim,
        job("Observer")(observe),
    ]
    worker = Worker(make_engine(pool_size=1, max_overflow=0), handlers, batch_size=4)
    assert worker.run(burst=True) == 4
    assert in_batch == [True], "precondition: the victim was locked in the taker's batch"
    assert observed == [([observer], 0)], "the victim shows as working after it failed"
    assert held_job_locks(engine) == []


# -- defect 5: an exception that cannot be turned into text -------------------------------


class StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class NothingWorks(StrRaises):
    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


class StrNotText(Exception):
    def __str__(self) -> str:
        return 42  # type: ignore[return-value]


@pytest.mark.parametrize("error_class", [StrRaises, NothingWorks, StrNotText])
def test_an_exception_whose_str_raises_is_recorded_once_not_rerun(
    engine: Engine,
    make_engine: Callable[..., Engine],
    error_class: type[Exception],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="sqlalchemy_que.worker")
    job_id = add_job(engine, "Bad")
    calls: list[int] = []
    reported: list[type[BaseException]] = []

    def bad(job: JobContext) -> None:
        calls.append(job.job_id)
        raise error_class()

    worker = Worker(
        make_engine(pool_size=1, max_overflow=0),
        {"Bad": bad},
        wake_interval=0.01,
        name="que-worker-unprintable",
        on_error=lambda error, _job: reported.append(type(error)),
    )
    thread = run_in_thread(worker, burst=True)
    thread.join(15)
    if thread.is_alive():  # a loop: stop it before failing
        worker.stop()
        thread.join(10)
        pytest.fail(f"the burst never ended: the handler ran {len(calls)} times")
    assert calls == [job_id]
    assert reported == [error_class]
    (row,) = job_rows(engine)
    assert row["error_count"] == 1
    assert error_class.__qualname__ in row["last_error"].split("\n")[0]
    assert row["run_in"] > 1, "the failed job was not rescheduled"
    assert any(str(job_id) in record.getMessage() for record in caplog.records)


# -- defect 6: wake-ups ----------------------------------------------------------------------


def libpq_url(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


@pytest.mark.parametrize("autocommit_at", ["engine", "connection"])
def test_every_enqueue_on_an_autocommit_connection_notifies(
    engine: Engine, make_engine: Callable[..., Engine], database_url: str, autocommit_at: str
) -> None:
    listener = psycopg.connect(libpq_url(database_url), autocommit=True)
    try:
        listener.execute(f'LISTEN "{channel_for("")}"')
        if autocommit_at == "engine":
            source = make_engine(isolation_level="AUTOCOMMIT", pool_size=1)
        else:
            source = engine.execution_options(isolation_level="AUTOCOMMIT")
        with source.connect() as connection:
            assert driver(connection).autocommit
            for index in range(3):
                insert_job(connection, "Note", index)
        # One per enqueue, each its own transaction, and nothing more.
        payloads = notifications(listener, channel_for(""))
        assert payloads == ['{"queue": "", "run_at": null}'] * 3
    finally:
        listener.close()
    assert len(job_rows(engine)) == 3


def test_a_job_committed_before_the_listener_listens_starts_at_once(
    engine: Engine, make_engine: Callable[..., Engine]
) -> None:
    """The listener's connection is held back (in a connect event) until the worker sleeps
    and the job is committed, whose NOTIFY then reaches nobody; the LISTEN itself must wake
    the pool, or the job waits out the 60 s wake interval."""
    gated = make_engine(pool_size=1, max_overflow=0)
    listener_connecting, go = threading.Event(), threading.Event()

    @event.listens_for(gated, "connect")
    def hold_the_listener(dbapi_connection: Any, record: Any) -> None:
        if threading.current_thread().name.startswith("que-listener-"):
            listener_connecting.set()
            go.wait(10)

    started = threading.Event()
    pool = WorkerPool(gated, {"Prompt": lambda job: started.set()}, workers=1, wake_interval=60)
    try:
        pool.start()
        assert pool.listener is not None
        assert listener_connecting.wait(10)
        wait_for(lambda: pool.workers[0].sleeping, message="the worker to look and sleep")
        add_job(engine, "Prompt")
        assert not pool.listener.connected.is_set()
        go.set()
        assert started.wait(5), "the job waited for the next poll"
    finally:
        go.set()
        assert pool.shutdown(timeout=10) == []
    wait_for(lambda: not job_rows(engine), message="the job to be completed")


# -- lazy job transactions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("touch", "state"),
    [
        ("nothing", "idle"),
        ("connection", "idle in transaction"),  # asking for it is enough
        ("statement", "idle in transaction"),
        ("session", "idle in transaction"),
    ],
)
def test_a_job_transaction_opens_only_when_the_handler_uses_the_database(
    engine: Engine, make_engine: Callable[..., Engine], touch: str, state: str
) -> None:
    running, finish = threading.Event(), threading.Event()

    def handler(job: JobContext) -> None:
        if touch == "connection":
            assert job.connection is not None
        elif touch == "statement":
            job.connection.execute(text("SELECT 1"))
        elif touch == "session":
            job.session.execute(text("SELECT 1"))
        running.set()
        if not finish.wait(10):
            raise TimeoutError("the test did not let the job finish")

    job_id = add_job(engine, "Lazy")
    worker = Worker(
        make_engine(pool_size=1, max_overflow=0),
        {"Lazy": handler},
        wake_interval=0.05,
        name="que-worker-lazy",
    )
    thread = run_in_thread(worker, burst=True)
    try:
        assert running.wait(10)
        (seen,) = worker_states(engine)
        assert seen.job_id == job_id
        assert seen.pg_state == state
        if state == "idle":
            assert seen.pg_transaction_started_at is None
        else:
            assert seen.pg_transaction_started_at is not None
    finally:
        finish.set()
        thread.join(10)
    assert not thread.is_alive()
    assert job_rows(engine) == []


@pytest.mark.parametrize("method", ["commit", "rollback"])
def test_commit_and_rollback_on_job_connection_are_refused(
    engine: Engine, scratch: str, method: str
) -> None:
    def handler(job: JobContext) -> None:
        write(job.connection, scratch, "half done")
        getattr(job.connection, method)()
        write(job.connection, scratch, "after the refusal")

    add_job(engine, "Refused")
    assert Worker(engine, {"Refused": handler}).work_one()
    (row,) = job_rows(engine)
    assert row["error_count"] == 1
    first_line = row["last_error"].split("\n")[0]
    assert first_line.startswith("sqlalchemy_que.LockError: ") and f"{method}()" in first_line
    assert values_in(engine, scratch) == []
    assert held_job_locks(engine) == []


def test_a_caught_refusal_does_not_break_the_next_job(engine: Engine, scratch: str) -> None:
    def stubborn(job: JobContext) -> None:
        write(job.connection, scratch, "before")
        with contextlib.suppress(QueError):
            job.connection.rollback()
        write(job.connection, scratch, "after")

    def next_one(job: JobContext) -> None:
        write(job.connection, scratch, "next")

    add_job(engine, "Stubborn", priority=1)
    add_job(engine, "Next", priority=2)
    worker = Worker(engine, {"Stubborn": stubborn, "Next": next_one}, batch_size=2)
    assert worker.run(burst=True) == 2
    assert job_rows(engine) == []
    assert values_in(engine, scratch) == ["after", "before", "next"]


# -- batched completion ----------------------------------------------------------------------


def test_batched_completion_drains_every_job_exactly_once(
    engine: Engine, make_engine: Callable[..., Engine]
) -> None:
    with engine.begin() as connection:
        insert_jobs(connection, [enqueue("Noop", index) for index in range(500)])
    calls: list[int] = []
    pool = WorkerPool(
        make_engine(pool_size=2, max_overflow=0),
        {"Noop": lambda job, index: calls.append(index)},
        workers=2,
        completion="batch",
        batch_size=50,
    )
    pool.start(burst=True)
    assert pool.join(60)
    assert sorted(calls) == list(range(500)), [
        index for index, count in collections.Counter(calls).items() if count > 1
    ]
    assert job_rows(engine) == []
    assert held_job_locks(engine) == []


def test_batched_completion_keeps_a_writers_write_with_its_own_completion(
    engine: Engine, make_engine: Callable[..., Engine], scratch: str
) -> None:
    with engine.begin() as connection:
        write(connection, scratch, "taken")  # the deferred unique check fails at COMMIT
    calls: list[str] = []

    def noop(job: JobContext, name: str) -> None:
        calls.append(name)

    def writer(job: JobContext, name: str, value: str, fails: bool) -> None:
        calls.append(name)
        write(job.session.connection(), scratch, value)
        if fails:
            raise Boom("after writing")

    jobs: list[tuple[str, list[Any]]] = [
        ("Noop", ["noop-1"]),
        ("Writer", ["ok", "written", False]),
        ("Noop", ["noop-2"]),
        ("Writer", ["raises", "raised", True]),
        ("Noop", ["noop-3"]),
        ("Writer", ["commit-fails", "taken", False]),
        ("Noop", ["noop-4"]),
        ("Noop", ["noop-5"]),
    ]
    with engine.begin() as connection:
        for priority, (job_class, args) in enumerate(jobs, start=1):
            insert_job(connection, job_class, *args, priority=priority)
    worker = Worker(
        make_engine(pool_size=1, max_overflow=0),
        {"Noop": noop, "Writer": writer},
        completion="batch",
        batch_size=50,
    )
    assert worker.run(burst=True) == 8
    assert sorted(calls) == sorted(
        ["noop-1", "ok", "noop-2", "raises", "noop-3", "commit-fails", "noop-4", "noop-5"]
    )
    assert values_in(engine, scratch) == ["taken", "written"]
    failed = {json.loads(row["args"])[0]: row for row in job_rows(engine)}
    assert set(failed) == {"raises", "commit-fails"}
    assert all(row["error_count"] == 1 for row in failed.values())
    assert "UniqueViolation" in failed["commit-fails"]["last_error"].split("\n")[0]
    assert held_job_locks(engine) == []


# -- several queues --------------------------------------------------------------------------


def test_a_pool_works_its_queues_in_the_order_given(
    engine: Engine, make_engine: Callable[..., Engine]
) -> None:
    # The low queue's jobs are older and more urgent by priority: the queue order wins.
    for index in range(4):
        add_job(engine, "Record", f"low-{index}", queue="low", priority=1)
    for index in range(4):
        add_job(engine, "Record", f"high-{index}", queue="high", priority=200)
    order: list[str] = []
    pool = WorkerPool(
        make_engine(pool_size=1, max_overflow=0),
        {"Record": lambda job, name: order.append(name)},
        queues=["high", "low"],
        workers=1,
        batch_size=1,
    )
    assert pool.queues == ("high", "low")
    assert [worker.queues for worker in pool.workers] == [("high", "low")]
    pool.start(burst=True)
    assert pool.join(30)
    assert order == [f"high-{index}" for index in range(4)] + [f"low-{index}" for index in range(4)]
    assert job_rows(engine) == []


def test_a_mapping_of_queues_gives_each_queue_its_workers(engine: Engine) -> None:
    pool = WorkerPool(engine, {}, queues={"a": 1, "b": 2})
    assert [worker.queues for worker in pool.workers] == [("a",), ("b",), ("b",)]
    assert pool.queues == ("a", "b")
    assert WorkerPool(engine, {}, queues={"a": 1, "b": 2}, workers=3).queues == ("a", "b")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"queue": "a", "queues": ["b"]}, r"give queue= or queues=, not both"),
        ({"queues": ["a", 5]}, r"a queue name must be a str, got 5"),
        ({"queues": {"a": 1, 7: 1}}, r"a queue name must be a str, got 7"),
        ({"queues": ["a", "b", "a"]}, r"queues lists a queue twice: \['a', 'b', 'a'\]"),
        ({"queues": []}, r"queues must be a non-empty list of queue names, got \[\]"),
        pytest.param(
            {"queues": "mail"}, r"queues must be a non-empty list of queue names, got 'mail'"
        ),
        ({"queues": {"a": 0}}, r"worker count of queue 'a' must be a whole number >= 1, got 0"),
        ({"queues": {"a": True}}, r"worker count of queue 'a' .* got True"),
        ({"queues": {"a": "2"}}, r"worker count of queue 'a' .* got '2'"),
        ({"queues": {"a": 1, "b": 2}, "workers": 2}, r"workers=2 but .* add up to 3"),
        ({"batch_size": 0}, r"batch_size must be a whole number >= 1, got 0"),
        ({"batch_size": "x"}, r"batch_size must be a whole number >= 1, got 'x'"),
        ({"batch_size": True}, r"batch_size must be a whole number >= 1, got True"),
        ({"batch_size": 2.5}, r"batch_size must be a whole number >= 1, got 2.5"),
        ({"completion": "bulk"}, r"completion must be 'job' or 'batch', got 'bulk'"),
    ],
)
def test_bad_queue_and_batch_options_are_refused_naming_the_value(
    engine: Engine, options: Any, message: str
) -> None:
    with pytest.raises(WorkerError, match=message):
        WorkerPool(engine, {}, **options)


def test_batch_size_is_checked_by_a_worker_too(engine: Engine) -> None:
    with pytest.raises(WorkerError, match=r"batch_size must be a whole number >= 1, got -1"):
        Worker(engine, {}, batch_size=-1)


def test_a_worker_refuses_a_str_as_its_queues(engine: Engine) -> None:
    with pytest.raises(WorkerError, match=r"got 'mail'"):
        Worker(engine, {}, queues="mail")


def test_a_pool_warns_about_a_job_declared_for_a_queue_it_does_not_work(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sqlalchemy_que.worker")

    @job("Mailer", queue="mail")
    def mailer(job: JobContext) -> None:
        pass

    @job("Local")
    def local(job: JobContext) -> None:
        pass

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno == logging.WARNING]

    pool = WorkerPool(engine, [mailer, local], workers=1)
    pool.start(burst=True)
    assert pool.join(10)
    (record,) = warnings()
    assert "'Mailer'" in record.getMessage() and "'mail'" in record.getMessage()
    caplog.clear()
    pool = WorkerPool(engine, [mailer, local], queues=["mail", ""], workers=1)
    pool.start(burst=True)
    assert pool.join(10)
    assert warnings() == []


# -- batch size ------------------------------------------------------------------------------


def test_a_worker_never_holds_more_job_locks_than_its_batch_size(
    engine: Engine, make_engine: Callable[..., Engine]
) -> None:
    with engine.begin() as connection:
        insert_jobs(connection, [enqueue("Sample") for _ in range(50)])
    held: list[int] = []

    def sample(job: JobContext) -> None:
        locks = held_job_locks(engine)
        assert job.job_id in locks
        held.append(len(locks))

    worker = Worker(make_engine(pool_size=1, max_overflow=0), {"Sample": sample}, batch_size=5)
    assert worker.run(burst=True) == 50
    assert len(held) == 50
    assert max(held) <= 5, held
    assert max(held) >= 2, "the worker never locked more than one job at a time"
    assert job_rows(engine) == []


@contextlib.contextmanager
def blocked_in_a_batch(
    engine: Engine, pool_engine: Engine
) -> Iterator[tuple[WorkerPool, int, list[int], threading.Event]]:
    """A one-worker pool whose handler blocks in the first job that runs while other jobs
    of its batch wait locked; yields the pool, that job's id, the locks held at that moment
    and the event that lets it finish."""
    with engine.begin() as connection:
        insert_jobs(connection, [enqueue("Block") for _ in range(10)])
    blocked, release = threading.Event(), threading.Event()
    at_block: list[int] = []
    ran: list[int] = []

    def block(job: JobContext) -> None:
        ran.append(job.job_id)
        locks = held_job_locks(engine)
        if not blocked.is_set() and len(locks) > 1:
            at_block.extend(locks)
            blocked.set()
            if not release.wait(15):
                raise TimeoutError("the test did not release the job")

    pool = WorkerPool(pool_engine, {"Block": block}, workers=1, batch_size=5, wake_interval=60)
    try:
        pool.start()
        assert blocked.wait(10), "no batch ever held more than the running job"
        yield pool, ran[-1], at_block, release
    finally:
        release.set()
        pool.shutdown(timeout=10)
    assert ran.count(ran[-1]) == 1


def test_jobs_locked_but_not_started_are_released_untouched_at_shutdown(
    engine: Engine, make_engine: Callable[..., Engine]
) -> None:
    with blocked_in_a_batch(engine, make_engine(pool_size=1, max_overflow=0)) as (
        pool,
        running,
        at_block,
        release,
    ):
        pending = [job_id for job_id in at_block if job_id != running]
        assert pending, at_block
        assert [job.job_id for job in pool.shutdown(timeout=0.2)] == [running]
        release.set()
        assert pool.join(10)
        assert held_job_locks(engine) == []
        rows = {row["job_id"]: row for row in job_rows(engine)}
        assert running not in rows
        assert all(job_id in rows and rows[job_id]["error_count"] == 0 for job_id in pending)
