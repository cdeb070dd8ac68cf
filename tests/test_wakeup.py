"""Instant wake-up: NOTIFY in the enqueuing transaction, one listening connection per pool,
timers for jobs due soon, and polling as the safety net."""

from __future__ import annotations

import datetime
import functools
import operator
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.orm import Session

from sqlalchemy_que import JobContext, WorkerPool, enqueue, insert_job, insert_jobs
from sqlalchemy_que._notify import channel_for, parse_payload

from .conftest import wait_for
from .helpers import job_rows, notifications

UTC = datetime.timezone.utc


def libpq_url(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


@pytest.fixture
def listen(database_url: str) -> Iterator[Any]:
    """A raw psycopg connection to LISTEN on, returning a function that collects what the
    transactions committed so far notified."""
    connection = psycopg.connect(libpq_url(database_url), autocommit=True)

    def on(queue: str) -> Any:
        connection.execute(f'LISTEN "{channel_for(queue)}"')
        return functools.partial(notifications, connection, channel_for(queue))

    yield on
    connection.close()


def test_channel_names_are_safe_for_any_queue() -> None:
    names = ["", "mail", 'quote"s and spaces', "ümlaut ☃", "x" * 10_000]
    channels = [channel_for(name) for name in names]
    assert len(set(channels)) == len(names)
    assert all(len(channel.encode()) <= 63 and channel.isidentifier() for channel in channels)


def test_one_notification_per_transaction_and_queue(engine: Engine, listen: Any) -> None:
    received = listen("mail")
    with Session(engine) as session:
        for index in range(50):
            session.add(enqueue("Mail", index, queue="mail"))
        session.flush()
        for index in range(50):
            session.add(enqueue("Mail", index, queue="mail"))
        session.commit()
    with engine.begin() as connection:
        for index in range(10):
            insert_job(connection, "Mail", index, queue="mail")
        insert_jobs(connection, [enqueue("Mail", i, queue="mail") for i in range(100)])
    payloads = received()
    assert len(payloads) == 2  # one per transaction
    for payload in payloads:  # due now: no time, or the insert's own now()
        run_at = parse_payload(payload)
        assert run_at is None or run_at <= time.time()


def test_every_transaction_of_a_reused_connection_notifies(engine: Engine, listen: Any) -> None:
    received = listen("")
    with engine.connect() as connection:  # commit as you go, one connection throughout
        for index in range(3):
            insert_job(connection, "Again", index)
            connection.commit()
        insert_jobs(connection, [enqueue("Again")])
        connection.commit()
    with Session(engine) as session:
        for index in range(2):
            session.add(enqueue("Again", index))
            session.commit()
    assert len(received()) == 6


def test_a_rolled_back_enqueue_notifies_nobody(engine: Engine, listen: Any) -> None:
    received = listen("")
    with Session(engine) as session:
        session.add(enqueue("Nope"))
        session.flush()
        session.rollback()
    with engine.connect() as connection:
        insert_job(connection, "Nope")
        insert_jobs(connection, [enqueue("Nope")])
        connection.rollback()
    assert received() == []
    assert job_rows(engine) == []


def test_an_earlier_job_in_the_same_transaction_notifies_again(engine: Engine, listen: Any) -> None:
    received = listen("")
    later = datetime.datetime.now(UTC) + datetime.timedelta(seconds=30)
    with engine.begin() as connection:
        insert_job(connection, "Later", run_at=later)
        insert_job(connection, "Later", run_at=later + datetime.timedelta(seconds=5))
        insert_job(connection, "Now")
        insert_job(connection, "AlsoNow")
    runs = [parse_payload(payload) for payload in received()]
    assert runs == [pytest.approx(later.timestamp()), None]


@pytest.fixture
def started() -> dict[str, float]:
    return {}


def make_pool(engine: Engine, started: dict[str, float], **options: Any) -> WorkerPool:
    def record(job: JobContext, name: str) -> None:
        started[name] = time.monotonic()

    return WorkerPool(engine, {"Record": record}, **{"workers": 2, "wake_interval": 60, **options})


def test_a_committed_job_starts_at_once_while_every_worker_sleeps(
    engine: Engine, started: dict[str, float]
) -> None:
    pool = make_pool(engine, started, queue="fast")
    pool.start()
    try:
        assert pool.listener is not None
        assert pool.listener.connected.wait(5)
        wait_for(lambda: all(w.sleeping for w in pool.workers), message="workers asleep")
        for name in ("a", "b", "c"):
            with Session(engine) as session:
                session.add(enqueue("Record", name, queue="fast"))
                session.commit()
            # The workers sleep for 60 s: only the wake-up starts the job within 30 s (a
            # bound generous on purpose, for a loaded machine; the benchmark measures the
            # latency).
            wait_for(functools.partial(operator.contains, started, name), timeout=30)
    finally:
        assert pool.shutdown(5) == []


def test_a_job_due_in_two_seconds_starts_on_time(engine: Engine, started: dict[str, float]) -> None:
    pool = make_pool(engine, started)
    pool.start()
    try:
        assert pool.listener is not None and pool.listener.connected.wait(5)
        # The same instant on both clocks (the handler records the monotonic one).
        now, now_monotonic = datetime.datetime.now(UTC), time.monotonic()
        with engine.begin() as connection:
            insert_job(
                connection, "Record", "scheduled", run_at=now + datetime.timedelta(seconds=2)
            )
        due = now_monotonic + 2
        # Not before it is due; and well before the workers' 60 s sleep ends (30 s: a bound
        # generous on purpose, for a loaded machine).
        wait_for(lambda: "scheduled" in started, timeout=30, message="the scheduled job")
        assert due - 0.01 <= started["scheduled"] < due + 30
    finally:
        assert pool.shutdown(5) == []


def test_a_job_inserted_by_raw_sql_is_found_by_polling(
    engine: Engine, started: dict[str, float]
) -> None:
    pool = make_pool(engine, started, wake_interval=0.3)
    pool.start()
    try:
        assert pool.listener is not None and pool.listener.connected.wait(5)
        with engine.begin() as connection:
            connection.execute(
                text("""INSERT INTO que_jobs (job_class, args) VALUES ('Record', '["raw"]')""")
            )
        wait_for(lambda: "raw" in started, timeout=5, message="polling to find the raw job")
        assert pool.listener.received == 0
    finally:
        assert pool.shutdown(5) == []


def test_wake_ups_resume_after_the_listening_connection_is_killed(
    engine: Engine, started: dict[str, float]
) -> None:
    pool = make_pool(engine, started)
    pool.start()
    try:
        listener = pool.listener
        assert listener is not None and listener.connected.wait(5)
        with engine.begin() as connection:
            killed = (
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'sqlalchemy-que listener' "
                        "AND datname = current_database()"
                    )
                )
                .scalars()
                .all()
            )
        assert killed == [True]
        wait_for(lambda: not listener.connected.is_set(), message="the listener to notice")
        assert listener.connected.wait(10)
        wait_for(lambda: all(w.sleeping for w in pool.workers), message="workers asleep")
        with engine.begin() as connection:
            insert_job(connection, "Record", "after")
        # The workers sleep for 60 s: only the new listener's wake-up starts the job within
        # 30 s (a bound generous on purpose, for a loaded machine).
        wait_for(lambda: "after" in started, timeout=30, message="the job after reconnecting")
        assert all(thread.is_alive() for thread in pool._threads)
    finally:
        assert pool.shutdown(5) == []


