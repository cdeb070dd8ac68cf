"""Locking as Que 0.x does (contract section 3), in batches, and the introspection that reads
the locks back (section 6).

The batched lock statement must try the lock of each row it visits exactly once and report
every lock it took: each test that locks compares ``pg_locks`` with the rows returned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy import Engine, text

from sqlalchemy_que import clear, job_stats, locked_job, worker_states
from sqlalchemy_que._session import LockedJob, LockedSession
from sqlalchemy_que._sql import LOCK_JOBS, Statement

from .helpers import add_job, future, held_job_locks, job_rows, past


@contextlib.contextmanager
def session_on(engine: Engine) -> Iterator[LockedSession]:
    session = LockedSession(engine)
    session.checkout()
    try:
        yield session
    finally:
        session.checkin()


def test_no_ready_job_is_nothing_to_do(engine: Engine) -> None:
    with session_on(engine) as session:
        assert session.lock("", 10) == []
    assert held_job_locks(engine) == []
    with locked_job(engine) as lock:
        assert lock is None


def test_lowest_priority_number_then_earliest_run_at_then_lowest_id(engine: Engine) -> None:
    late = add_job(engine, "Late", priority=10, run_at=past(10))
    early = add_job(engine, "Early", priority=10, run_at=past(20))
    urgent = add_job(engine, "Urgent", priority=1, run_at=past(5))
    same_a = add_job(engine, "SameA", priority=50, run_at=past(30))
    same_b = add_job(engine, "SameB", priority=50, run_at=past(30))
    with engine.begin() as connection:
        run_at = connection.execute(
            text("SELECT run_at FROM que_jobs WHERE job_id = :id"), {"id": same_a}
        ).scalar_one()
        connection.execute(
            text("UPDATE que_jobs SET run_at = :run_at WHERE job_id = :id"),
            {"run_at": run_at, "id": same_b},
        )
    order = [urgent, early, late, same_a, same_b]
    with session_on(engine) as session:
        jobs = session.lock("", 10)
        assert [job.job_id for job in jobs] == order
        assert held_job_locks(engine) == sorted(order)
        session.release(jobs)
    one_at_a_time = []
    while True:
        with locked_job(engine) as lock:
            if lock is None:
                break
            one_at_a_time.append(lock.job.job_id)
            assert lock.complete()
    assert one_at_a_time == order
    assert held_job_locks(engine) == []


def test_future_jobs_are_not_locked(engine: Engine) -> None:
    add_job(engine, "Later", run_at=future(60))
    with session_on(engine) as session:
        assert session.lock("", 10) == []


def test_queue_must_match_exactly(engine: Engine) -> None:
    add_job(engine, "Mail", queue="mail")
    add_job(engine, "Default")
    with session_on(engine) as session:
        assert session.lock("mai", 10) == []
        (mail,) = session.lock("mail", 10)
        (other,) = session.lock("", 10)
        assert (mail.job_class, other.job_class) == ("Mail", "Default")
        session.release([mail, other])


@pytest.mark.parametrize("plan", ["auto", "force_generic_plan", "force_custom_plan"])
@pytest.mark.parametrize("limit", [1, 7, 200])
def test_a_batch_takes_exactly_the_locks_it_reports(engine: Engine, plan: str, limit: int) -> None:
    """Many ready jobs, some held by another session: the walk locks at most ``limit`` rows,
    skipping the held ones, and every lock it took is a row it returned, under any plan
    (a prepared statement goes generic after five runs)."""
    ids = [add_job(engine, "Many", index) for index in range(120)]
    held_elsewhere = set(ids[3:60:4])
    with engine.connect() as other, session_on(engine) as session:
        for job_id in held_elsewhere:
            assert other.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": job_id}).scalar()
        other.commit()
        raw = session._raw
        assert raw is not None
        raw.execute(f"SET plan_cache_mode = {plan}")
        for _ in range(7):  # past the five runs after which a generic plan may be chosen
            jobs = session.lock("", limit)
            returned = [job.job_id for job in jobs]
            expected = [job_id for job_id in ids if job_id not in held_elsewhere][:limit]
            assert returned == expected
            assert set(held_job_locks(engine)) == held_elsewhere | set(returned)
            session.release(jobs)
        raw.execute("RESET plan_cache_mode")
        other.execute(text("SELECT pg_advisory_unlock_all()"))
        other.commit()
    assert held_job_locks(engine) == []


def test_the_raw_statement_locks_only_what_it_returns(engine: Engine) -> None:
    """The statement itself, sent by another client: a walk past the held jobs."""
    ids = [add_job(engine, "Many", index) for index in range(50)]
    with engine.connect() as first, engine.connect() as second:
        sql = LOCK_JOBS.sql.decode().replace("$1", "''").replace("$2", "3")
        taken = [row[3] for row in first.exec_driver_sql(sql)]
        first.commit()
        again = [row[3] for row in second.exec_driver_sql(sql)]
        second.commit()
        assert (taken, again) == (ids[:3], ids[3:6])
        assert held_job_locks(engine) == ids[:6]
        first.execute(text("SELECT pg_advisory_unlock_all()"))
        second.execute(text("SELECT pg_advisory_unlock_all()"))
        first.commit()
        second.commit()


def test_a_job_locked_by_another_session_is_skipped(engine: Engine) -> None:
    first = add_job(engine, "First")
    second = add_job(engine, "Second")
    with engine.connect() as other:
        assert other.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": first}).scalar()
        other.commit()
        with locked_job(engine) as lock:
            assert lock is not None and lock.job.job_id == second
            assert held_job_locks(engine) == [first, second]
            assert lock.complete()
        with locked_job(engine) as lock:
            assert lock is None  # the only ready job is held elsewhere
        assert other.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": first}).scalar()
        other.commit()


class _DeletingSession(LockedSession):
    """A session whose lock statement is followed, before the re-check, by another client's
    DELETE of the given jobs: the race of a snapshot older than another worker's commit."""

    def __init__(self, engine: Engine, doomed: set[int]) -> None:
        super().__init__(engine)
        self.doomed = doomed

    def _execute(
        self,
        statement: Statement,
        params: Sequence[bytes | None],
        *,
        prepared: bool = True,
        simple: bool = False,
    ) -> Any:
        result = super()._execute(statement, params, prepared=prepared, simple=simple)
        if statement is LOCK_JOBS and self.doomed:
            with self.engine.begin() as other:
                other.execute(
                    text("DELETE FROM que_jobs WHERE job_id = ANY(:ids)"),
                    {"ids": sorted(self.doomed)},
                )
            self.doomed = set()
        return result


