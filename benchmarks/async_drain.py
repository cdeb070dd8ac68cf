"""Drain throughput of the async worker, beside the sync pool's in the same run.

Each entry drains pre-enqueued jobs with a burst pool in this process (``listen=False``,
connections opened beforehand):

* an :class:`~sqlalchemy_que.AsyncWorkerPool` of N tasks on an ``AsyncEngine``
  (``pool_size = N + 2``), timed from ``run(burst=True)`` to its return, on a fresh event
  loop; or
* a :class:`~sqlalchemy_que.WorkerPool` of N threads, for the sync figures of the same
  handler.

The handler either does nothing (``noop``, as :mod:`benchmarks.drain`), or one write through
``job.session`` (``write``: an ``INSERT`` of the job's id into ``bench_writes``, committed
with the job's completion), which measures the job's own transaction: its ``BEGIN``, the
handler's statement through SQLAlchemy's ORM session, and a commit that carries both.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from sqlalchemy_que import AsyncJobContext, AsyncWorkerPool, JobContext, WorkerPool

from .database import JOB_CLASS, BenchDatabase
from .drain import noop, open_connections
from .measure import Run, take, take_end

__all__ = ["ASYNC_PLAN", "AsyncDrain"]

_WRITE = text("INSERT INTO bench_writes (job_id) VALUES (:job_id)")


async def async_noop(job: AsyncJobContext, *args: Any) -> None:
    """The async twin of :func:`benchmarks.drain.noop`."""


async def async_write(job: AsyncJobContext, *args: Any) -> None:
    await job.session.execute(_WRITE, {"job_id": job.job_id})


def sync_write(job: JobContext, *args: Any) -> None:
    job.session.execute(_WRITE, {"job_id": job.job_id})


@dataclasses.dataclass(frozen=True)
class AsyncDrain:
    """One figure: ``workers`` tasks (``asyncio``) or threads (``sync``), ``noop`` or
    ``write`` handlers."""

    workers: int
    kind: str = "async"  # or "sync"
    write: bool = False

    @property
    def key(self) -> str:
        handler = ".write" if self.write else ""
        if self.kind == "async":
            return f"drain.async{handler}.tasks.{self.workers}"
        return f"drain{handler}.threads.{self.workers}"

    @property
    def label(self) -> str:
        runner = "AsyncWorkerPool" if self.kind == "async" else "WorkerPool"
        unit = "tasks" if self.kind == "async" else "threads"
        handler = "one write through job.session" if self.write else "no-op"
        return f"{runner}, {self.workers} {unit}, {handler}"

    @property
    def ceiling(self) -> str:
        return f"ceiling.cycle.{min(self.workers, 8)}"

    def measure(self, database: BenchDatabase, jobs: int) -> Run:
        database.refill(jobs)
        with database.admin.begin() as connection:
            connection.execute(text("CREATE TABLE IF NOT EXISTS bench_writes (job_id bigint)"))
            connection.execute(text("TRUNCATE bench_writes"))
        if self.kind == "async":
            return asyncio.run(self._measure_async(database, jobs))
        return self._measure_sync(database, jobs)

    def _measure_sync(self, database: BenchDatabase, jobs: int) -> Run:
        engine = database.engine(pool_size=self.workers + 2)
        handler = sync_write if self.write else noop
        try:
            open_connections(engine, self.workers)
            pool = WorkerPool(
                engine, {JOB_CLASS: handler}, workers=self.workers, listen=False, check_schema=False
            )
            start = take(database.server_cpu)
            pool.start(burst=True)
            pool.join()
            end = take_end(database.server_cpu)
        finally:
            engine.dispose()
        return self._run(database, jobs, start, end)

    async def _measure_async(self, database: BenchDatabase, jobs: int) -> Run:
        engine = create_async_engine(database.url, pool_size=self.workers + 2)
        handler = async_write if self.write else async_noop
        try:
            connections = [await engine.connect() for _ in range(self.workers)]
            for connection in connections:
                await connection.exec_driver_sql("SELECT 1")
                await connection.close()
            pool = AsyncWorkerPool(
                engine,
                {JOB_CLASS: handler},
                concurrency=self.workers,
                listen=False,
                check_schema=False,
            )
            start = take(database.server_cpu)
            await pool.run(burst=True)
            end = take_end(database.server_cpu)
        finally:
            await engine.dispose()
        return self._run(database, jobs, start, end)

    def _run(self, database: BenchDatabase, jobs: int, start: Any, end: Any) -> Run:
        left = database.count()
        with database.admin.connect() as connection:
            written = connection.execute(text("SELECT count(*) FROM bench_writes")).scalar_one()
        return Run.between(
            start,
            end,
            (jobs - left) / (end.wall - start.wall),
            detail={
                "workers": self.workers,
                "kind": self.kind,
                "jobs": jobs,
                "left_behind": left,
                "written": written,
            },
        )


#: The async pool's drains, each beside the sync pool's with the same handler and as many
#: threads as it has tasks (the sync no-op figures are drain.PLAN's ``drain.threads.N``).
ASYNC_PLAN: tuple[AsyncDrain, ...] = (
    AsyncDrain(workers=1),
    AsyncDrain(workers=4),
    AsyncDrain(workers=16),
    AsyncDrain(workers=4, kind="sync", write=True),
    AsyncDrain(workers=4, write=True),
    AsyncDrain(workers=16, write=True),
)
