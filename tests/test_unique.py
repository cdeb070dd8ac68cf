"""Unique jobs: one job per key while it waits or runs, released with its row."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine, text

import sqlalchemy_que
from sqlalchemy_que import InvalidJobError, JobContext, JobRegistry, Worker, enqueue, insert_job

from .conftest import wait_for


def unique_rows(engine: Engine) -> list[tuple[str, int]]:
    with engine.connect() as connection:
        return [
            (row.unique_key, row.job_id)
            for row in connection.execute(
                text("SELECT unique_key, job_id FROM sqlalchemy_que_unique_keys ORDER BY 1")
            )
        ]


def job_ids(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT job_id FROM que_jobs ORDER BY 1")).scalars())


@pytest.fixture
def clean(engine: Engine) -> Engine:
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM sqlalchemy_que_unique_keys"))
    return engine


def test_a_second_enqueue_of_a_held_key_inserts_nothing_and_returns_none(clean: Engine) -> None:
    with clean.begin() as connection:
        first = insert_job(connection, "Invoice", 42, unique_key="invoice:42")
        again = insert_job(connection, "Invoice", 42, unique_key="invoice:42")  # same transaction
    with clean.begin() as connection:
        later = insert_job(connection, "Invoice", 42, unique_key="invoice:42")
        other = insert_job(connection, "Invoice", 43, unique_key="invoice:43")
    assert isinstance(first, int)
    assert again is None and later is None
    assert isinstance(other, int)
    assert job_ids(clean) == [first, other]
    assert unique_rows(clean) == [("invoice:42", first), ("invoice:43", other)]


def test_the_unique_job_has_the_fields_given_and_the_contracts_defaults(clean: Engine) -> None:
    with clean.begin() as connection:
        job_id = insert_job(connection, "Invoice", {"n": 1}, unique_key="k", run_in=30)
        plain = insert_job(connection, "Invoice", unique_key="plain")
        row = connection.execute(
            text(
                "SELECT queue, priority, args::text AS args, run_at - now() AS delay "
                "FROM que_jobs WHERE job_id = :id"
            ),
            {"id": job_id},
        ).one()
        defaults = connection.execute(
            text("SELECT queue, priority, run_at = now() AS now FROM que_jobs WHERE job_id = :id"),
            {"id": plain},
        ).one()
    assert (row.queue, row.priority, row.args, row.delay.total_seconds()) == (
        "",
        100,
        '[{"n":1}]',
        30,
    )
    assert (defaults.queue, defaults.priority, defaults.now) == ("", 100, True)


def test_released_on_completion_kept_on_retry_released_on_final_removal(clean: Engine) -> None:
    outcomes: list[str] = []
    registry = JobRegistry()

    @registry.job("Flaky", retry_delay=0)
    def flaky(job: JobContext, n: int) -> None:
        outcomes.append("run")
        if job.error_count == 0:
            raise RuntimeError("first attempt fails")

    with clean.begin() as connection:
        job_id = insert_job(connection, flaky, 1, unique_key="flaky")
    worker = Worker(clean, registry)
    assert worker.work_one()  # fails: the row stays with a new run_at, the key is kept
    with clean.begin() as connection:
        assert connection.execute(text("SELECT error_count FROM que_jobs")).scalar_one() == 1
        assert insert_job(connection, flaky, 1, unique_key="flaky") is None
    wait_for(lambda: worker.work_one(), message="the retry to run")  # succeeds: row deleted
    assert outcomes == ["run", "run"]
    assert job_ids(clean) == []
    with clean.begin() as connection:
        again = insert_job(connection, flaky, 1, unique_key="flaky")
    assert again is not None and again != job_id

    # A final failure removes the row from que_jobs (into a failed-jobs table, or by an
    # operator's delete): the key goes with it, in that same transaction.
    with clean.connect() as connection:
        transaction = connection.begin()
        connection.execute(text("DELETE FROM que_jobs WHERE job_id = :id"), {"id": again})
        with clean.begin() as other:  # not yet committed: still held for everyone else
            assert insert_job(other, flaky, 1, unique_key="flaky") is None
        transaction.commit()
    with clean.begin() as connection:
        assert insert_job(connection, flaky, 1, unique_key="flaky") is not None


def test_rollback_releases_nothing_it_did_not_take(clean: Engine) -> None:
    with clean.begin() as connection:
        held = insert_job(connection, "Job", unique_key="held")
        stale = insert_job(connection, "Job", unique_key="stale")
        connection.execute(text("DELETE FROM que_jobs WHERE job_id = :id"), {"id": stale})
    before = unique_rows(clean)
    with clean.connect() as connection, connection.begin() as transaction:
        assert insert_job(connection, "Job", unique_key="held") is None
        taken = insert_job(connection, "Job", unique_key="stale")  # takes over the stale row
        fresh = insert_job(connection, "Job", unique_key="fresh")
        assert taken is not None and fresh is not None
        transaction.rollback()
    assert unique_rows(clean) == before
    assert job_ids(clean) == [held]
    with clean.begin() as connection:
        assert insert_job(connection, "Job", unique_key="held") is None


#: Backends of the test database waiting for a lock (the enqueuers blocked on one another).
LOCK_WAITS = text(
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


def test_eight_concurrent_enqueuers_create_exactly_one_job(clean: Engine) -> None:
    barrier = threading.Barrier(8)
    results: list[int | None] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    back = [0]  # enqueuers whose insert_job returned, in this round

    def everybody_back_or_waiting() -> bool:
        with clean.connect() as observer:
            waiting = int(observer.execute(LOCK_WAITS).scalar_one())
        with lock:
            return back[0] + waiting >= 8

    def enqueue_once() -> None:
        try:
            with clean.connect() as connection:
                with connection.begin():
                    barrier.wait(timeout=10)
                    result = insert_job(connection, "Report", unique_key="report:daily")
                    with lock:
                        back[0] += 1
                    # Hold the transaction open until every other enqueuer has come back
                    # or waits on a lock: the contended path is taken, whatever the timing.
                    wait_for(everybody_back_or_waiting, timeout=30, message="the others")
                with lock:
                    results.append(result)
        except BaseException as error:
            errors.append(error)

    for _ in range(3):  # a free key, then a key held by a committed job, then a stale one
        results.clear()
        back[0] = 0
        threads = [threading.Thread(target=enqueue_once) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors
        assert not any(thread.is_alive() for thread in threads)  # no deadlock
        created = [r for r in results if r is not None]
        if _ == 1:
            assert created == []
            with clean.begin() as connection:
                connection.execute(text("DELETE FROM que_jobs"))
        else:
            assert len(created) == 1, results
            assert results.count(None) == 7
    assert len(job_ids(clean)) == 1  # the second round deleted the first job


def test_an_enqueue_waits_for_a_concurrent_uncommitted_one(clean: Engine) -> None:
    for outcome in ("commit", "rollback"):
        with clean.begin() as connection:
            connection.execute(text("DELETE FROM que_jobs"))
        first = clean.connect()
        first_transaction = first.begin()
        assert insert_job(first, "Job", unique_key="contended") is not None
        result: list[int | None] = []
        second = threading.Thread(target=_insert_committed, args=(clean, "contended", result))
        second.start()
        wait_for(lambda: _waiting_on_a_lock(clean), message="the second enqueue to wait")
        assert not result
        getattr(first_transaction, outcome)()
        first.close()
        second.join(timeout=10)
        if outcome == "commit":
            assert result == [None]
        else:
            assert result and result[0] is not None


def _insert_committed(engine: Engine, key: str, result: list[int | None]) -> None:
    with engine.begin() as connection:
        result.append(insert_job(connection, "Job", unique_key=key))


def _waiting_on_a_lock(engine: Engine) -> bool:
    with engine.connect() as connection:
        return bool(
            connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                )
            ).scalar_one()
        )


def test_a_definitions_key_function(clean: Engine) -> None:
    registry = JobRegistry()

    @registry.job("Charge", unique_key=lambda invoice_id, amount=0: f"charge:{invoice_id}")
    def charge(job: JobContext, invoice_id: int, amount: int = 0) -> None: ...

    with clean.begin() as connection:
        first = charge.insert_unique(connection, 7, amount=100)
        second = charge.insert_unique(connection, 7, amount=200)
        other = charge.insert_unique(connection, 8)
    assert first is not None and second is None and other is not None
    assert unique_rows(clean) == [("charge:7", first), ("charge:8", other)]


def test_forms_that_cannot_say_so_refuse_a_unique_definition(clean: Engine) -> None:
    @sqlalchemy_que.job("Charge", unique_key=lambda n: f"charge:{n}")
    def charge(job: JobContext, n: int) -> None: ...

    @sqlalchemy_que.job("Plain")
    def plain(job: JobContext) -> None: ...

    with clean.begin() as connection:
        for attempt in (
            lambda: enqueue(charge, 1),
            lambda: charge.enqueue(1),
            lambda: charge.insert(connection, 1),
            lambda: insert_job(connection, charge, 1),
            lambda: sqlalchemy_que.insert_many(connection, charge, [[1]]),
        ):
            with pytest.raises(InvalidJobError, match="insert_unique"):
                attempt()
        with pytest.raises(InvalidJobError, match="no unique_key function"):
            plain.insert_unique(connection)
        bad: Any = ""
        with pytest.raises(InvalidJobError, match="unique_key"):
            insert_job(connection, "Job", unique_key=bad)
        assert insert_job(connection, charge, 1, unique_key="explicit") is not None
    assert [key for key, _ in unique_rows(clean)] == ["explicit"]
