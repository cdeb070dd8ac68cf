"""Workers: lock jobs in batches, run their handlers, complete or reschedule them.

A :class:`Worker` works one or more queues on one connection of its own, held by a
:class:`~sqlalchemy_que._session.LockedSession` (the only code that writes about its jobs).
Its loop, which is the hot path of the library, is all in this module:

1. lock up to ``batch_size`` ready jobs of the first queue that has any (one statement),
   and re-check them (another);
2. for each, run its handler; the job's transaction opens only if the handler uses
   ``job.session`` or ``job.connection``;
3. complete it (``DELETE``, ``COMMIT``, unlock: one round trip) or record its failure as Que
   does (``error_count + 1``, ``run_at = now() + delay``, ``last_error``) and unlock it;
4. with ``completion="batch"``, the jobs whose handlers did not use the database are
   completed together instead: one ``DELETE``, ``COMMIT`` and unlock per batch.

Jobs locked but not yet started are released when the worker stops, and whenever the batch
has been held for ``max_hold`` seconds (then the worker locks afresh, so that a more urgent
job enqueued meanwhile is not kept waiting behind the rest of the batch). The batch shrinks
by itself when jobs are slow: it is sized so that the batch's jobs take about a tenth of
``max_hold``.

A :class:`~sqlalchemy_que.WorkerPool` runs several workers in threads on one Engine.

Handlers take the running job (:class:`~sqlalchemy_que.JobContext`) first, then the job's
positional arguments.

Attempts: before a batch's handlers run, the re-check of step 1 also writes a crash mark
per job (``que_job_runs``, one ``INSERT ... SELECT`` in the same statement, so no round trip
of its own); every outcome deletes it in its own transaction. A job locked with a mark
still there had a run that never ended (its process died): that counts as a failed
attempt (:class:`~sqlalchemy_que.JobCrashedError`), recorded instead of running it. A job
whose last attempt fails (``max_attempts``, default 16), or that raises
:class:`~sqlalchemy_que.FailJob`, or was cancelled, is moved to ``que_failed_jobs``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError

from . import _hooks
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
    JobRegistry,
    check_max_attempts,
    check_timeout,
    default_retry_delay,
    refuse_async_handlers,
)
from ._session import LockedJob, LockedSession, LostSessionError, StatementFailedError

__all__ = ["Completion", "ErrorReporter", "Worker", "format_last_error"]

logger = logging.getLogger("sqlalchemy_que.worker")

#: Called with the exception and the job after a job fails; its own errors are only logged.
ErrorReporter = Callable[[BaseException, JobContext], object]

#: What a worker is given to know its jobs: a registry, a mapping of job_class to handler or
#: definition, or an iterable of definitions.
Handlers = JobRegistry | Mapping[str, Any] | Iterable[JobDefinition[Any]]

#: How a worker completes jobs whose handlers did not use the database: each in its own
#: transaction ("job"), or several in one ("batch").
Completion = Literal["job", "batch"]

#: Ruby Que cuts the first line of ``last_error`` ("Class: message") to this many characters.
LAST_ERROR_FIRST_LINE = 500

#: The most jobs a worker locks at once, by default (see docs/workers.md for the trade-off):
#: with one transaction per job, the commit dominates and larger batches only keep urgent jobs
#: waiting longer; with batched completion, each batch is one commit.
DEFAULT_BATCH_SIZE = 20
DEFAULT_BATCHED_COMPLETION_SIZE = 100

#: Runs a job gets in all before it is failed for good, unless its definition says otherwise:
#: Que 2.x's default of 15 retries after the first run. With Que's retry delay (n^4 + 3
#: seconds) the last retry comes about two days after the first failure, which outlasts a
#: weekend outage of whatever the job talks to. (River's default is 25 attempts, about three
#: weeks with its own formula; Que 0.x and Ruby workers retry forever.)
DEFAULT_MAX_ATTEMPTS = 16

#: The longest a worker keeps jobs locked but not started before it looks again.
DEFAULT_MAX_HOLD = 0.5

_MAX_BACKOFF = 30.0
_QueryCanceled = psycopg.errors.QueryCanceled  # what statement_timeout raises

#: The longest retry delay written (about 100 years), well within PostgreSQL's intervals.
MAX_RETRY_DELAY = 100 * 365.25 * 24 * 3600.0


def retry_delay(definition: JobDefinition[Any] | None, error_count: int) -> float:
    """The job's retry delay in seconds after its ``error_count``-th failure: the
    definition's, else Que's; capped at :data:`MAX_RETRY_DELAY`, and Que's when the
    definition's own delay raises or is not a number of seconds >= 0 (then 0)."""
    try:
        delay = (
            definition.delay_for(error_count)
            if definition is not None
            else default_retry_delay(error_count)
        )
    except Exception:
        logger.exception("retry delay of %s failed; using Que's default", definition)
        return default_retry_delay(error_count)
    if not math.isfinite(delay) or delay < 0:
        logger.error("retry delay %r is not a number of seconds >= 0; using 0", delay)
        return 0.0
    return min(delay, MAX_RETRY_DELAY)


