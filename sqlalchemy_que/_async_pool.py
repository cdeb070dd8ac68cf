"""The async worker pool: many jobs at once, as tasks on the running event loop.

::

    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy_que import AsyncJobContext, AsyncWorkerPool, JobRegistry

    jobs = JobRegistry()

    @jobs.job("SendWelcome")
    async def send_welcome(job: AsyncJobContext, user_id: int) -> None:
        user = await job.session.get(User, user_id)
        user.welcomed = True  # committed with the job's completion

    engine = create_async_engine("postgresql+psycopg://...")
    async with AsyncWorkerPool(engine, jobs, concurrency=20) as pool:
        await pool.run()  # until pool.stop() (or, with burst=True, until no job is ready)

Each of the ``concurrency`` worker tasks works like a sync :class:`~sqlalchemy_que.Worker`:
it holds one connection (an :class:`~sqlalchemy_que._async_session.AsyncLockedSession`)
while it has jobs, locks a batch of them, runs their handlers one after the other, and
completes each in the transaction of the handler's writes. The locking rules, the statements,
the crash marks, the retry and failure rules and the hooks are the sync worker's.

A registry may mix ``async def`` and plain ``def`` handlers: a plain handler runs on the
loop's thread too (SQLAlchemy's greenlet bridge), with a sync ``Session`` on the job's
connection, and blocks the other tasks while it computes. Run slow blocking handlers in a
sync :class:`~sqlalchemy_que.WorkerPool` on queues of their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine

from ._async_listener import AsyncListener
from ._async_tasks import end_task
from ._async_worker import AsyncWorker
from ._errors import QueError, WorkerError
from ._jobs import check_max_attempts, check_timeout
from ._pool import _assignments, _pool_capacity
from ._scheduler import Scheduler
from ._session import LockedJob
from ._worker import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_HOLD,
    ErrorReporter,
    Handlers,
    _check_seconds,
    check_batch_size,
    registry_of,
)
from .schema import check_schema as _check_schema

__all__ = ["AsyncWorkerPool"]

logger = logging.getLogger("sqlalchemy_que.worker")

#: Seconds a task interrupted by shutdown may take to release its job before it is
#: cancelled outright (its connection then discarded, which releases the lock too).
_STUCK = 10.0

#: Worker tasks of a pool unless told otherwise.
DEFAULT_CONCURRENCY = 10


class AsyncWorkerPool:
    """Worker tasks on one ``AsyncEngine`` (psycopg's async driver), on the running loop.

    Usable as an async context manager: entering starts the tasks, leaving stops them (as
    :meth:`stop` with ``shutdown_timeout``). Or ``await pool.run()``, which starts them if
    needed and returns when they have all ended.

    :param engine: an ``AsyncEngine`` on a ``postgresql+psycopg://`` URL; its pool must hand
        out ``concurrency`` connections at once (checked at start).
    :param handlers: a :class:`~sqlalchemy_que.JobRegistry`, a mapping of job_class to handler
        or definition, or definitions; ``async def`` handlers and plain ones (see the module
        docs for the plain ones).
    :param queue: the one queue to work; default ``''``.
    :param queues: several queues: a list (every task works every queue, in that order of
        preference) or a mapping of queue to a number of tasks (``concurrency`` is then their
        sum), as :class:`~sqlalchemy_que.WorkerPool`'s.
    :param concurrency: how many jobs run at once, one per task; default 10.
    :param batch_size: the most jobs a task locks at once; default 20.
    :param wake_interval: seconds an idle task sleeps before it looks again; default 5.
    :param max_hold: seconds a batch's jobs may wait locked; default 0.5.
    :param on_error: called with the exception and the job after a job fails.
    :param check_schema: check at start that ``que_jobs`` is a Que 0.x version 3 table.
    :param listen: wake tasks on our enqueue's notifications (one extra connection) and
        deliver cancel requests; polling every ``wake_interval`` still finds every job.
    :param max_attempts: runs a job gets in all, unless its definition says; default 16.
    :param timeout: seconds a job may run, unless its definition says; default None. A job
        past its timeout is cancelled (its task is, at its next ``await``) and failed as a
        timeout.
    :param shutdown_timeout: seconds running jobs get to finish when the ``async with``
        block ends; default None (no limit).
    :param run_schedules: take part in enqueueing the ticks of the registry's schedules
        (:func:`~sqlalchemy_que.cron`, :func:`~sqlalchemy_que.every`), as a
        :class:`~sqlalchemy_que.WorkerPool` does: in a thread of its own, on one sync
        connection to the Engine's URL (psycopg's sync driver; the AsyncEngine's
        ``connect_args`` are not carried over). Default True; nothing for a registry without
        schedules, or with ``burst``.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        handlers: Handlers,
        *,
        queue: str | None = None,
        queues: Sequence[str] | Mapping[str, int] | None = None,
        concurrency: int | None = None,
        batch_size: int | None = None,
        wake_interval: float = 5.0,
        max_hold: float = DEFAULT_MAX_HOLD,
        on_error: ErrorReporter | None = None,
        check_schema: bool = True,
        listen: bool = True,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout: float | None = None,
        shutdown_timeout: float | None = None,
        run_schedules: bool = True,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise WorkerError(
                f"AsyncWorkerPool needs an AsyncEngine (create_async_engine), got {engine!r}; "
                "with a sync Engine use WorkerPool"
            )
        if engine.dialect.driver != "psycopg":
            raise WorkerError(
                f"the async worker needs psycopg's async driver, but this AsyncEngine uses "
                f"{engine.dialect.driver!r}; use a postgresql+psycopg:// URL"
            )
        if concurrency is None and not isinstance(queues, Mapping):
            concurrency = DEFAULT_CONCURRENCY
        try:
            assignments = _assignments(queue, queues, concurrency)
        except WorkerError as error:
            raise WorkerError(str(error).replace("workers", "concurrency")) from None
        self.engine = engine
        self.registry = registry_of(handlers)
        self.queues: tuple[str, ...] = tuple(dict.fromkeys(q for a in assignments for q in a))
        self.batch_size = check_batch_size(batch_size) if batch_size else DEFAULT_BATCH_SIZE
        self.wake_interval = _check_seconds("wake_interval", wake_interval)
        self.max_hold = _check_seconds("max_hold", max_hold)
        self.on_error = on_error
        self.check_schema = check_schema
        try:
            self.max_attempts = check_max_attempts(max_attempts)
            self.timeout = None if timeout is None else check_timeout(timeout)
            self.shutdown_timeout = (
                None if shutdown_timeout is None else check_timeout(shutdown_timeout)
            )
        except QueError as error:
            raise WorkerError(str(error)) from None
        self.tasks = [
            AsyncWorker(self, worker_queues, f"que-task-{index}")
            for index, worker_queues in enumerate(assignments)
        ]
        self.listener = (
            AsyncListener(engine, self.queues, self._wake_idle, self._cancel) if listen else None
        )
        self.run_schedules = run_schedules
        #: The thread enqueueing the registry's schedules, while the pool runs.
        self.scheduler: Scheduler | None = None
        self._schedule_engine: Engine | None = None
        self.stopping = False
        self._started = False
        self._running: list[asyncio.Task[None]] = []

    @property
    def concurrency(self) -> int:
        return len(self.tasks)

    @property
    def workers(self) -> list[AsyncWorker]:
        """The worker tasks' state, as :attr:`WorkerPool.workers` (what
        :meth:`QueMetrics.track` reads for the busy/idle gauge)."""
        return self.tasks

    @property
    def failed(self) -> int:
        """How many job runs failed (retried or failed for good) in this pool."""
        return sum(task.failed for task in self.tasks)

    @property
    def worked(self) -> int:
        """How many jobs this pool worked (completed or failed)."""
        return sum(task.worked for task in self.tasks)

    @property
    def running_jobs(self) -> list[LockedJob]:
        """The jobs being worked right now."""
        return [job for task in self.tasks if (job := task.current) is not None]

    def _wake_idle(self, queue: str | None = None) -> None:
        """Wake one sleeping task that works ``queue`` (as WorkerPool does)."""
        candidates = [t for t in self.tasks if queue is None or queue in t.queues]
        for task in candidates:
            if task.sleeping:
                task.wake()
                return
        for task in candidates:
            if task.current is None:
                task.wake()
                return

    def _cancel(self, job_id: int) -> None:
        for task in self.tasks:
            context = task.context
            if context is not None and context.job_id == job_id:
                context._request_cancel()
                return

    async def start(self, *, burst: bool = False) -> None:
        """Check the Engine and the schema, then start the tasks (and the listener).

        :raises WorkerError: when the Engine's pool is too small for ``concurrency``.
        """
        if self._running or self._started:
            raise WorkerError(
                "this AsyncWorkerPool was already started (a stopped pool does not start "
                "again: make a new one)"
            )
        if self.stopping:
            raise WorkerError("this AsyncWorkerPool was stopped before it started: make a new one")
        capacity = _pool_capacity(self.engine.sync_engine)
        if capacity < self.concurrency:
            raise WorkerError(
                f"the AsyncEngine's connection pool hands out at most {capacity:g} "
                f"connections, but this AsyncWorkerPool runs {self.concurrency} jobs at once, "
                "each holding one connection. Create the engine with "
                f"create_async_engine(url, pool_size={self.concurrency}) (plus what the rest "
                "of the process needs), or lower concurrency"
            )
        if self.check_schema:
            async with self.engine.connect() as connection:
                await connection.run_sync(_check_schema)
        self._started = True
        if self.stopping:
            # stop() ran while the schema was checked: what started now would outlive it.
            logger.info("stopped while starting: no worker task started")
            return
        if self.run_schedules and self.registry.schedules and not burst:
            # The scheduler is the sync pool's (a thread that sleeps until the next tick);
            # its Engine is a sync one on the same URL, which connects only in that thread.
            self._schedule_engine = create_engine(self.engine.url, pool_size=1, max_overflow=0)
            self.scheduler = Scheduler(self._schedule_engine, self.registry.schedules.values())
            self.scheduler.start()
        if self.listener is not None and not burst:
            self.listener.start()
        loop = asyncio.get_running_loop()
        self._running = [loop.create_task(t.run(burst), name=t.name) for t in self.tasks]
        logger.info(
            "started %d worker tasks on queue(s) %s",
            self.concurrency,
            ", ".join(repr(queue) for queue in self.queues),
        )

    async def run(self, *, burst: bool = False) -> int:
        """Start (unless started) and wait until every task has ended: after :meth:`stop`,
        or with ``burst``, once no job is ready. Returns the jobs worked. A pool whose burst
        ended may run again; a stopped pool does not start again (and ``run()`` then returns
        at once). Cancelling this call stops the pool as ``stop(0)`` would (running jobs
        released untouched) before the cancellation propagates."""
        if not self._running:
            if self.stopping:  # stopped before or while it started: nothing runs
                return self.worked
            await self.start(burst=burst)
        try:
            try:
                # asyncio.wait, not gather: a cancellation of this call must not reach the
                # tasks as a bare cancel (see _end_cancelled).
                if self._running:  # none when stop() came while start() checked the schema
                    await asyncio.wait(self._running)
            except asyncio.CancelledError:
                await self._end_cancelled()
                raise
        finally:
            # Also when this call is cancelled: nothing outlives it.
            if self.listener is not None:
                await self.listener.stop()
            await self._stop_scheduler(None)
        for task in self._running:
            if not task.cancelled() and (error := task.exception()) is not None:
                # A bug: a task ends only when told to.
                logger.error("a worker task ended with an error", exc_info=error)
        if not self.stopping:  # a burst that ran out of jobs: the pool may run again
            self._running = []
            self._started = False
        return self.worked

    async def _end_cancelled(self) -> None:
        """``run()`` was cancelled (Ctrl-C under ``asyncio.run``, a task group ending): stop
        as :meth:`stop` does past its grace period, at once. A handler inside a statement is
        not cancelled bare: psycopg would send one cancel request and then wait for the
        statement to end, and a request that reaches the server before the statement starts
        is ignored (a 60 s statement then holds the pool, and the job's lock, for 60 s). The
        worker's interrupt keeps asking until the statement ends, then releases the job."""
        self.stopping = True
        for runner in self.tasks:
            runner.wake()
        late = {task for task in self._running if not task.done()}
        try:
            if late:
                await self._cut_short(late)
        except asyncio.CancelledError:
            # Cancelled again while ending: end the tasks outright.
            await asyncio.gather(*(end_task(task) for task in late))
            raise

    async def _cut_short(self, late: set[asyncio.Task[None]]) -> list[LockedJob]:
        """Interrupt the handlers of the ``late`` tasks (cancel the idle ones), give them
        ``_STUCK`` seconds to release their jobs, then cancel what is left; returns the jobs
        interrupted."""
        interrupted: list[LockedJob] = []
        for runner, task in zip(self.tasks, self._running, strict=True):
            if task in late:
                if runner.current is not None:
                    interrupted.append(runner.current)
                    runner.interrupt("shutdown")
                elif not runner.on_wire:
                    task.cancel()
                # else: inside its own round trip (a cancel there would leave the lock's
                # crash marks behind): it ends the round trip, then releases and ends.
        _, stuck = await asyncio.wait(late, timeout=_STUCK)
        # A completion that does not return: end it anyway.
        await asyncio.gather(*(end_task(task) for task in stuck))
        return interrupted

    async def _stop_scheduler(self, timeout: float | None) -> None:
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is not None:
            await asyncio.to_thread(scheduler.stop, timeout)
        if self._schedule_engine is not None:
            self._schedule_engine.dispose()
            self._schedule_engine = None

    async def stop(self, timeout: float | None = None) -> list[LockedJob]:
        """Stop taking jobs, let running jobs finish for up to ``timeout`` seconds (None: no
        limit), then cancel the ones still running: each is rolled back and released with
        its row as it was (not counted as a failure).

        :returns: the jobs that were cancelled.
        """
        self.stopping = True
        for runner in self.tasks:
            runner.wake()
        if self.listener is not None:
            await self.listener.stop()
        await self._stop_scheduler(timeout)
        running = [task for task in self._running if not task.done()]
        cancelled: list[LockedJob] = []
        if running:
            _, late = await asyncio.wait(running, timeout=timeout)
            if late:
                cancelled = await self._cut_short(late)
        self._running = []
        if cancelled:
            logger.warning(
                "shutdown cancelled %d job(s) still running: %s",
                len(cancelled),
                ", ".join(str(job.job_id) for job in cancelled),
            )
        return cancelled

    async def __aenter__(self) -> AsyncWorkerPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(self.shutdown_timeout)