def test_a_job_deleted_between_lock_and_recheck_is_skipped_and_unlocked(engine: Engine) -> None:
    doomed = add_job(engine, "Doomed")
    survivor = add_job(engine, "Survivor")
    session = _DeletingSession(engine, {doomed})
    session.checkout()
    try:
        (job,) = session.lock("", 10)
        assert job.job_id == survivor
        assert held_job_locks(engine) == [survivor]
        session.release([job])
    finally:
        session.checkin()


def test_every_job_vanishing_looks_again_and_leaves_no_lock(engine: Engine) -> None:
    doomed = add_job(engine, "Doomed")
    session = _DeletingSession(engine, {doomed})
    session.checkout()
    try:
        assert session.lock("", 10) == []
    finally:
        session.checkin()
    assert held_job_locks(engine) == []


def test_a_job_id_above_two_to_the_32_is_locked_counted_and_unlocked(engine: Engine) -> None:
    big = 2**33 + 7
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO que_jobs (job_id, job_class) VALUES (:id, 'Big')"), {"id": big}
        )
    with locked_job(engine) as lock:
        assert lock is not None and lock.job.job_id == big
        assert held_job_locks(engine) == [big]
        (stats,) = job_stats(engine)
        assert (stats.job_class, stats.count, stats.count_working) == ("Big", 1, 1)
        (state,) = worker_states(engine)
        assert state.job_id == big
    assert held_job_locks(engine) == []
    assert job_stats(engine)[0].count_working == 0


def test_locked_job_releases_the_lock_whatever_the_block_does(engine: Engine) -> None:
    """The hand-locking pattern cannot leak a lock into the pool: an aborted transaction, an
    exception, or a lock the block took itself on the same session."""
    job_id = add_job(engine, "Manual")

    def misbehave() -> None:
        with locked_job(engine) as lock:
            assert lock is not None
            lock.connection.execute(text("SELECT pg_advisory_lock(:id + 1)"), {"id": job_id})
            with contextlib.suppress(Exception):
                lock.connection.execute(text("SELECT 1/0"))  # leaves the transaction aborted
            raise RuntimeError("the caller's own failure")

    with pytest.raises(RuntimeError):
        misbehave()
    assert held_job_locks(engine) == []
    (row,) = job_rows(engine)
    assert (row["job_id"], row["error_count"]) == (job_id, 0)


def test_job_stats_columns_order_and_counts(engine: Engine) -> None:
    for _ in range(3):
        add_job(engine, "Mailer", queue="mail")
    add_job(engine, "Billing")
    oldest = past(500)
    add_job(engine, "Billing", run_at=oldest)
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE que_jobs SET error_count = 4 WHERE job_class = 'Billing' AND run_at = :r"),
            {"r": oldest},
        )
    with locked_job(engine) as lock:
        assert lock is not None and lock.job.job_class == "Billing"
        stats = job_stats(engine)
        assert tuple(stats[0].__slots__) == (
            "queue",
            "job_class",
            "count",
            "count_working",
            "count_errored",
            "highest_error_count",
            "oldest_run_at",
        )
        mail, billing = stats
        assert (mail.queue, mail.job_class, mail.count, mail.count_working) == (
            "mail",
            "Mailer",
            3,
            0,
        )
        assert (mail.count_errored, mail.highest_error_count) == (0, 0)
        assert (billing.queue, billing.count, billing.count_working) == ("", 2, 1)
        assert (billing.count_errored, billing.highest_error_count) == (1, 4)
        assert billing.oldest_run_at == oldest


def test_worker_states_show_the_locking_session(engine: Engine) -> None:
    job_id = add_job(engine, "Busy", {"a": 1})
    with locked_job(engine) as lock:
        assert lock is not None and isinstance(lock.job, LockedJob)
        pid = lock.connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        (state,) = worker_states(engine)
        assert (state.job_id, state.job_class, state.args) == (job_id, "Busy", '[{"a":1}]')
        assert state.pg_backend_pid == pid
        assert state.pg_state == "idle in transaction"
        assert state.pg_waiting_on_lock is False
        assert state.pg_last_query == "SELECT pg_backend_pid()"
    assert worker_states(engine) == []


def test_clear_deletes_every_job_and_keeps_the_sequence(engine: Engine) -> None:
    first = add_job(engine, "A")
    add_job(engine, "B", queue="other")
    assert clear(engine) == 2
    assert job_rows(engine) == []
    assert add_job(engine, "C") > first + 1