def failure_outcome(
    error: Exception,
    count: int,
    max_attempts: int,
    definition: JobDefinition[Any] | None,
    reason: str = "error",
) -> tuple[str, bool, float]:
    """What the ``count``-th failed run of a job means, for the sync and the async worker:
    its reason (``failed``, ``cancelled``, ``timeout`` or the given one), whether the job is
    failed for good, and the delay before its retry otherwise."""
    if isinstance(error, FailJob):
        reason = "failed"
    elif isinstance(error, JobCancelledError):
        reason = "cancelled"
    elif isinstance(error, JobTimeoutError):
        reason = "timeout"
    final = reason in ("failed", "cancelled") or count >= max_attempts
    if isinstance(error, RetryJob):
        delay = min(error.delay, MAX_RETRY_DELAY)
    else:
        delay = retry_delay(definition, count)
    return reason, final, delay


class UndecodableJobError(QueError):
    """A job's row holds a value this worker cannot represent (a ``run_at`` of
    ``-infinity``, or outside the years Python's datetime holds); it is failed by its key
    like any other failure, which reschedules it from now."""


def _error_class_name(error: BaseException) -> str:
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    if cls.__module__.startswith("sqlalchemy_que"):
        return f"sqlalchemy_que.{cls.__qualname__}"  # as users see it: public names
    return f"{cls.__module__}.{cls.__qualname__}"


def _message(error: BaseException) -> str:
    """``str(error)``, or a stand-in when the exception cannot even say what it is."""
    try:
        return str(error)
    except Exception:
        try:
            return f"(str() of this exception raised; repr: {error!r})"
        except Exception:
            return "(this exception cannot be turned into text)"


def format_last_error(error: BaseException) -> str:
    """``last_error`` as Ruby Que 0.14.3 lays it out, with the Python class and traceback.

    The first line is ``"<ErrorClass>: <message>"`` (the class alone when the message is
    blank) cut to 500 characters; each following line is one frame of the traceback,
    innermost first, as Ruby's backtraces are: ``path:line:in function``.
    """
    message = _message(error)
    name = _error_class_name(error)
    first = f"{name}: {message}" if message.strip() else name
    frames = [
        f"{frame.filename}:{frame.lineno}:in {frame.name}"
        for frame in reversed(traceback.extract_tb(error.__traceback__))
    ]
    text = "\n".join([first[:LAST_ERROR_FIRST_LINE], *frames])
    # PostgreSQL text holds no NUL and only valid UTF-8: escape what it cannot store.
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def registry_of(handlers: Handlers) -> JobRegistry:
    """The handlers as a :class:`~sqlalchemy_que.JobRegistry`."""
    if isinstance(handlers, JobRegistry):
        return handlers
    if isinstance(handlers, Mapping):
        return JobRegistry(handlers)
    registry = JobRegistry()
    for definition in handlers:
        if not isinstance(definition, JobDefinition):
            raise WorkerError(
                f"handlers must be a mapping of job_class to handler or JobDefinitions, "
                f"got {definition!r}"
            )
        registry.add(definition)
    return registry


