"""Async forms, for applications on SQLAlchemy's ``AsyncEngine`` and ``AsyncSession``.

The ORM form needs nothing new: :func:`~sqlalchemy_que.enqueue` builds a job that an
``AsyncSession`` inserts at its next flush, with its wake-up ``NOTIFY``, in the session's
transaction. The Core, bulk and admin functions have awaitable twins here, with the names,
parameters, checks and errors of the sync ones::

    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy_que import enqueue
    from sqlalchemy_que.asyncio import insert_job, job_stats

    engine = create_async_engine("postgresql+psycopg://...")

    async with AsyncSession(engine) as session:
        session.add(enqueue("SendEmail", 42))
        await session.commit()

    async with engine.begin() as connection:
        job_id = await insert_job(connection, "SendEmail", 42)

    print(await job_stats(engine))

Each runs the sync function on the ``AsyncConnection``'s own connection (SQLAlchemy's
``run_sync``), so the statements, the transaction and the one-wake-up-per-transaction rule
are exactly the sync ones. Every field is checked before anything is sent. Nothing here
creates an event loop, and the sync API never imports this module.

:class:`AsyncWorkerPool` works jobs with ``async def`` handlers as tasks on the running event
loop (see ``docs/asyncio.md``).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from . import _stats as _stats
from ._async_context import AsyncJobContext
from ._async_pool import AsyncWorkerPool
from ._enqueue import insert_job as _insert_job
from ._enqueue import insert_jobs as _insert_jobs
from ._enqueue import insert_many as _insert_many
from ._errors import InvalidJobError
from ._model import QueJob
from ._stats import JobStats, WorkerState

if TYPE_CHECKING:
    from ._jobs import JobDefinition

__all__ = [
    "AsyncBind",
    "AsyncJobContext",
    "AsyncWorkerPool",
    "clear",
    "insert_job",
    "insert_jobs",
    "insert_many",
    "job_stats",
    "worker_states",
]

#: What the async Core forms accept as "the caller's transaction".
AsyncBind = AsyncConnection | AsyncSession


def _check_bind(bind: object, name: str) -> None:
    if not isinstance(bind, AsyncConnection | AsyncSession):
        raise InvalidJobError(
            f"sqlalchemy_que.asyncio.{name}() takes an AsyncConnection or AsyncSession, got "
            f"{bind!r} of type {type(bind).__name__}; with a sync Connection or Session use "
            f"sqlalchemy_que.{name}()"
        )


async def insert_job(
    bind: AsyncBind,
    job_class: str | JobDefinition[Any],
    *args: Any,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime.datetime | None = None,
    run_in: datetime.timedelta | float | None = None,
) -> int:
    """Insert one job in ``bind``'s transaction; :func:`sqlalchemy_que.insert_job`, awaited.

    :returns: the new job's ``job_id``.
    :raises InvalidJobError: naming the bad value, before anything is sent.
    """
    _check_bind(bind, "insert_job")

    def insert(sync: Any) -> int:
        return _insert_job(
            sync, job_class, *args, queue=queue, priority=priority, run_at=run_at, run_in=run_in
        )

    result: int = await bind.run_sync(insert)
    return result


async def insert_jobs(bind: AsyncBind, jobs: Iterable[QueJob]) -> int:
    """Insert many jobs with ``COPY`` in ``bind``'s transaction;
    :func:`sqlalchemy_que.insert_jobs`, awaited.

    :returns: the number of jobs inserted.
    :raises InvalidJobError: naming the bad job and value, before anything is sent.
    """
    _check_bind(bind, "insert_jobs")
    listed = list(jobs)
    result: int = await bind.run_sync(_insert_jobs, listed)
    return result


async def insert_many(
    bind: AsyncBind,
    job_class: str | JobDefinition[Any],
    arguments: Iterable[Sequence[Any]],
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime.datetime | None = None,
    run_in: datetime.timedelta | float | None = None,
) -> int:
    """Insert many jobs of one class with ``COPY``; :func:`sqlalchemy_que.insert_many`, awaited.

    :returns: the number of jobs inserted.
    :raises InvalidJobError: naming the bad argument list and value, before anything is sent.
    """
    _check_bind(bind, "insert_many")
    listed = list(arguments)
    result: int = await bind.run_sync(
        _insert_many,
        job_class,
        listed,
        queue=queue,
        priority=priority,
        run_at=run_at,
        run_in=run_in,
    )
    return result


async def _read(bind: AsyncEngine | AsyncConnection, function: Any) -> Any:
    if isinstance(bind, AsyncEngine):
        async with bind.connect() as connection:
            return await connection.run_sync(function)
    if not isinstance(bind, AsyncConnection):
        raise TypeError(
            f"expected an AsyncEngine or AsyncConnection, got {bind!r} of type "
            f"{type(bind).__name__}"
        )
    return await bind.run_sync(function)


async def job_stats(bind: AsyncEngine | AsyncConnection) -> list[JobStats]:
    """One row per ``(queue, job_class)``; :func:`sqlalchemy_que.job_stats`, awaited."""
    result: list[JobStats] = await _read(bind, _stats.job_stats)
    return result


async def worker_states(bind: AsyncEngine | AsyncConnection) -> list[WorkerState]:
    """Every job locked right now; :func:`sqlalchemy_que.worker_states`, awaited."""
    result: list[WorkerState] = await _read(bind, _stats.worker_states)
    return result


async def clear(bind: AsyncEngine | AsyncConnection) -> int:
    """Delete every job; :func:`sqlalchemy_que.clear`, awaited.

    Given an AsyncEngine it commits; given an AsyncConnection it runs in the caller's
    transaction.
    """
    if isinstance(bind, AsyncEngine):
        async with bind.begin() as connection:
            return await clear(connection)
    result: int = await _read(bind, _stats.clear)
    return result
