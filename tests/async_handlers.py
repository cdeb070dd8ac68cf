"""Handlers for the async worker's CLI and fault tests (``tests/test_async_worker.py``).

``registry`` has two ``async def`` handlers: ``AsyncRecord`` inserts ``(job_id, runner)`` into
the table named by its argument through ``job.session`` (so in the job's transaction),
``runner`` saying that it ran in a task of the event loop; ``AsyncBlock`` records its start
and waits until it is cancelled.

Run as ``python -m tests.async_handlers block --url URL --app-name NAME``, it works one
``Block`` job in an AsyncWorkerPool: the handler inserts into ``que_fault_async_started`` on a
separate autocommit connection, then waits until the process is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from sqlalchemy_que import AsyncJobContext, AsyncWorkerPool, JobRegistry

registry = JobRegistry()


@registry.job("AsyncRecord")
async def record(job: AsyncJobContext, table: str) -> None:
    if not table.isidentifier():
        raise ValueError(f"not a table name: {table!r}")
    runner = "task" if asyncio.current_task() is not None else "thread"
    await job.session.execute(
        text(f"INSERT INTO {table} (job_id, worker) VALUES (:job_id, :runner)"),
        {"job_id": job.job_id, "runner": runner},
    )


@registry.job("AsyncBlock")
async def block_forever(job: AsyncJobContext, table: str) -> None:
    """Record the start (committed at once, on a connection of its own), write in the job's
    transaction, then wait until cancelled."""
    if not table.isidentifier():
        raise ValueError(f"not a table name: {table!r}")
    await job.session.execute(text(f"INSERT INTO {table} (job_id, worker) VALUES (0, 'x')"))
    recorder = create_async_engine(job.connection.engine.url, isolation_level="AUTOCOMMIT")
    try:
        async with recorder.connect() as connection:
            await connection.execute(
                text(f"INSERT INTO {table} (job_id, worker) VALUES (:id, 'started')"),
                {"id": job.job_id},
            )
    finally:
        await recorder.dispose()
    await asyncio.Event().wait()


async def _block(url: str, app_name: str) -> None:
    engine = create_async_engine(
        make_url(url).set(drivername="postgresql+psycopg"),
        connect_args={"application_name": app_name},
    )
    recorder = create_async_engine(
        make_url(url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
    )
    blocks = JobRegistry()

    @blocks.job("Block")
    async def block(job: AsyncJobContext, table: str) -> None:
        await job.session.execute(text(f"INSERT INTO {table} (job_id, worker) VALUES (0, 'x')"))
        async with recorder.connect() as connection:
            await connection.execute(
                text(f"INSERT INTO {table} (job_id, worker) VALUES (:id, 'started')"),
                {"id": job.job_id},
            )
        await asyncio.Event().wait()  # until killed

    async with AsyncWorkerPool(engine, blocks, concurrency=1, wake_interval=0.05) as pool:
        await pool.run()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.async_handlers")
    parser.add_argument("mode", choices=["block"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--app-name", required=True)
    args = parser.parse_args()
    asyncio.run(_block(args.url, args.app_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
