"""Locking exactly as Que 0.x does (contract section 3), and the introspection that reads the
locks back (section 6)."""

from __future__ import annotations

from sqlalchemy import Engine, text

from sqlalchemy_que import clear, job_stats, lock_job, unlock_job, worker_states
from sqlalchemy_que.locking import LOCK_NEXT_JOB, LockedJob

from .helpers import add_job, future, held_job_locks, job_rows, past


def test_no_ready_job_is_nothing_to_do(engine: Engine) -> None:
    with engine.connect() as connection:
        assert lock_job(connection, "") is None
        assert not connection.in_transaction()
    assert held_job_locks(engine) == []


def test_lowest_priority_number_then_earliest_run_at_then_lowest_id(engine: Engine) -> None:
    late = add_job(engine, "Late", priority=10, run_at=past(10))
    early = add_job(engine, "Early", priority=10, run_at=past(20))
    urgent = add_job(engine, "Urgent", priority=1, run_at=past(5))
    same_a = add_job(engine, "SameA", priority=50, run_at=past(30))
    same_b = add_job(engine, "SameB", priority=50, run_at=past(30))
    with engine.connect() as connection:
        run_at = connection.execute(
            text("SELECT run_at FROM que_jobs WHERE job_id = :id"), {"id": same_a}
        ).scalar_one()
        connection.execute(
            text("UPDATE que_jobs SET run_at = :run_at WHERE job_id = :id"),
            {"run_at": run_at, "id": same_b},
        )
        connection.commit()
        order = []
        while (job := lock_job(connection, "")) is not None:
            order.append(job.job_id)
            connection.execute(text("DELETE FROM que_jobs WHERE job_id = :id"), {"id": job.job_id})
            assert unlock_job(connection, job.job_id)
            connection.commit()
    assert order == [urgent, early, late, same_a, same_b]


def test_future_jobs_are_not_locked(engine: Engine) -> None:
    add_job(engine, "Later", run_at=future(60))
    with engine.connect() as connection:
        assert lock_job(connection, "") is None


def test_queue_must_match_exactly(engine: Engine) -> None:
    add_job(engine, "Mail", queue="mail")
    add_job(engine, "Default")
    with engine.connect() as connection:
        assert lock_job(connection, "mai") is None
        job = lock_job(connection, "mail")
        assert job is not None and job.job_class == "Mail"
        other = lock_job(connection, "")
        assert other is not None and other.job_class == "Default"
        assert unlock_job(connection, job.job_id) and unlock_job(connection, other.job_id)
        connection.commit()


def test_one_lock_per_call_even_with_many_ready_jobs(engine: Engine) -> None:
    ids = [add_job(engine, "Many", index) for index in range(50)]
    with engine.connect() as connection, engine.connect() as second:
        job = lock_job(connection, "")
        assert job is not None and job.job_id == ids[0]
        assert held_job_locks(engine) == [ids[0]]
        # The raw statement on another session: it walks past the held job, and visiting
        # rows stops at the first lock it takes.
        row = second.execute(LOCK_NEXT_JOB, {"queue": ""}).first()
        second.commit()
        assert row is not None and row.job_id == ids[1]
        assert held_job_locks(engine) == ids[:2]
        assert unlock_job(connection, ids[0]) and unlock_job(second, ids[1])
        connection.commit()
        second.commit()
    assert held_job_locks(engine) == []


def test_a_job_locked_by_another_session_is_skipped(engine: Engine) -> None:
    first = add_job(engine, "First")
    second = add_job(engine, "Second")
    with engine.connect() as other, engine.connect() as mine:
        assert other.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": first}).scalar()
        other.commit()
        job = lock_job(mine, "")
        assert job is not None and job.job_id == second
        assert held_job_locks(engine) == [first, second]
        mine.execute(text("DELETE FROM que_jobs WHERE job_id = :id"), {"id": second})
        assert unlock_job(mine, second)
        mine.commit()
        assert lock_job(mine, "") is None  # the only ready job is held elsewhere
        assert unlock_job(other, first)
        other.commit()


def test_a_job_deleted_between_lock_and_recheck_is_skipped_and_unlocked(engine: Engine) -> None:
    doomed = add_job(engine, "Doomed")
    survivor = add_job(engine, "Survivor")
    with engine.connect() as worker:
        # Take a snapshot that still shows the doomed job; then delete it for good elsewhere.
        worker.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        worker.execute(text("SELECT count(*) FROM que_jobs")).scalar_one()
        with engine.begin() as other:
            other.execute(text("DELETE FROM que_jobs WHERE job_id = :id"), {"id": doomed})
        # The lock query runs in the old snapshot, finds and locks the doomed job; the
        # re-check in a fresh statement sees it gone, unlocks it and looks again.
        job = lock_job(worker, "")
        assert job is not None and job.job_id == survivor
        assert held_job_locks(engine) == [survivor]
        assert unlock_job(worker, survivor)
        worker.commit()


def test_every_attempt_vanishing_gives_nothing_and_leaves_no_lock(engine: Engine) -> None:
    doomed = add_job(engine, "Doomed")
    with engine.connect() as worker:
        worker.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        worker.execute(text("SELECT count(*) FROM que_jobs")).scalar_one()
        with engine.begin() as other:
            other.execute(text("DELETE FROM que_jobs WHERE job_id = :id"), {"id": doomed})
        assert lock_job(worker, "", attempts=1) is None
    assert held_job_locks(engine) == []


def test_a_job_id_above_two_to_the_32_is_locked_counted_and_unlocked(engine: Engine) -> None:
    big = 2**33 + 7
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO que_jobs (job_id, job_class) VALUES (:id, 'Big')"), {"id": big}
        )
    with engine.connect() as connection:
        job = lock_job(connection, "")
        assert job is not None and job.job_id == big
        assert held_job_locks(engine) == [big]
        (stats,) = job_stats(engine)
        assert (stats.job_class, stats.count, stats.count_working) == ("Big", 1, 1)
        (state,) = worker_states(engine)
        assert state.job_id == big
        assert unlock_job(connection, big)
        connection.commit()
    assert held_job_locks(engine) == []
    assert job_stats(engine)[0].count_working == 0


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
    with engine.connect() as locker:
        job = lock_job(locker, "")
        assert job is not None and job.job_class == "Billing"
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
        assert unlock_job(locker, job.job_id)
        locker.commit()


def test_worker_states_show_the_locking_session(engine: Engine) -> None:
    job_id = add_job(engine, "Busy", {"a": 1})
    with engine.connect() as locker:
        pid = locker.execute(text("SELECT pg_backend_pid()")).scalar_one()
        job = lock_job(locker, "")
        assert isinstance(job, LockedJob)
        (state,) = worker_states(engine)
        assert (state.job_id, state.job_class, state.args) == (job_id, "Busy", '[{"a":1}]')
        assert state.pg_backend_pid == pid
        assert state.pg_state == "idle"
        assert state.pg_waiting_on_lock is False
        assert state.pg_last_query is not None
        assert unlock_job(locker, job_id)
        locker.commit()
    assert worker_states(engine) == []


def test_clear_deletes_every_job_and_keeps_the_sequence(engine: Engine) -> None:
    first = add_job(engine, "A")
    add_job(engine, "B", queue="other")
    assert clear(engine) == 2
    assert job_rows(engine) == []
    assert add_job(engine, "C") > first + 1
