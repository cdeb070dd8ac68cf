"""The async worker under cancellation from outside the pool, stray tasks and faults: what
``tests/test_async_worker.py`` does not reach. The pool's tasks are cancelled the way an
application cancels them (the task running ``pool.run()``); a handler's leftover task uses
the job's session after the job ended; the engines have a real connection pool, so that a
connection given back with a lock or a transaction would be seen by the next checkout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

import sqlalchemy_que
from sqlalchemy_que import (
    AsyncJobContext,
    AsyncWorkerPool,
    JobRegistry,
    QueError,
    WorkerError,
    every,
)
from sqlalchemy_que._async_session import AsyncLockedSession
from sqlalchemy_que._async_tasks import end_task, wait_event

from .helpers import add_job, database_outage, held_job_locks, job_rows
from .test_async_worker import async_engine, crash_marks, rows, run, table, wait_until

__all__ = ["async_engine", "table"]  # fixtures of test_async_worker, used here too


def pooled_engine(database_url: str, size: int, **options: Any) -> AsyncEngine:
    """An AsyncEngine with a real pool of ``size`` connections (made on the running loop)."""
    url = make_url(database_url).set(drivername="postgresql+psycopg")
    return create_async_engine(url, pool_size=size, max_overflow=0, **options)


def scheduler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "que-scheduler" and t.is_alive()]


# -- cancelling the task that runs the pool ------------------------------------------------


# A statement that survives the first cancel request, as a statement does when the request
# reaches the server before the statement has started (the server then ignores it): the
# pool must keep asking, where psycopg asks once and then waits for the statement's end.
STUBBORN_STATEMENT = """
DO $$ BEGIN
  BEGIN PERFORM pg_sleep(60); EXCEPTION WHEN query_canceled THEN PERFORM pg_sleep(60); END;
