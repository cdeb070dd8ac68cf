"""One task of an :class:`~sqlalchemy_que.AsyncWorkerPool`: the async twin of a
:class:`~sqlalchemy_que.Worker` thread.

It holds one :class:`~sqlalchemy_que._async_session.AsyncLockedSession` while it has jobs,
locks a batch, runs each job's handler (``async def`` awaited, plain ``def`` through
SQLAlchemy's greenlet bridge) and completes or fails the job exactly as the sync worker does
(:meth:`Worker._run_job` and :meth:`Worker._fail`, whose rules and log lines it follows).

Interrupting a handler (its timeout, or the pool's shutdown past its grace period) cancels
its task; while one of the handler's statements is running on the job's connection, the
server is asked to cancel that statement first: SQLAlchemy discards a connection whose
statement a cancelled task cut short, and the job's lock would go with it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.util import greenlet_spawn

from . import _hooks
from ._async_context import AsyncJobContext
from ._async_session import AsyncLockedSession
from ._async_tasks import wait_event
from ._errors import (
    JobCrashedError,
    JobTimeoutError,
    QueError,
    UnknownJobClassError,
)
from ._jobs import JobContext, JobDefinition, default_retry_delay, is_async_handler
from ._session import LockedJob, LostSessionError, StatementFailedError
from ._worker import (
    _MAX_BACKOFF,
    UndecodableJobError,
    Worker,
    _error_class_name,
    _message,
    failure_outcome,
    format_last_error,
)

if TYPE_CHECKING:
    from ._async_pool import AsyncWorkerPool

__all__ = ["AsyncWorker"]

logger = logging.getLogger("sqlalchemy_que.worker")

_DATABASE_ERRORS = (DBAPIError, DisconnectionError, psycopg.Error, OSError, LostSessionError)


class AsyncWorker:
    """One worker task of ``pool``: its queues, its session, its wake-up."""

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
        self._session: AsyncLockedSession | None = None  # the task's session, while it runs
        self._again: asyncio.TimerHandle | None = None
        self._cancels = 0
        self._cancelling: set[asyncio.Future[None]] = set()

    @property
    def current_job(self) -> LockedJob | None:
        """The job this task is running (the metrics' busy/idle gauge reads it)."""
        return self.current

    @property
    def on_wire(self) -> bool:
        """Whether the task waits for the answer to one of its session's own round trips
        (see :attr:`AsyncLockedSession.on_wire`): a shutdown lets it end instead of
        cancelling it there."""
        return self._session is not None and self._session.on_wire

    def wake(self) -> None:
        self.wake_event.set()

    async def _sleep(self, seconds: float) -> None:
        self._ramp = 1
        self.sleeping = True
        try:
            await wait_event(self.wake_event, seconds)
            self.wake_event.clear()
        finally:
            self.sleeping = False
            self._after_sleep = True

    async def run(self, burst: bool) -> None:
        pool = self.pool
        backoff = 0.0
        session = self._session = AsyncLockedSession(pool.engine)
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
            try:
                await session.checkin()
            finally:
                self._session = None

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
            while pending and not self.pool.stopping:  # stopped: the batch is released
                job = pending.popleft()
                if not session.holds(job):
                    continue  # released under us (a handler's leftover locks were cleared)
                self.current = job
                try:
                    await self._run(session, job)
                finally:
                    self.current = None
                worked += 1
                if time.monotonic() - locked_at > self.pool.max_hold:
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
                session.begin_job(statement_timeout_ms=ms)
                self._handler_task = task
                if timeout is not None:
                    timer = loop.call_later(timeout, self.interrupt, "timeout")
                if is_async_handler(definition.handler):
                    context = AsyncJobContext(open_connection=session.job_connection, **fields)
                    self.context = context
                    await definition.handler(context, *args)  # type: ignore[misc]
                    Worker._check_overrun(context, timeout)
                    await context._finish_async_session(keep=True)
                else:
                    context = JobContext(open_connection=session.job_sync_connection, **fields)
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
                if self._cancelling:
                    # A cancel request still on its way would land on our next statement
                    # (the error's record, or the completion) when the handler's statement
                    # ended first (its statement_timeout fires at the same moment): let it
                    # arrive while the connection is idle, where the server ignores it.
                    await asyncio.wait(list(self._cancelling))
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
        """The run was cut short (the pool's shutdown, or the task's cancellation): roll
        back and unlock, row intact. This runs on the way out of a cancelled task, which must
        still end: a session that cannot release the job (its connection was lost, or
        discarded by SQLAlchemy after a statement the cancel cut short) is discarded, which
        ends the lock with it, instead of raising an error in place of the cancellation."""
        await self._drop_session(context)
        try:
            await session.abandon(job)
        except Exception as error:
            logger.warning(
                "%s: job %s cancelled; its session could not release it and is discarded: %s",
                self.name,
                job.job_id,
                error,
            )
            await session.discard()
            return
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
        reason, final, delay = failure_outcome(
            error, count, self._max_attempts(definition), definition, reason
        )
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