def test_a_burst_wakes_as_many_workers_as_there_are_jobs(engine: Engine) -> None:
    busy: set[str] = set()
    gate = threading.Event()
    lock = threading.Lock()

    def slow(job: JobContext, index: int) -> None:
        with lock:
            busy.add(threading.current_thread().name)
        assert gate.wait(10)

    pool = WorkerPool(engine, {"Slow": slow}, workers=4, wake_interval=60)
    pool.start()
    try:
        assert pool.listener is not None and pool.listener.connected.wait(5)
        wait_for(lambda: all(w.sleeping for w in pool.workers), message="workers asleep")
        with engine.begin() as connection:
            insert_jobs(connection, [enqueue("Slow", index) for index in range(3)])
        wait_for(lambda: len(busy) == 3, timeout=5, message="three workers on three jobs")
        # The fourth worker was woken by the third, found nothing, and sleeps again.
        wait_for(lambda: sum(w.sleeping for w in pool.workers) == 1, message="one asleep")
    finally:
        gate.set()
        assert pool.shutdown(5) == []


def test_listening_can_be_turned_off(engine: Engine, started: dict[str, float]) -> None:
    pool = make_pool(engine, started, listen=False, wake_interval=0.2)
    assert pool.listener is None
    pool.start()
    try:
        with engine.begin() as connection:
            insert_job(connection, "Record", "polled")
        wait_for(lambda: "polled" in started, timeout=5, message="polling alone")
        with engine.connect() as connection:
            listeners = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'sqlalchemy-que listener'"
                )
            ).scalar_one()
        assert listeners == 0
    finally:
        assert pool.shutdown(5) == []


def test_a_rolled_back_savepoint_does_not_silence_later_wakeups(
    engine: Engine, listen: Any
) -> None:
    received = listen("")
    with Session(engine) as session:
        savepoint = session.begin_nested()
        session.add(enqueue("Dropped"))
        session.flush()
        savepoint.rollback()
        session.add(enqueue("Kept"))
        session.commit()
    assert len(received()) == 1
    assert [row["job_class"] for row in job_rows(engine)] == ["Kept"]


def test_the_listener_connects_as_the_engine_does(database_url: str, engine: Engine) -> None:
    # The real host and port reach the driver only through connect_args.
    real = make_url(database_url)
    tricky = create_engine(
        real.set(host="127.0.0.1", port=1),
        connect_args={"host": real.host, "port": real.port},
        pool_size=3,
    )
    started: dict[str, float] = {}
    pool = make_pool(tricky, started)
    pool.start()
    try:
        assert pool.listener is not None and pool.listener.connected.wait(5)
        with engine.begin() as connection:
            insert_job(connection, "Record", "via connect_args")
        wait_for(lambda: "via connect_args" in started, timeout=5, message="the job")
    finally:
        assert pool.shutdown(5) == []
        tricky.dispose()