END $$
"""


@pytest.mark.parametrize("awaiting", ["event", "statement", "stubborn statement"])
def test_cancelling_the_task_running_the_pool_ends_it_and_releases_the_job(
    engine: Engine, database_url: str, table: str, awaiting: str
) -> None:
    """The application cancels ``pool.run()`` (as ``asyncio.run`` does on Ctrl-C, or a
    lifespan's task group) while a handler awaits an event or one of its statements: every
    task ends, the listener and the scheduler with them, the job's write is rolled back, its
    row kept and unlocked, and it is not run again by the cancelled pool."""
    registry = JobRegistry()
    started = asyncio.Event()
    runs: list[int] = []

    @registry.job("Cancelled")
    async def cancelled(job: AsyncJobContext) -> None:
        runs.append(job.job_id)
        await job.session.execute(
            text(f"INSERT INTO {table} VALUES (:id, 'x')"), {"id": job.job_id}
        )
        started.set()
        if awaiting == "statement":
            await job.connection.execute(text("SELECT pg_sleep(60)"))
        elif awaiting == "stubborn statement":
            await job.connection.execute(text(STUBBORN_STATEMENT))
        else:
            await asyncio.Event().wait()

    @registry.job("Hourly", schedule=every(3600))
    async def hourly(job: AsyncJobContext) -> None:
        pass

    job_id = add_job(engine, "Cancelled")

    async def main() -> AsyncWorkerPool:
        worker_engine = pooled_engine(database_url, 2)
        try:
            pool = AsyncWorkerPool(worker_engine, registry, concurrency=1, wake_interval=0.05)
            running = asyncio.ensure_future(pool.run())
            await asyncio.wait_for(started.wait(), 10)
            running.cancel()
            done, _ = await asyncio.wait([running], timeout=15)
            assert done, "the cancelled pool.run() did not end"
            assert running.cancelled()
            assert all(task.done() for task in pool._running)
            assert pool.listener is not None and pool.listener._task is None
            return pool
        finally:
            await worker_engine.dispose()

    pool = run(main)
    assert pool.scheduler is None and scheduler_threads() == []
    assert runs == [job_id]
    assert rows(engine, table) == []
    (row,) = job_rows(engine)
    assert row["job_id"] == job_id and row["error_count"] == 0
    assert held_job_locks(engine) == []
    assert crash_marks(engine) == []  # released untouched, as at a shutdown


# -- a cancellation lost on the way -------------------------------------------------------
# On Python < 3.12 ``asyncio.wait_for`` drops a cancellation that arrives as the awaited
# future completes, and psycopg < 3.3 waits on its socket through it: the listener's task,
# cancelled inside ``notifies()``, went on listening and ``pool.run()`` never ended.


def test_end_task_ends_a_task_that_loses_its_first_cancellations() -> None:
    swallowed: list[int] = []

    async def loses_two() -> None:
        while len(swallowed) < 2:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                swallowed.append(1)  # as a cancellation lost inside a library's wait
        await asyncio.Event().wait()

    async def main() -> asyncio.Task[None]:
        task = asyncio.ensure_future(loses_two())
        await wait_until(lambda: task._fut_waiter is not None, "the task waits")  # type: ignore[attr-defined]
        await end_task(task, interval=0.01)
        return task

    task = run(main, timeout=10)
    assert swallowed == [1, 1] and task.cancelled()


def test_wait_event_keeps_a_cancellation_that_arrives_as_the_event_is_set() -> None:
    async def main() -> asyncio.Task[bool]:
        event = asyncio.Event()
        waiting = asyncio.ensure_future(wait_event(event, 60))
        await wait_until(lambda: event._waiters, "the waiter waits")
        event.set()
        waiting.cancel()
        await asyncio.wait([waiting], timeout=5)
        return waiting

    waiting = run(main, timeout=10)
    assert waiting.cancelled()


def test_wait_event_says_whether_the_event_was_set() -> None:
    async def main() -> tuple[bool, bool]:
        event = asyncio.Event()
        timed_out = await wait_event(event, 0.01)
        event.set()
        return timed_out, await wait_event(event, 60)

    assert run(main) == (False, True)


# -- a task the handler left running -------------------------------------------------------


@pytest.mark.parametrize("through", ["session", "connection"])
def test_a_task_left_by_a_handler_cannot_write_on_the_next_jobs_transaction(
    engine: Engine, database_url: str, table: str, through: str
) -> None:
    """A handler starts a task and returns without awaiting it; the task writes through
    ``job.session`` or ``job.connection`` once that job is done, while the worker's connection
    runs the next job. Its statement is refused (that job's transaction is not its own), and
    the next job is untouched by it."""
    registry = JobRegistry()
    attempted = asyncio.Event()
    outcome: list[object] = []
    leftovers: list[asyncio.Task[None]] = []

    @registry.job("Leaves")
    async def leaves(job: AsyncJobContext) -> None:
        session = job.session if through == "session" else None
        connection = job.connection

        async def later() -> None:
            await wait_until(lambda: len(job_rows(engine)) == 1, "the first job to be done")
            late = text(f"INSERT INTO {table} VALUES (0, 'late')")
            try:
                if session is not None:
                    await session.execute(late)
                else:
                    await connection.execute(late)
            except QueError as error:
                outcome.append(error)
            else:
                outcome.append("ran")
            finally:
                attempted.set()

        leftovers.append(asyncio.get_running_loop().create_task(later()))

    @registry.job("Next")
    async def next_job(job: AsyncJobContext, uses_database: bool) -> None:
        await asyncio.wait_for(attempted.wait(), 10)
        if uses_database:
            insert = text(f"INSERT INTO {table} VALUES (:id, 'next')")
            await job.session.execute(insert, {"id": job.job_id})

    add_job(engine, "Leaves", priority=1)
    uses_database = through == "session"
    next_id = add_job(engine, "Next", uses_database, priority=2)

    async def main() -> AsyncWorkerPool:
        worker_engine = pooled_engine(database_url, 1)
        try:
            pool = AsyncWorkerPool(worker_engine, registry, concurrency=1, listen=False)
            await pool.run(burst=True)
            await asyncio.gather(*leftovers, return_exceptions=True)
            return pool
        finally:
            await worker_engine.dispose()

    pool = run(main)
    assert pool.failed == 0, job_rows(engine)
    assert len(outcome) == 1 and isinstance(outcome[0], QueError), outcome
    assert "after its job ended" in str(outcome[0])
    assert rows(engine, table) == ([(next_id, "next")] if uses_database else [])
    assert job_rows(engine) == []
    assert held_job_locks(engine) == []


# -- prepared statements ---------------------------------------------------------------------


@pytest.mark.parametrize("prepare_threshold", [0, None])
def test_the_workers_statements_survive_psycopg_deallocating_them(
    engine: Engine, database_url: str, table: str, prepare_threshold: int | None, caplog: Any
) -> None:
    """With ``prepare_threshold=0`` psycopg prepares the statements it runs before the worker
    takes the connection, and answers a handler's ``ROLLBACK TO SAVEPOINT`` by deallocating
    every prepared statement, the worker's too; ``None`` (as behind PgBouncer) prepares none.
    Either way the worker keeps its one connection, with no database error."""
    caplog.set_level(logging.WARNING, logger="sqlalchemy_que.worker")
    registry = JobRegistry()
    pids: list[int] = []

    @registry.job("Partial")
    async def partial(job: AsyncJobContext) -> None:
        await job.session.execute(
            text(f"INSERT INTO {table} VALUES (:id, 'undone')"), {"id": job.job_id}
        )
        await job.session.rollback()
        pid = (await job.session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        pids.append(pid)

    ids = [add_job(engine, "Partial") for _ in range(3)]

    async def main() -> None:
        connect_args = {"prepare_threshold": prepare_threshold}
        worker_engine = pooled_engine(database_url, 1, connect_args=connect_args)
        try:
            async with worker_engine.begin() as connection:  # the application's own use
                for _ in range(3):
                    await connection.execute(text("SELECT count(*) FROM que_jobs"))
            pool = AsyncWorkerPool(
                worker_engine, registry, concurrency=1, listen=False, batch_size=1
            )
            await pool.run(burst=True)
            async with worker_engine.connect() as connection:
                raw = (await connection.get_raw_connection()).driver_connection
                assert raw is not None and raw.prepare_threshold == prepare_threshold
        finally:
            await worker_engine.dispose()

    run(main)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert len(pids) == len(ids) and len(set(pids)) == 1, pids
    assert job_rows(engine) == [] and rows(engine, table) == []


# -- the database restarting under a running pool --------------------------------------------


def test_a_running_pool_survives_a_database_outage_and_works_the_next_job(
    engine: Engine, empty_database_url: str, caplog: Any
) -> None:
    """The database stops taking connections and ends every session (the worker's pooled
    connections and the listener's), then comes back: the pool, which never stopped, works
    the next job, woken by its listener again."""
    caplog.set_level(logging.WARNING, logger="sqlalchemy_que")
    sync_engine = create_engine(empty_database_url, poolclass=NullPool)
    sqlalchemy_que.migrate(sync_engine)
    registry = JobRegistry()
    worked: list[int] = []

    @registry.job("Job")
    async def record(job: AsyncJobContext) -> None:
        await job.connection.execute(text("SELECT 1"))
        worked.append(job.job_id)

    def listener_retries() -> int:
        return sum("cannot open the listening" in r.getMessage() for r in list(caplog.records))

    async def main() -> None:
        worker_engine = pooled_engine(empty_database_url, 3)
        pool = AsyncWorkerPool(worker_engine, registry, concurrency=2, wake_interval=60)
        await pool.start()
        try:
            assert pool.listener is not None
            await asyncio.wait_for(pool.listener.connected.wait(), 10)
            first = add_job(sync_engine, "Job")
            await wait_until(lambda: worked == [first], "the first job")
            database_outage(engine, empty_database_url, down=True)
            await wait_until(lambda: listener_retries() >= 3, "the listener to retry 3 times")
            database_outage(engine, empty_database_url, down=False)
            await asyncio.wait_for(pool.listener.connected.wait(), 15)
            second = add_job(sync_engine, "Job")
            await wait_until(lambda: worked == [first, second], "a job after the outage", 20)
            assert pool.failed == 0
        finally:
            database_outage(engine, empty_database_url, down=False)
            await pool.stop(5)
            await worker_engine.dispose()

    try:
        run(main, timeout=60)
    finally:
        database_outage(engine, empty_database_url, down=False)
        sync_engine.dispose()


# -- stop() and start() ------------------------------------------------------------------------


@pytest.mark.parametrize("starting", ["start", "run"])
def test_a_pool_stopped_while_it_starts_starts_nothing(
    engine: Engine, async_engine: AsyncEngine, starting: str
) -> None:
    """``stop()`` runs while ``start()`` (by itself, or inside ``run()``) waits for its
    schema check: it then starts no task, no listener and no scheduler thread, which nothing
    would stop afterwards, and ``run()`` returns having worked nothing."""
    registry = JobRegistry()

    @registry.job("Hourly", schedule=every(3600))
    async def hourly(job: AsyncJobContext) -> None:
        pass

    add_job(engine, "Hourly")

    async def main() -> AsyncWorkerPool:
        pool = AsyncWorkerPool(async_engine, registry, concurrency=1, wake_interval=0.05)
        # gather() runs start() up to its first wait (the connection), then stop().
        starts = pool.start() if starting == "start" else pool.run()
        started, cancelled = await asyncio.gather(starts, pool.stop(5))
        assert cancelled == [] and started in (None, 0)
        assert pool.listener is not None and pool.listener._task is None
        assert all(task.done() for task in pool._running)
        assert await pool.run() == 0  # returns at once: the pool is stopped
        return pool

    pool = run(main)
    assert pool.scheduler is None and scheduler_threads() == []
    assert [row["job_class"] for row in job_rows(engine)] == ["Hourly"]  # not worked


# -- what the sync worker's tests check, on the async pool --------------------------------------


@pytest.mark.parametrize(
    ("isolation_level", "job_isolation"),
    [("AUTOCOMMIT", "read committed"), ("REPEATABLE READ", "repeatable read")],
)
def test_the_engines_settings_survive_the_async_worker_on_its_one_connection(
    engine: Engine, database_url: str, table: str, isolation_level: str, job_isolation: str
) -> None:
    """As the sync worker's test: the job's writes are one transaction with its completion
    even on an AUTOCOMMIT engine, and the very connection the worker used goes back to the
    pool with the settings it came with, no transaction and no advisory lock."""
    registry = JobRegistry()
    seen: list[tuple[int, str]] = []

    @registry.job("Writes")
    async def writes(job: AsyncJobContext) -> None:
        insert = text(f"INSERT INTO {table} VALUES (:id, 'written')")
        await job.connection.execute(insert, {"id": job.job_id})
        pid = (await job.connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        level = (await job.connection.execute(text("SHOW transaction_isolation"))).scalar_one()
        await job.connection.execute(text("SELECT pg_advisory_lock(7, 7)"))  # its own lock
        seen.append((pid, level))

    @registry.job("Fails", retry_delay=60)
    async def fails(job: AsyncJobContext) -> None:
        insert = text(f"INSERT INTO {table} VALUES (:id, 'rolled back')")
        await job.connection.execute(insert, {"id": job.job_id})
        raise RuntimeError("after writing")

    written = add_job(engine, "Writes", priority=1)
    add_job(engine, "Fails", priority=2)

    def settings(raw: Any) -> tuple[object, ...]:
        return (raw.autocommit, raw.isolation_level, raw.read_only, raw.deferrable)

    async def main() -> tuple[tuple[object, ...], tuple[object, ...], int, int]:
        worker_engine = pooled_engine(database_url, 1, isolation_level=isolation_level)
        try:
            async with worker_engine.connect() as connection:
                before = settings((await connection.get_raw_connection()).driver_connection)
            pool = AsyncWorkerPool(worker_engine, registry, concurrency=1, listen=False)
            assert await pool.run(burst=True) == 2
            async with worker_engine.connect() as connection:
                after = settings((await connection.get_raw_connection()).driver_connection)
                pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                own_locks = (
                    await connection.execute(
                        text(
                            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND pid = pg_backend_pid()"
                        )
                    )
                ).scalar_one()
            return before, after, pid, own_locks
        finally:
            await worker_engine.dispose()

    before, after, pid, own_locks = run(main)
    ((worker_pid, level),) = seen
    assert level == job_isolation
    assert after == before and pid == worker_pid and own_locks == 0
    assert rows(engine, table) == [(written, "written")]
    assert [row["job_class"] for row in job_rows(engine)] == ["Fails"]
    assert held_job_locks(engine) == []


# -- cancellation inside the worker's own round trips -------------------------------------------


@pytest.mark.parametrize("step", ["lock", "recheck", "complete"])
def test_a_cancel_inside_a_round_trip_leaves_no_lock_or_transaction_on_the_pooled_connection(
    engine: Engine, database_url: str, table: str, step: str
) -> None:
    """The task is cancelled while it waits for the answer to the lock query, the re-check or
    the completion (after the handler wrote): the session is then discarded at check-in, so
    the pool's next connection has no transaction and no lock, and the job is either done
    with its write or still there, unlocked."""
    job_id = add_job(engine, "Job")

    async def main() -> tuple[Any, int]:
        worker_engine = pooled_engine(database_url, 1)
        session = AsyncLockedSession(worker_engine)
        try:
            await session.checkout()

            async def work() -> None:
                (job,) = await session.lock("", 1)
                session.begin_job()
                insert = text(f"INSERT INTO {table} VALUES (:id, 'written')")
                await session.job_connection().execute(insert, {"id": job.job_id})
                await session.complete(job)

            def at_step() -> bool:
                if not session._broken:  # not waiting for an answer
                    return False
                if step == "lock":
                    return not session.held
                if step == "recheck":
                    return bool(session.held) and not session.in_transaction
                return session._job_run is None  # complete() has begun

            task = asyncio.ensure_future(work())
            while not at_step():
                assert not task.done(), task
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await session.checkin()
            async with worker_engine.connect() as connection:
                raw = (await connection.get_raw_connection()).driver_connection
                assert raw is not None
                status = raw.info.transaction_status
                locks = (
                    await connection.execute(
                        text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
                    )
                ).scalar_one()
            return status, locks
        finally:
            await session.discard()
            await worker_engine.dispose()

    status, locks = run(main)
    assert status == psycopg.pq.TransactionStatus.IDLE and locks == 0
    assert held_job_locks(engine) == []
    remaining = [row["job_id"] for row in job_rows(engine)]
    outcomes: list[tuple[list[int], list[tuple[int, str]]]] = [
        ([job_id], [])
    ]  # before the completion: the job kept, its write rolled back
    if step == "complete":  # the commit may have gone through: then with its write
        outcomes.append(([], [(job_id, "written")]))
    assert (remaining, rows(engine, table)) in outcomes


def test_a_stopped_pool_refuses_to_start_again(engine: Engine, async_engine: AsyncEngine) -> None:
    registry = JobRegistry()

    @registry.job("Once")
    async def once(job: AsyncJobContext) -> None:
        pass

    async def main() -> list[str]:
        errors = []
        pool = AsyncWorkerPool(async_engine, registry, concurrency=1, listen=False)
        async with pool:
            pass
        with pytest.raises(WorkerError, match="already started") as started_twice:
            await pool.start()
        errors.append(str(started_twice.value))
        never = AsyncWorkerPool(async_engine, registry, concurrency=1, listen=False)
        await never.stop()
        with pytest.raises(WorkerError, match="stopped before it started") as stopped_first:
            await never.start()
        errors.append(str(stopped_first.value))
        assert await never.run() == 0 and never._running == []
        return errors

    assert len(run(main)) == 2
    assert held_job_locks(engine) == []


def test_cancelling_the_pool_while_a_task_writes_its_crash_marks_leaves_none_behind(
    engine: Engine, database_url: str
) -> None:
    """``pool.run()`` is cancelled while a task waits for the answer to the re-check that
    writes the batch's crash marks (held here by an uncommitted mark of another session on
    the job, so that the cancellation lands inside that round trip). The server commits the
    marks whatever becomes of the client's wait: a task cut short there leaves them behind,
    and the job's next run counts as a crash of a worker that was only shut down. The task
    must end the round trip and release the job, its mark deleted, as at a shutdown."""
    registry = JobRegistry()
    runs: list[int] = []

    @registry.job("Job")
    async def job(context: AsyncJobContext) -> None:
        runs.append(context.job_id)

    job_id = add_job(engine, "Job")
    blocker = engine.connect()

    def others(condition: str) -> int:
        with engine.connect() as connection:
            return int(
                connection.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND pid <> pg_backend_pid() AND " + condition
                    )
                ).scalar_one()
            )

    async def main() -> None:
        worker_engine = pooled_engine(database_url, 2)
        try:
            pool = AsyncWorkerPool(
                worker_engine, registry, concurrency=1, listen=False, wake_interval=0.05
            )
            running = asyncio.ensure_future(pool.run())
            await wait_until(
                lambda: others("wait_event_type = 'Lock'"), "the re-check to wait on the mark"
            )
            running.cancel()
            # The pool is stopping (its tasks told so) while the statement still waits.
            await wait_until(lambda: pool.stopping, "the cancellation to reach the pool")
            blocker.rollback()
            done, _ = await asyncio.wait([running], timeout=15)
            assert done and running.cancelled()
        finally:
            await worker_engine.dispose()

    try:
        blocker.execute(
            text("INSERT INTO que_job_runs (job_id, started_at, pid) VALUES (:id, now(), 0)"),
            {"id": job_id},
        )
        run(main)
    finally:
        blocker.rollback()
        blocker.close()

    async def settled() -> None:  # a server session cut off by its client ends on its own
        await wait_until(lambda: not others("state <> 'idle'"), "the worker's session to end")

    run(settled)
    assert runs == []
    assert held_job_locks(engine) == []
    assert crash_marks(engine) == []
    (row,) = job_rows(engine)
    assert row["job_id"] == job_id and row["error_count"] == 0
