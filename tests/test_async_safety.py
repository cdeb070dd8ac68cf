"""The async worker under cancellation from outside the pool, stray tasks and faults: what
``tests/test_async_worker.py`` does not reach. The pool's tasks are cancelled the way an
application cancels them (the task running ``pool.run()``); a handler's leftover task uses
the job's session after the job ended; the engines have a real connection pool, so that a
connection given back with a lock or a transaction would be seen by the next checkout.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sqlalchemy_que import AsyncJobContext, AsyncWorkerPool, JobRegistry, QueError, every

from .helpers import add_job, held_job_locks, job_rows
from .test_async_worker import crash_marks, rows, run, table, wait_until

__all__ = ["table"]  # a fixture of test_async_worker, used here too


def pooled_engine(database_url: str, size: int, **options: Any) -> AsyncEngine:
    """An AsyncEngine with a real pool of ``size`` connections (made on the running loop)."""
    url = make_url(database_url).set(drivername="postgresql+psycopg")
    return create_async_engine(url, pool_size=size, max_overflow=0, **options)


def scheduler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "que-scheduler" and t.is_alive()]


# -- cancelling the task that runs the pool ------------------------------------------------


@pytest.mark.parametrize("awaiting", ["event", "statement"])
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
    if awaiting == "event":
        assert crash_marks(engine) == []  # released untouched, as at a shutdown


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
