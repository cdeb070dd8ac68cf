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
import collections
import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg import pq
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

from . import _hooks
from ._async_context import AsyncJobContext
from ._async_listener import AsyncListener
from ._async_session import AsyncLockedSession
from ._pool import _assignments, _pool_capacity
from ._session import LockedJob, LostSessionError, StatementFailedError
from ._errors import (
    FailJob,
    JobCancelledError,
    JobCrashedError,
    JobTimeoutError,
    QueError,
    RetryJob,
    UnknownJobClassError,
    WorkerError,
)
from ._jobs import (
    JobContext,
    JobDefinition,
    check_max_attempts,
    check_timeout,
    default_retry_delay,
    is_async_handler,
)
from .schema import check_schema as _check_schema
from ._worker import (
    _MAX_BACKOFF,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_HOLD,
    MAX_RETRY_DELAY,
    ErrorReporter,
    Handlers,
    UndecodableJobError,
    Worker,
    _check_seconds,
    _error_class_name,
    _message,
    check_batch_size,
    format_last_error,
    registry_of,
    retry_delay,
)

__all__ = ["AsyncWorkerPool"]

logger = logging.getLogger("sqlalchemy_que.worker")

_DATABASE_ERRORS = (DBAPIError, DisconnectionError, psycopg.Error, OSError, LostSessionError)

#: Seconds a task interrupted by shutdown may take to release its job before it is
#: cancelled outright (its connection then discarded, which releases the lock too).
_STUCK = 10.0

#: Worker tasks of a pool unless told otherwise.
DEFAULT_CONCURRENCY = 10


