"""Async forms, for applications on SQLAlchemy's ``AsyncEngine`` and ``AsyncSession``.

The ORM form needs nothing new: :func:`~sqlalchemy_que.enqueue` builds a job that an
``AsyncSession`` inserts at its next flush, with its wake-up ``NOTIFY``, in the session's
transaction. The Core, bulk and admin functions (those of the package and of
:mod:`sqlalchemy_que.admin`) have awaitable twins here, with the names, parameters, checks and
errors of the sync ones (``sqlalchemy_que.admin.clear``'s twin is :func:`clear_jobs`, since
:func:`clear` is the package's)::

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
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from . import _stats as _stats
from . import admin as _admin
from ._async_context import AsyncJobContext
from ._async_pool import AsyncWorkerPool
from ._enqueue import insert_job as _insert_job
from ._enqueue import insert_jobs as _insert_jobs
from ._enqueue import insert_many as _insert_many
from ._errors import InvalidJobError
from ._model import QueJob
from ._stats import JobStats, WorkerState
from .admin import Cleared, Counts, JobInfo, Outcome

if TYPE_CHECKING:
    from ._jobs import JobDefinition

__all__ = [
    "AsyncBind",
    "AsyncJobContext",
    "AsyncWorkerPool",
    "cancel",
    "clear",
    "clear_jobs",
    "counts",
    "delete",
    "get_job",
    "insert_job",
    "insert_jobs",
    "insert_many",
    "job_stats",
    "list_jobs",
    "purge_failed",
    "retry",
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


async def _operate(
    bind: AsyncEngine | AsyncConnection,
    function: Any,
    *args: Any,
    write: bool = True,
    **kw: Any,
) -> Any:
    """Run a sync admin or stats function: given an AsyncEngine, on a connection of its own
    (in a transaction that commits, for a ``write``); given an AsyncConnection, in the
    caller's transaction."""
    if isinstance(bind, AsyncEngine):
        async with bind.begin() if write else bind.connect() as connection:
            return await _operate(connection, function, *args, **kw)
    if not isinstance(bind, AsyncConnection):
        sync_module = (
            "sqlalchemy_que.admin" if function.__module__ == _admin.__name__ else "sqlalchemy_que"
        )
        raise TypeError(
            f"this awaitable form of {sync_module}.{function.__name__}() takes an AsyncEngine "
            f"or AsyncConnection, got {bind!r} of type {type(bind).__name__}; with a sync "
            f"Engine or Connection use {sync_module}.{function.__name__}()"
        )
    return await bind.run_sync(function, *args, **kw)


async def job_stats(bind: AsyncEngine | AsyncConnection) -> list[JobStats]:
    """One row per ``(queue, job_class)``; :func:`sqlalchemy_que.job_stats`, awaited."""
    result: list[JobStats] = await _operate(bind, _stats.job_stats, write=False)
    return result


async def worker_states(bind: AsyncEngine | AsyncConnection) -> list[WorkerState]:
    """Every job locked right now; :func:`sqlalchemy_que.worker_states`, awaited."""
    result: list[WorkerState] = await _operate(bind, _stats.worker_states, write=False)
    return result


async def clear(bind: AsyncEngine | AsyncConnection) -> int:
    """Delete every job; :func:`sqlalchemy_que.clear`, awaited.

    Given an AsyncEngine it commits; given an AsyncConnection it runs in the caller's
    transaction.
    """
    result: int = await _operate(bind, _stats.clear)
    return result


# -- sqlalchemy_que.admin, awaited ---------------------------------------------------------


async def list_jobs(
    bind: AsyncEngine | AsyncConnection,
    *,
    queue: str | None = None,
    job_class: str | None = None,
    errored: bool = False,
    scheduled: bool = False,
    failed: bool = False,
    limit: int = 100,
) -> list[JobInfo]:
    """Jobs in the order workers take them (or the failed ones); :func:`sqlalchemy_que.admin.
    list_jobs`, awaited."""
    result: list[JobInfo] = await _operate(
        bind,
        _admin.list_jobs,
        queue=queue,
        job_class=job_class,
        errored=errored,
        scheduled=scheduled,
        failed=failed,
        limit=limit,
    )
    return result


async def get_job(bind: AsyncEngine | AsyncConnection, job_id: int) -> JobInfo | None:
    """One job in full, waiting or failed; :func:`sqlalchemy_que.admin.get_job`, awaited."""
    result: JobInfo | None = await _operate(bind, _admin.get_job, job_id)
    return result


async def counts(bind: AsyncEngine | AsyncConnection) -> Counts:
    """Jobs by state; :func:`sqlalchemy_que.admin.counts`, awaited."""
    result: Counts = await _operate(bind, _admin.counts)
    return result


async def retry(bind: AsyncEngine | AsyncConnection, job_ids: Iterable[int]) -> Outcome:
    """Make jobs ready now (failed ones back into ``que_jobs``); never a locked one:
    :func:`sqlalchemy_que.admin.retry`, awaited."""
    result: Outcome = await _operate(bind, _admin.retry, list(job_ids))
    return result


async def delete(bind: AsyncEngine | AsyncConnection, job_ids: Iterable[int]) -> Outcome:
    """Delete waiting or failed jobs; never a locked one: :func:`sqlalchemy_que.admin.delete`,
    awaited."""
    result: Outcome = await _operate(bind, _admin.delete, list(job_ids))
    return result


async def clear_jobs(
    bind: AsyncEngine | AsyncConnection,
    *,
    queue: str | None = None,
    job_class: str | None = None,
    failed: bool = False,
) -> Cleared:
    """Delete the waiting (or failed) jobs matching the filters, leaving locked ones:
    :func:`sqlalchemy_que.admin.clear`, awaited."""
    result: Cleared = await _operate(
        bind, _admin.clear, queue=queue, job_class=job_class, failed=failed
    )
    return result


async def cancel(
    bind: AsyncEngine | AsyncConnection, job_id: int
) -> Literal["cancelled", "requested", "missing"]:
    """Cancel a job (``"cancelled"``, ``"requested"`` or ``"missing"``):
    :func:`sqlalchemy_que.admin.cancel`, awaited."""
    result: Literal["cancelled", "requested", "missing"] = await _operate(
        bind, _admin.cancel, job_id
    )
    return result


async def purge_failed(
    bind: AsyncEngine | AsyncConnection, *, older_than: datetime.timedelta | float
) -> int:
    """Delete failed jobs older than ``older_than``: :func:`sqlalchemy_que.admin.purge_failed`,
    awaited."""
    result: int = await _operate(bind, _admin.purge_failed, older_than=older_than)
    return result