def _check_seconds(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise WorkerError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def check_batch_size(batch_size: object, completion: Completion = "job") -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE if completion == "job" else DEFAULT_BATCHED_COMPLETION_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise WorkerError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    return batch_size


def check_completion(completion: object) -> Completion:
    if completion not in ("job", "batch"):
        raise WorkerError(f"completion must be 'job' or 'batch', got {completion!r}")
    return "job" if completion == "job" else "batch"


def check_queues(queues: object) -> tuple[str, ...]:
    if isinstance(queues, str) or not isinstance(queues, Sequence) or not queues:
        raise WorkerError(f"queues must be a non-empty list of queue names, got {queues!r}")
    for queue in queues:
        if not isinstance(queue, str):
            raise WorkerError(f"a queue name must be a str, got {queue!r}")
    if len(set(queues)) != len(queues):
        raise WorkerError(f"queues lists a queue twice: {list(queues)!r}")
    return tuple(queues)


class Worker:
    """Works the jobs of its queues, one at a time, on one connection of ``engine``.

    :param engine: the Engine to check the worker's connection out of; the worker holds it
        while it runs (a session-level advisory lock lives on its session). Use a real
        session, not a transaction-pooling proxy.
    :param handlers: a :class:`~sqlalchemy_que.JobRegistry`, a mapping of job_class to handler
        (or to :class:`~sqlalchemy_que.JobDefinition`), or an iterable of definitions.
    :param queue: the queue to work; default ``''``, Que's default queue.
    :param queues: several queues instead, in order of preference: a later queue is looked
        at only when no earlier one has a ready job.
    :param batch_size: the most jobs locked at once; default 20, or 100 with
        ``completion="batch"``.
    :param completion: ``"job"`` (default): every job completes in a transaction of its
        own; ``"batch"``: jobs whose handlers did not use the database complete together.
    :param wake_interval: seconds to sleep when no job is ready; default 5.
    :param max_hold: seconds a batch's jobs may wait locked before the worker looks afresh;
        default 0.5.
    :param on_error: called with the exception and the job after a job fails; whatever it
        raises is logged, never fatal.
    :param name: a name for logs; default ``"worker"``.
    :param on_locked: called when the worker locks jobs after a sleep, or a full batch (a
        pool uses it to wake one idle worker, since such a batch often means more).
    :param max_attempts: runs a job gets in all, for job definitions that do not set their
        own (and unknown job classes); default 16 (:data:`DEFAULT_MAX_ATTEMPTS`).
    :param timeout: seconds a job may run, for definitions that do not set their own;
        default None (no limit).
    """

    def __init__(
        self,
        engine: Engine,
        handlers: Handlers,
        *,
        queue: str = "",
        queues: Sequence[str] | None = None,
        batch_size: int | None = None,
        completion: Completion = "job",
        wake_interval: float = 5.0,
        max_hold: float = DEFAULT_MAX_HOLD,
        on_error: ErrorReporter | None = None,
        name: str = "worker",
        on_locked: Callable[[], object] | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout: float | None = None,
    ) -> None:
        if not isinstance(queue, str):
            raise WorkerError(f"queue must be a str, got {queue!r}")
        if engine.dialect.driver != "psycopg":
            raise WorkerError(
                f"workers need the psycopg (3) driver, but this Engine uses "
                f"{engine.dialect.driver!r}; use a postgresql+psycopg:// URL"
            )
        self.engine = engine
        self.registry = registry_of(handlers)
        try:
            refuse_async_handlers(self.registry, "a Worker (and WorkerPool)")
        except QueError as error:
            raise WorkerError(str(error)) from None
        self.queues = check_queues(queues if queues is not None else [queue])
        self.completion = check_completion(completion)
        self.batch_size = check_batch_size(batch_size, self.completion)
        self.wake_interval = _check_seconds("wake_interval", wake_interval)
        self.max_hold = _check_seconds("max_hold", max_hold)
        self.on_error = on_error
        self.name = name
        try:
            self.max_attempts = check_max_attempts(max_attempts)
            self.timeout = None if timeout is None else check_timeout(timeout)
        except QueError as error:
            raise WorkerError(str(error)) from None
        #: How many job runs failed (retried or failed for good) since the worker started.
        self.failed = 0
        self._context: JobContext | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._current: LockedJob | None = None
        self._on_locked = on_locked
        self._after_sleep = True
        self._job_seconds = 0.0  # a moving average of one job's run time
        self._ramp = 1  # the batch size to ask for next, before the slow-job cap
        self.sleeping = False
        #: True while the worker waits for a connection (it holds no job meanwhile).
        self.connecting = False

    @property
    def queue(self) -> str:
        """The first (or only) queue of this worker."""
        return self.queues[0]

    # -- control -------------------------------------------------------------------------

    @property
    def current_job(self) -> LockedJob | None:
        """The job being worked right now, if any."""
        return self._current

    def stop(self) -> None:
        """Ask the worker to stop: it takes no new job, finishes the current one, releases
        the jobs it locked but has not started, and a sleeping worker wakes at once."""
        self._stopping.set()
        self._wake.set()

    def cancel(self, job_id: int) -> bool:
        """Ask the handler running job ``job_id``, if it is this worker's, to stop: its
        ``job.cancel_requested`` turns true. True when it was running here."""
        context = self._context
        if context is not None and context.job_id == job_id:
            context._request_cancel()
            return True
        return False

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wake(self) -> None:
        """Cut the current sleep short and look for a job now."""
        self._wake.set()

    def _sleep(self, seconds: float) -> None:
        self._ramp = 1
        self.sleeping = True
        try:
            if self._wake.wait(seconds):
                self._wake.clear()
        finally:
            self.sleeping = False
            self._after_sleep = True

    # -- loops ---------------------------------------------------------------------------

    def run(self, *, burst: bool = False) -> int:
        """Work jobs until :meth:`stop` is called (or, with ``burst``, until none is ready).

        The worker keeps its connection while jobs are ready, and gives it back clean to
        the pool when it goes to sleep. Database errors make it back off (0.1 s doubling
        up to 30 s) and retry on a fresh connection; no error from a job or the database
        stops it.
        ``KeyboardInterrupt`` and ``SystemExit`` raised by a handler release the job
        untouched and stop the worker.

        :returns: the number of jobs worked (completed or failed).
        """
        worked = 0
        backoff = 0.0
        session = LockedSession(self.engine, mark=True)
        try:
            while not self._stopping.is_set():
                try:
                    if not session.checked_out:
                        self.connecting = True
                        try:
                            session.checkout()
                        finally:
                            self.connecting = False
                        if self._stopping.is_set():
                            break
                    count = self._work_batch(session)
                except Exception as error:
                    session.discard()  # its session, and any lock on it, end with it
                    backoff = min(max(backoff * 2, 0.1), _MAX_BACKOFF)
                    self._log_backoff(error, backoff)
                    self._sleep(backoff)
                    continue
                backoff = 0.0
                if count:
                    worked += count
                    continue
                session.checkin()  # idle: the connection goes back to the pool while asleep
                if burst:
                    break
                self._sleep(self.wake_interval)
        finally:
            session.checkin()
        return worked

    def _log_backoff(self, error: Exception, backoff: float) -> None:
        database = isinstance(
            error, DBAPIError | DisconnectionError | psycopg.Error | OSError | LostSessionError
        )
        logger.log(
            logging.WARNING if database else logging.ERROR,
            "%s: %s error, retrying in %.1fs: %s",
            self.name,
            "database" if database else "unexpected",
            backoff,
            error,
            exc_info=not database,
            extra={"queue": self.queue, "backoff": backoff},
        )

    def work_one(self) -> bool:
        """Lock and work the most urgent ready job of the worker's queues, if there is one,
        on a connection checked out for it.

        :returns: True when a job was worked (completed or failed), False when none was ready.
        """
        session = LockedSession(self.engine, mark=True)
        session.checkout()
        try:
            return self._work_batch(session, limit=1) > 0
        except BaseException:
            session.discard()
            raise
        finally:
            session.checkin()

    def _limit(self) -> int:
        """How many jobs to lock now. After a sleep, one: a few jobs arriving at a quiet
        queue go to as many workers (each worker that finds one wakes another). Then twice
        as many after each full batch, up to ``batch_size``, but fewer when jobs are slow
        (so that the locked ones do not wait behind them): one when a job takes a tenth of
        ``max_hold``."""
        limit = self._ramp
        if self._job_seconds > 0.0:
            limit = min(limit, int(self.max_hold / 10 / self._job_seconds))
        return max(1, min(self.batch_size, limit))

    def _work_batch(self, session: LockedSession, *, limit: int | None = None) -> int:
        """Lock a batch of jobs and work it; return how many jobs were worked."""
        limit = self._limit() if limit is None else limit
        jobs: list[LockedJob] = []
        for queue in self.queues:
            jobs = session.lock(queue, limit)
            if jobs:
                break
        if not jobs:
            return 0
        after_sleep, self._after_sleep = self._after_sleep, False
        if len(jobs) >= limit:
            self._ramp = min(self.batch_size, limit * 2)
        if (after_sleep or len(jobs) >= limit) and self._on_locked is not None:
            # Where there was one job there may be more: let an idle colleague look (it
            # does the same if it finds some).
            self._on_locked()
        locked_at = time.monotonic()
        pending = collections.deque(jobs)
        buffered: list[LockedJob] = []  # completed by their handlers, not yet committed

        def complete_buffered() -> None:
            if buffered:
                self._complete_buffered(session, buffered)

        session.before_transaction = complete_buffered
        # Finished runs for the metrics, given to them once nothing of theirs is left to
        # commit: after each job with per-job completion, once per batch with batched.
        tallied: list[_hooks.TalliedRun] = []
        worked = 0
        try:
            while pending:
                job = pending.popleft()
                if not session.holds(job):
                    continue  # released under us (a handler's leftover locks were cleared)
                self._current = job
                try:
                    self._run(session, job, buffered, tallied)
                finally:
                    self._current = None
                worked += 1
                if tallied and not buffered:
                    _hooks.tally(tallied)
                if self._stopping.is_set() or time.monotonic() - locked_at > self.max_hold:
                    break
            if buffered:
                self._complete_buffered(session, buffered)
            held = [job for job in pending if session.holds(job)]
            if held:
                session.release(held)
        except LostSessionError:
            raise  # its locks are gone with it; the caller discards the session
        except BaseException:
            # Whatever else happened, nothing may stay locked on a session going back to a
            # pool: the caller discards the session if this cleanup cannot be done.
            with contextlib.suppress(Exception):
                if buffered:
                    self._complete_buffered(session, buffered)
            with contextlib.suppress(Exception):
                session.release([job for job in pending if session.holds(job)])
            raise
        finally:
            if tallied:
                _hooks.tally(tallied)
        return worked

    def _complete_buffered(self, session: LockedSession, buffered: list[LockedJob]) -> None:
        jobs, buffered[:] = list(buffered), []
        try:
            session.complete_many(jobs[0].queue, jobs)
        except StatementFailedError as error:
            # One statement for all: fall back to one transaction each, so that one job
            # that cannot be completed does not hold back the others.
            logger.warning(
                "%s: batched completion failed, completing one by one: %s", self.name, error
            )
            for job in jobs:
                try:
                    session.complete(job)
                except StatementFailedError as single:
                    self._fail(session, job, self.registry.get(job.job_class), single, None, 0.0)

    def _open(self, session: LockedSession, context: JobContext) -> Any:
        """Open the job's transaction, with a ``statement_timeout`` of the time it has left
        when it has a timeout."""
        connection = session.open_transaction()
        left = context.time_left()
        if left is not None:
            milliseconds = max(1, math.ceil(left * 1000))
            connection.exec_driver_sql(
                "SELECT set_config('statement_timeout', %s, true)", (f"{milliseconds}ms",)
            )
        return connection

    # -- one job -------------------------------------------------------------------------

    def _run(
        self,
        session: LockedSession,
        job: LockedJob,
        buffered: list[LockedJob],
        tallied: list[_hooks.TalliedRun],
    ) -> None:
        """Run the job's handler and complete or fail the job, timed for the hooks if any."""
        if not _hooks.active:
            self._run_job(session, job, buffered)
            return
        if _hooks.plan.per_run:
            self._run_hooked(session, job, buffered, tallied)
            return
        # Only tallies (the metrics): a tuple per run, nothing else made for them.
        started = time.perf_counter()
        failure = self._run_job(session, job, buffered)
        tallied.append((job, failure is not None, started, time.perf_counter() - started))

    def _run_hooked(
        self,
        session: LockedSession,
        job: LockedJob,
        buffered: list[LockedJob],
        tallied: list[_hooks.TalliedRun],
    ) -> None:
        """:meth:`_run_job` with per-run hooks: a JobRun and a JobOutcome for them (and the
        run counted in ``tallied`` for the tallies, by :func:`_hooks.end`)."""
        hooks = _hooks.active
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
            failure = self._run_job(session, job, buffered)
        except BaseException as error:
            outcome = _hooks.JobOutcome("interrupted", time.perf_counter() - started, error)
            _hooks.end(hooks, run, outcome)
            raise
        duration = time.perf_counter() - started
        if failure is None:
            outcome = _hooks.JobOutcome("done", duration)
        else:
            outcome = _hooks.JobOutcome("failed", duration, failure[0], failure[1])
        _hooks.end(hooks, run, outcome, tallied=tallied)

    def _run_job(
        self, session: LockedSession, job: LockedJob, buffered: list[LockedJob]
    ) -> tuple[Exception, float | None] | None:
        """Run the job's handler and complete or fail the job; returns the error and the
        retry delay of a failure (None: failed for good)."""
        definition = self.registry.get(job.job_class)
        started = time.perf_counter()
        context: JobContext | None = None
        crashed = session.crashed.pop(job.job_id, None)
        if crashed is not None:
            error = JobCrashedError(
                f"job {job.job_id} {job.job_class}: its earlier run ({crashed}) ended without "
                "an outcome; its worker process died (killed, out of memory, os._exit) or "
                "lost its connection"
            )
            return error, self._fail(session, job, definition, error, None, started, reason="crash")
        timeout = self.timeout
        if definition is not None and definition.timeout is not None:
            timeout = definition.timeout
        try:
            if job.run_at is None:
                raise UndecodableJobError(
                    f"run_at {job.run_at_key!r} of job {job.job_id} cannot be represented "
                    "as a Python datetime; the job is rescheduled from now"
                )
            args = json.loads(job.args)
            if not isinstance(args, list):
                args = [args]  # que-go stores a lone value as given: it is one argument
            context = JobContext(
                job_id=job.job_id,
                job_class=job.job_class,
                queue=job.queue,
                priority=job.priority,
                run_at=job.run_at,
                error_count=job.error_count,
                last_error=job.last_error,
                args=args,
                max_attempts=self._max_attempts(definition),
                timeout=timeout,
            )
            bound = context
            context._open_connection = lambda: self._open(session, bound)
            self._context = context
            if definition is None:
                raise UnknownJobClassError(
                    f"no handler for job_class {job.job_class!r} in this worker "
                    f"(it knows {sorted(self.registry) or 'no job classes'})"
                )
            try:
                definition.handler(context, *args)
            finally:
                self._context = None
            self._check_overrun(context, timeout)
            context._finish_session(keep=True)
        except Exception as error:
            if context is not None:
                with contextlib.suppress(Exception):
                    context._finish_session(keep=False)
                error = self._classify(error, context, timeout)
            return error, self._fail(session, job, definition, error, context, started)
        except BaseException:
            # KeyboardInterrupt, SystemExit...: leave the row as it was and let go of it.
            if context is not None:
                with contextlib.suppress(Exception):
                    context._finish_session(keep=False)
            session.abandon(job)
            logger.warning(
                "%s: job %s interrupted; released untouched",
                self.name,
                job.job_id,
                extra=self._extra(job, started),
            )
            raise
        try:
            if self.completion == "batch" and not session.in_transaction:
                buffered.append(job)
            else:
                session.complete(job)
        except StatementFailedError as error:
            # What the server said (a deferred constraint, a serialization failure) is the
            # job's error, as if the handler had raised it.
            cause = error.__cause__
            failure = cause if isinstance(cause, Exception) else error
            return failure, self._fail(session, job, definition, failure, context, started)
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
                extra={**self._extra(job, started), "outcome": "done"},
            )
        return None

    def _extra(self, job: LockedJob, started: float) -> dict[str, Any]:
        return {
            "job_id": job.job_id,
            "job_class": job.job_class,
            "queue": job.queue,
            "priority": job.priority,
            "error_count": job.error_count,
            "elapsed": time.perf_counter() - started,
            "worker": self.name,
        }

    def _max_attempts(self, definition: JobDefinition[Any] | None) -> int:
        if definition is not None and definition.max_attempts is not None:
            return definition.max_attempts
        return self.max_attempts

    @staticmethod
    def _check_overrun(context: JobContext, timeout: float | None) -> None:
        """After the handler returned: a cancelled job or one past its deadline fails."""
        if context.cancel_requested:
            raise JobCancelledError(f"job {context.job_id} was cancelled while it ran")
        left = context.time_left()
        if timeout is not None and left is not None and left < 0:
            raise JobTimeoutError(
                f"job {context.job_id} ran {timeout - left:.3f}s, over its timeout of {timeout:g}s"
            )

    @staticmethod
    def _classify(error: Exception, context: JobContext, timeout: float | None) -> Exception:
        """The failure to record for what the handler raised: a cancel or an overrun wins
        over the handler's own error (which is what they usually cause)."""
        if isinstance(error, JobCancelledError | JobTimeoutError):
            return error
        if context.cancel_requested:
            failure: Exception = JobCancelledError(
                f"job {context.job_id} was cancelled while it ran; it raised "
                f"{_error_class_name(error)}: {_message(error)}"
            )
        elif (
            timeout is not None
            and (left := context.time_left()) is not None
            and (
                left < 0 or isinstance(getattr(error, "orig", error), psycopg.errors.QueryCanceled)
            )
        ):
            failure = JobTimeoutError(
                f"job {context.job_id} overran its timeout of {timeout:g}s; it raised "
                f"{_error_class_name(error)}: {_message(error)}"
            )
        else:
            return error
        failure.__cause__ = error
        failure.__traceback__ = error.__traceback__
        return failure

    def _fail(
        self,
        session: LockedSession,
        job: LockedJob,
        definition: JobDefinition[Any] | None,
        error: Exception,
        context: JobContext | None,
        started: float,
        *,
        reason: str = "error",
    ) -> float | None:
        """Record the failure (a retry, or the job failed for good); return the retry delay,
        None when the job will not run again."""
        self.failed += 1
        count = job.error_count + 1
        reason, final, delay = failure_outcome(
            error, count, self._max_attempts(definition), definition, reason
        )
        extra = {**self._extra(job, started), "outcome": "error", "retry_in": delay}
        if final:
            extra = {**extra, "outcome": "failed", "reason": reason}
            del extra["retry_in"]
        try:
            try:
                if final:
                    session.fail(job, last_error=format_last_error(error), reason=reason)
                else:
                    session.record_error(job, delay=delay, last_error=format_last_error(error))
            except StatementFailedError:
                logger.exception(
                    "%s: could not record the error of job %s; recording it plainly",
                    self.name,
                    job.job_id,
                    extra=extra,
                )
                # A record that cannot fail: the job must not stay ready, or the worker
                # would take it again at once, in a loop.
                if final:
                    session.fail(job, last_error=_error_class_name(error), reason=reason)
                else:
                    session.record_error(
                        job, delay=default_retry_delay(count), last_error=_error_class_name(error)
                    )
        except LostSessionError:
            # The lock went with the lost session. Another worker may be working the job
            # now, so its row is left alone: the job is retried as it is.
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
            # Nothing recorded: stop taking jobs for a while (Worker.run backs off and
            # discards the session, which releases the lock) rather than take it again.
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
                extra={**extra, "error_count": count},
            )
            self._report(error, context)
            return None
        logger.error(
            "%s: job %s %s failed (error %d), retrying in %.0fs: %s",
            self.name,
            job.job_id,
            job.job_class,
            count,
            delay,
            _message(error),
            exc_info=error,
            extra={**extra, "error_count": count},
        )
        self._report(error, context)
        return delay

    def _report(self, error: Exception, context: JobContext | None) -> None:
        if self.on_error is not None and context is not None:
            try:
                self.on_error(error, context)
            except Exception:
                logger.exception("%s: the error reporter raised; ignored", self.name)