class _Task:
    """One worker task: its queues, its session, its wake-up."""

    def __init__(self, pool: AsyncWorkerPool, queues: tuple[str, ...], name: str) -> None:
        self.pool = pool
        self.queues = queues
        self.name = name
        self.wake_event = asyncio.Event()
        self.sleeping = False
        self.current: LockedJob | None = None
        self.context: JobContext | None = None
        self.failed = 0
        self.worked = 0
        self._ramp = 1
        self._job_seconds = 0.0
        self._after_sleep = True
        #: Why the running handler was interrupted ("timeout", "shutdown"), if it was.
        self.interrupted: str | None = None
        self._handler_task: asyncio.Task[Any] | None = None
        self._session: AsyncLockedSession | None = None
        self._again: asyncio.TimerHandle | None = None
        self._cancels = 0
        self._cancelling: set[asyncio.Future[None]] = set()

    def wake(self) -> None:
        self.wake_event.set()

    async def _sleep(self, seconds: float) -> None:
        self._ramp = 1
        self.sleeping = True
        try:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self.wake_event.wait(), seconds)
            self.wake_event.clear()
        finally:
            self.sleeping = False
            self._after_sleep = True

    async def run(self, burst: bool) -> None:
        pool = self.pool
        backoff = 0.0
        session = AsyncLockedSession(pool.engine)
        try:
            while not pool.stopping:
                try:
                    if not session.checked_out:
                        await session.checkout()
                        if pool.stopping:
                            break
                    count = await self._work_batch(session)
                except Exception as error:
                    await session.discard()  # its server session, and any lock, end with it
                    backoff = min(max(backoff * 2, 0.1), _MAX_BACKOFF)
                    database = isinstance(error, _DATABASE_ERRORS)
                    logger.log(
                        logging.WARNING if database else logging.ERROR,
                        "%s: %s error, retrying in %.1fs: %s",
                        self.name,
                        "database" if database else "unexpected",
                        backoff,
                        error,
                        exc_info=not database,
                    )
                    await self._sleep(backoff)
                    continue
                backoff = 0.0
                if count:
                    self.worked += count
                    continue
                await session.checkin()  # idle: back to the Engine's pool while asleep
                if burst:
                    break
                await self._sleep(pool.wake_interval)
        finally:
            await session.checkin()

    def _limit(self) -> int:
        """As :meth:`Worker._limit`: one after a sleep, doubling after each full batch up to
        ``batch_size``, fewer when jobs are slow."""
        limit = self._ramp
        if self._job_seconds > 0.0:
            limit = min(limit, int(self.pool.max_hold / 10 / self._job_seconds))
        return max(1, min(self.pool.batch_size, limit))

    async def _work_batch(self, session: AsyncLockedSession) -> int:
        limit = self._limit()
        jobs: list[LockedJob] = []
        for queue in self.queues:
            jobs = await session.lock(queue, limit)
            if jobs:
                break
        if not jobs:
            return 0
        after_sleep, self._after_sleep = self._after_sleep, False
        if len(jobs) >= limit:
            self._ramp = min(self.pool.batch_size, limit * 2)
        if after_sleep or len(jobs) >= limit:
            self.pool._wake_idle()  # where there was one job there may be more
        locked_at = time.monotonic()
        pending = collections.deque(jobs)
        worked = 0
        try:
            while pending:
                job = pending.popleft()
                if not session.holds(job):
                    continue  # released under us (a handler's leftover locks were cleared)
                self.current = job
                try:
                    await self._run(session, job)
                finally:
                    self.current = None
                worked += 1
                if self.pool.stopping or time.monotonic() - locked_at > self.pool.max_hold:
                    break
            await session.release([job for job in pending if session.holds(job)])
        except LostSessionError:
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                await session.release([job for job in pending if session.holds(job)])
            raise
        return worked

    # -- one job -------------------------------------------------------------------------

    async def _run(self, session: AsyncLockedSession, job: LockedJob) -> None:
        hooks = _hooks.active
        if not hooks:
            await self._run_job(session, job)
            return
        run = _hooks.begin(
            hooks,
            self.name,
            job_id=job.job_id,
            job_class=job.job_class,
            queue=job.queue,
            priority=job.priority,
            run_at=job.run_at,
            error_count=job.error_count,
        )
        started = time.perf_counter()
        try:
            failure = await self._run_job(session, job)
        except BaseException as error:
            duration = time.perf_counter() - started
            _hooks.end(hooks, run, _hooks.JobOutcome("interrupted", duration, error))
            raise
        duration = time.perf_counter() - started
        if failure is None:
            _hooks.end(hooks, run, _hooks.JobOutcome("done", duration))
        else:
            _hooks.end(hooks, run, _hooks.JobOutcome("failed", duration, *failure))

    async def _run_job(
        self, session: AsyncLockedSession, job: LockedJob
    ) -> tuple[Exception, float | None] | None:
        """Run the job's handler and complete or fail the job; returns the error and retry
        delay of a failure (None: failed for good), as :meth:`Worker._run_job`."""
        pool = self.pool
        definition = pool.registry.get(job.job_class)
        started = time.perf_counter()
        crashed = session.crashed.pop(job.job_id, None)
        if crashed is not None:
            crash = JobCrashedError(
                f"job {job.job_id} {job.job_class}: its earlier run ({crashed}) ended without "
                "an outcome; its worker process died (killed, out of memory, os._exit) or "
                "lost its connection"
            )
            return crash, await self._fail(session, job, definition, crash, None, "crash")
        timeout = pool.timeout
        if definition is not None and definition.timeout is not None:
            timeout = definition.timeout
        context: JobContext | None = None
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self.interrupted = None
        timer: asyncio.TimerHandle | None = None
        try:
            try:
                if job.run_at is None:
                    raise UndecodableJobError(
                        f"run_at {job.run_at_key!r} of job {job.job_id} cannot be represented "
                        "as a Python datetime; the job is rescheduled from now"
                    )
                args = json.loads(job.args)
                if not isinstance(args, list):
                    args = [args]
                fields: dict[str, Any] = {
                    "job_id": job.job_id,
                    "job_class": job.job_class,
                    "queue": job.queue,
                    "priority": job.priority,
                    "run_at": job.run_at,
                    "error_count": job.error_count,
                    "last_error": job.last_error,
                    "args": args,
                    "max_attempts": self._max_attempts(definition),
                    "timeout": timeout,
                }
                if definition is None:
                    raise UnknownJobClassError(
                        f"no handler for job_class {job.job_class!r} in this worker "
                        f"(it knows {sorted(pool.registry) or 'no job classes'})"
                    )
                ms = None if timeout is None else max(1, math.ceil(timeout * 1000))
                connection = await session.begin_job(statement_timeout_ms=ms)
                self._handler_task, self._session = task, session
                if timeout is not None:
                    timer = loop.call_later(timeout, self.interrupt, "timeout")
                if is_async_handler(definition.handler):
                    context = AsyncJobContext(connection=connection, **fields)
                    self.context = context
                    await definition.handler(context, *args)  # type: ignore[misc]
                    Worker._check_overrun(context, timeout)
                    await context._finish_async_session(keep=True)
                else:
                    context = JobContext(connection=connection.sync_connection, **fields)
                    self.context = context
                    await greenlet_spawn(definition.handler, context, *args)
                    Worker._check_overrun(context, timeout)
                    await greenlet_spawn(context._finish_session, keep=True)
            finally:
                self.context = None
                self._handler_task = None
                if timer is not None:
                    timer.cancel()
                if self._again is not None:
                    self._again.cancel()
                    self._again = None
                others = self._take_back_cancels(task)
        except asyncio.CancelledError as cancelled:
            if self.interrupted != "timeout" or others:
                await self._release(session, job, context)
                raise
            await self._drop_session(context)
            overrun = JobTimeoutError(
                f"job {job.job_id} overran its timeout of {timeout or 0:g}s and was cancelled"
            )
            overrun.__cause__ = cancelled
            return overrun, await self._fail(session, job, definition, overrun, context)
        except Exception as error:
            if self.interrupted == "shutdown":
                # What the cancelled statement raised: the job is released, not failed.
                await self._release(session, job, context)
                raise asyncio.CancelledError from error
            if context is not None:
                await self._drop_session(context)
                error = Worker._classify(error, context, timeout)
            return error, await self._fail(session, job, definition, error, context)
        except BaseException:
            await self._release(session, job, context)
            raise
        try:
            await session.complete(job)
        except StatementFailedError as error:
            cause = error.__cause__
            failure = cause if isinstance(cause, Exception) else error
            return failure, await self._fail(session, job, definition, failure, context)
        elapsed = time.perf_counter() - started
        self._job_seconds = (
            elapsed if not self._job_seconds else (0.8 * self._job_seconds + 0.2 * elapsed)
        )
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "%s: job %s %s done in %.1f ms",
                self.name,
                job.job_id,
                job.job_class,
                elapsed * 1000,
                extra={"job_id": job.job_id, "job_class": job.job_class, "outcome": "done"},
            )
        return None

    def interrupt(self, why: str) -> None:
        """Stop the running handler (``why``: "timeout" or "shutdown"; the first one counts):
        cancel its task, or, while one of its statements runs on the job's connection, have
        the server cancel that statement first, then look again shortly. (SQLAlchemy discards
        a connection whose statement is cut short by a cancelled task, and the job's lock
        would go with it, leaving the run to count as a crash.)"""
        task, session = self._handler_task, self._session
        if task is None or session is None:
            return  # between handlers: the job ends by itself in one round trip
        self.interrupted = self.interrupted or why
        raw = session.driver_connection
        if raw is not None and raw.pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
            cancelling = asyncio.ensure_future(self._cancel_statement(raw))
            self._cancelling.add(cancelling)
            cancelling.add_done_callback(self._cancelling.discard)
            self._again = asyncio.get_running_loop().call_later(0.05, self.interrupt, why)
        else:
            self._cancels += 1
            task.cancel()

    @staticmethod
    async def _cancel_statement(raw: psycopg.AsyncConnection[Any]) -> None:
        with contextlib.suppress(Exception):
            await raw.cancel_safe(timeout=5.0)

    def _take_back_cancels(self, task: asyncio.Task[Any]) -> int:
        """Withdraw our own cancel requests from the task; return how many others remain."""
        cancels, self._cancels = self._cancels, 0
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+
        if uncancel is None:
            return 0
        remaining = int(task.cancelling())  # type: ignore[attr-defined,unused-ignore]
        for _ in range(cancels):
            remaining = int(uncancel())
        return remaining

    async def _release(
        self, session: AsyncLockedSession, job: LockedJob, context: JobContext | None
    ) -> None:
        """The run was cut short (the pool's shutdown): roll back and unlock, row intact."""
        await self._drop_session(context)
        await session.abandon(job)
        logger.warning(
            "%s: job %s cancelled by the pool's shutdown; released untouched", self.name, job.job_id
        )

    @staticmethod
    async def _drop_session(context: JobContext | None) -> None:
        """Let go of the handler's Session without keeping its work."""
        with contextlib.suppress(Exception):
            if isinstance(context, AsyncJobContext):
                await context._finish_async_session(keep=False)
            elif context is not None:
                await greenlet_spawn(context._finish_session, keep=False)

    def _max_attempts(self, definition: JobDefinition[Any] | None) -> int:
        if definition is not None and definition.max_attempts is not None:
            return definition.max_attempts
        return self.pool.max_attempts

    async def _fail(
        self,
        session: AsyncLockedSession,
        job: LockedJob,
        definition: JobDefinition[Any] | None,
        error: Exception,
        context: JobContext | None,
        reason: str = "error",
    ) -> float | None:
        """Record the failure as :meth:`Worker._fail` does; return the retry delay, None when
        the job will not run again."""
        self.failed += 1
        count = job.error_count + 1
        if isinstance(error, FailJob):
            reason = "failed"
        elif isinstance(error, JobCancelledError):
            reason = "cancelled"
        elif isinstance(error, JobTimeoutError):
            reason = "timeout"
        final = reason in ("failed", "cancelled") or count >= self._max_attempts(definition)
        if isinstance(error, RetryJob):
            delay = min(error.delay, MAX_RETRY_DELAY)
        else:
            delay = retry_delay(definition, count)
        extra = {"job_id": job.job_id, "job_class": job.job_class, "error_count": count}
        try:
            try:
                if final:
                    await session.fail(job, last_error=format_last_error(error), reason=reason)
                else:
                    await session.record_error(
                        job, delay=delay, last_error=format_last_error(error)
                    )
            except StatementFailedError:
                logger.exception(
                    "%s: could not record the error of job %s; recording it plainly",
                    self.name,
                    job.job_id,
                )
                if final:
                    await session.fail(job, last_error=_error_class_name(error), reason=reason)
                else:
                    await session.record_error(
                        job, delay=default_retry_delay(count), last_error=_error_class_name(error)
                    )
        except LostSessionError:
            logger.error(
                "%s: job %s %s failed after its connection was lost; leaving it as it was "
                "for a retry: %s",
                self.name,
                job.job_id,
                job.job_class,
                _message(error),
                exc_info=error,
                extra=extra,
            )
            self._report(error, context)
            raise
        except StatementFailedError as failure:
            self._report(error, context)
            raise QueError(
                f"could not record the error of job {job.job_id}; backing off"
            ) from failure
        if final:
            logger.error(
                "%s: job %s %s failed for good (%s, attempt %d): %s",
                self.name,
                job.job_id,
                job.job_class,
                reason,
                count,
                _message(error),
                exc_info=error,
                extra=extra,
            )
        else:
            logger.error(
                "%s: job %s %s failed (error %d), retrying in %.0fs: %s",
                self.name,
                job.job_id,
                job.job_class,
                count,
                delay,
                _message(error),
                exc_info=error,
                extra=extra,
            )
        self._report(error, context)
        return None if final else delay

    def _report(self, error: Exception, context: JobContext | None) -> None:
        on_error = self.pool.on_error
        if on_error is not None and context is not None:
            try:
                on_error(error, context)
            except Exception:
                logger.exception("%s: the error reporter raised; ignored", self.name)


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
            _Task(self, worker_queues, f"que-task-{index}")
            for index, worker_queues in enumerate(assignments)
        ]
        self.listener = (
            AsyncListener(engine, self.queues, self._wake_idle, self._cancel) if listen else None
        )
        self.stopping = False
        self._running: list[asyncio.Task[None]] = []

    @property
    def concurrency(self) -> int:
        return len(self.tasks)

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
        if self._running:
            raise WorkerError("this AsyncWorkerPool was already started")
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
        if self.registry.schedules:
            logger.warning(
                "this registry has schedules, which an AsyncWorkerPool does not enqueue: run "
                "a WorkerPool (or sqlalchemy-que worker with a plain def handler registry) "
                "for them"
            )
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
        or with ``burst``, once no job is ready. Returns the jobs worked."""
        if not self._running:
            await self.start(burst=burst)
        await asyncio.gather(*self._running, return_exceptions=True)
        if self.listener is not None:
            await self.listener.stop()
        return self.worked

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
        running = [task for task in self._running if not task.done()]
        cancelled: list[LockedJob] = []
        if running:
            _, late = await asyncio.wait(running, timeout=timeout)
            if late:
                for runner, task in zip(self.tasks, self._running, strict=True):
                    if task in late:
                        if runner.current is not None:
                            cancelled.append(runner.current)
                            runner.interrupt("shutdown")
                        else:
                            task.cancel()
                _, stuck = await asyncio.wait(late, timeout=_STUCK)
                for task in stuck:  # a completion that does not return: end it anyway
                    task.cancel()
                if stuck:
                    await asyncio.wait(stuck)
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
