"""Workers: lock a job, run its handler, complete or reschedule it, and let go of the lock.

A :class:`Worker` works one queue. For each job it checks a ``Connection`` out of the Engine,
locks the job on it (see :mod:`sqlalchemy_que.locking`), runs the handler inside a transaction
on that same connection, deletes the job in that transaction on success, or records the error
and reschedules the job on failure, then unlocks and returns the connection clean. If the
unlock cannot be confirmed, the connection is invalidated so that the server ends the session
and the lock with it: a connection never goes back to the pool holding a job lock.

A :class:`WorkerPool` runs several workers in threads on one Engine::

    from sqlalchemy import create_engine
    from sqlalchemy_que import WorkerPool

    def print_name(job, name):
        print("hello", name)

    engine = create_engine(url, pool_size=5, pool_pre_ping=True)
    pool = WorkerPool(engine, {"PrintName": print_name}, workers=4)
    pool.start()
    ...
    still_running = pool.shutdown(timeout=30)

Handlers take the running job (:class:`~sqlalchemy_que.JobContext`) first, then the job's
positional arguments. Failures follow Que: ``error_count + 1``, ``run_at = now() + delay``
(``count ** 4 + 3`` seconds unless the job says otherwise) and ``last_error`` in Ruby Que's
layout. A failing job is never deleted by the error path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.pool import AssertionPool, QueuePool, StaticPool

from .errors import QueError, UnknownJobClassError, WorkerError
from .jobs import JobContext, JobDefinition, JobRegistry, default_retry_delay
from .listener import Listener
from .locking import (
    UNLOCK_JOB,
    LockedJob,
    as_dbapi_error,
    driver_connection,
    driver_sql,
    lock_on_driver,
    unlock_job,
)
from .schema import check_schema

__all__ = ["ErrorReporter", "Worker", "WorkerPool", "format_last_error"]


class _LostLockError(QueError):
    """The session holding a job's lock was replaced while the job ran."""


logger = logging.getLogger("sqlalchemy_que.worker")

#: Called with the exception and the job after a job fails; its own errors are only logged.
ErrorReporter = Callable[[BaseException, JobContext], object]

#: What a worker is given to know its jobs: a registry, a mapping of job_class to handler or
#: definition, or an iterable of definitions.
Handlers = JobRegistry | Mapping[str, Any] | Iterable[JobDefinition[Any]]

DELETE_JOB = text(
    "DELETE FROM que_jobs "
    "WHERE queue = :queue AND priority = :priority AND run_at = :run_at AND job_id = :job_id"
)
_COMPLETE_SQL = f"{driver_sql(DELETE_JOB)}; COMMIT; {driver_sql(UNLOCK_JOB)}"
_IDLE = psycopg.pq.TransactionStatus.IDLE

RECORD_ERROR = text(
    "UPDATE que_jobs "
    "SET error_count = error_count + 1, "
    "    run_at = now() + make_interval(secs => :delay), "
    "    last_error = :last_error "
    "WHERE queue = :queue AND priority = :priority AND run_at = :run_at AND job_id = :job_id"
)

#: Ruby Que cuts the first line of ``last_error`` ("Class: message") to this many characters.
LAST_ERROR_FIRST_LINE = 500

_MAX_BACKOFF = 30.0

#: The longest retry delay written (about 100 years), well within PostgreSQL's intervals.
MAX_RETRY_DELAY = 100 * 365.25 * 24 * 3600.0


def _error_class_name(error: BaseException) -> str:
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    if cls.__module__.startswith("sqlalchemy_que"):
        return f"sqlalchemy_que.{cls.__qualname__}"  # as users see it: public names
    return f"{cls.__module__}.{cls.__qualname__}"


def format_last_error(error: BaseException) -> str:
    """``last_error`` as Ruby Que 0.14.3 lays it out, with the Python class and traceback.

    The first line is ``"<ErrorClass>: <message>"`` (the class alone when the message is
    blank) cut to 500 characters; each following line is one frame of the traceback,
    innermost first, as Ruby's backtraces are: ``path:line:in function``.
    """
    message = str(error)
    name = _error_class_name(error)
    first = f"{name}: {message}" if message.strip() else name
    frames = [
        f"{frame.filename}:{frame.lineno}:in {frame.name}"
        for frame in reversed(traceback.extract_tb(error.__traceback__))
    ]
    text = "\n".join([first[:LAST_ERROR_FIRST_LINE], *frames])
    # PostgreSQL text holds no NUL and only valid UTF-8: escape what it cannot store.
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _registry(handlers: Handlers) -> JobRegistry:
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


def _check_wake_interval(wake_interval: float) -> float:
    if (
        isinstance(wake_interval, bool)
        or not isinstance(wake_interval, int | float)
        or not math.isfinite(wake_interval)
        or wake_interval <= 0
    ):
        raise WorkerError(
            f"wake_interval must be a positive number of seconds, got {wake_interval!r}"
        )
    return float(wake_interval)


class Worker:
    """Works the jobs of one queue, one at a time, on connections from ``engine``.

    :param engine: the Engine to check connections out of; each job holds one connection
        from lock to unlock. Use a real session, not a transaction-pooling proxy.
    :param handlers: a :class:`~sqlalchemy_que.JobRegistry`, a mapping of job_class to handler
        (or to :class:`~sqlalchemy_que.JobDefinition`), or an iterable of definitions.
    :param queue: the queue to work; default ``''``, Que's default queue.
    :param wake_interval: seconds to sleep when no job is ready; default 5.
    :param on_error: called with the exception and the job after a job fails; whatever it
        raises is logged, never fatal.
    :param name: a name for logs; default ``"worker"``.
    :param on_locked: called when the worker locks its first job after a sleep (a pool uses
        it to wake one idle worker, since one ready job often means more).
    """

    def __init__(
        self,
        engine: Engine,
        handlers: Handlers,
        *,
        queue: str = "",
        wake_interval: float = 5.0,
        on_error: ErrorReporter | None = None,
        name: str = "worker",
        on_locked: Callable[[], object] | None = None,
    ) -> None:
        if not isinstance(queue, str):
            raise WorkerError(f"queue must be a str, got {queue!r}")
        self.engine = engine
        self.registry = _registry(handlers)
        self.queue = queue
        self.wake_interval = _check_wake_interval(wake_interval)
        self.on_error = on_error
        self.name = name
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._current: LockedJob | None = None
        self._on_locked = on_locked
        self._after_sleep = True
        self.sleeping = False

    # -- control -------------------------------------------------------------------------

    @property
    def current_job(self) -> LockedJob | None:
        """The job being worked right now, if any."""
        return self._current

    def stop(self) -> None:
        """Ask the worker to stop: it takes no new job, finishes the current one, and a
        sleeping worker wakes at once."""
        self._stopping.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wake(self) -> None:
        """Cut the current sleep short and look for a job now."""
        self._wake.set()

    def _sleep(self, seconds: float) -> None:
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

        Jobs are worked back to back while any are ready, on one connection kept between
        them (it is returned to the pool, clean, when the worker goes to sleep); with none
        ready the worker sleeps for ``wake_interval``. Database errors make it back off
        (0.1 s doubling up to 30 s) and retry; no error from a job or the database stops it.
        ``KeyboardInterrupt`` and ``SystemExit`` raised by a handler release the job
        untouched and stop the worker.

        :returns: the number of jobs worked (completed or failed).
        """
        worked = 0
        backoff = 0.0
        connection: Connection | None = None
        try:
            while not self._stopping.is_set():
                try:
                    if connection is None or connection.invalidated:
                        connection = self._discard(connection)
                        connection = _checkout(self.engine)
                    did_work = self._work_one_on(connection)
                except Exception as error:
                    connection = self._discard(connection)
                    backoff = min(max(backoff * 2, 0.1), _MAX_BACKOFF)
                    database = isinstance(
                        error, DBAPIError | DisconnectionError | psycopg.Error | OSError
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
                    self._sleep(backoff)
                    continue
                backoff = 0.0
                if did_work:
                    worked += 1
                    continue
                _checkin(connection)  # idle: give the connection back while asleep
                connection = None
                if burst:
                    break
                self._sleep(self.wake_interval)
        finally:
            if connection is not None:
                _checkin(connection)
        return worked

    @staticmethod
    def _discard(connection: Connection | None) -> None:
        if connection is not None:
            with contextlib.suppress(Exception):
                _checkin(connection)
        return None

    def work_one(self) -> bool:
        """Lock and work the most urgent ready job of the queue, if there is one, on a
        connection checked out for it.

        :returns: True when a job was worked (completed or failed), False when none was ready.
        """
        connection = _checkout(self.engine)
        try:
            return self._work_one_on(connection)
        finally:
            _checkin(connection)

    def _work_one_on(self, connection: Connection) -> bool:
        """Work one job on ``connection``, checked out by :func:`_checkout` (autocommit)."""
        after_sleep, self._after_sleep = self._after_sleep, False
        try:
            job = lock_on_driver(driver_connection(connection), self.queue, begin=True)
        except psycopg.Error as error:
            connection.invalidate()  # it may hold a lock we cannot account for
            raise as_dbapi_error(error) from error
        except BaseException:
            connection.invalidate()
            raise
        if job is None:
            return False
        # The DBAPI connection is the session that holds the lock. If SQLAlchemy ever
        # replaces it (after a disconnect), the lock is gone and nothing more may be
        # written about the job from here: another worker may hold it by now.
        holder = connection.connection.dbapi_connection
        self._current = job
        released = False
        try:
            if after_sleep and self._on_locked is not None:
                # The first job after a sleep: where there is one there may be more, so let
                # an idle colleague look (it does the same if it finds one).
                self._on_locked()
            released = self._work(connection, job, holder)
        finally:
            try:
                if not released:
                    self._release(connection, job, holder)
            finally:
                self._current = None
        return True

    @staticmethod
    def _holds_lock(connection: Connection, holder: object) -> bool:
        """True while ``connection`` is still the session that took the job's lock."""
        if connection.invalidated or connection.closed:
            return False
        try:
            return connection.connection.dbapi_connection is holder
        except Exception:
            return False

    # -- one job -------------------------------------------------------------------------

    def _work(self, connection: Connection, job: LockedJob, holder: object) -> bool:
        """Run the job's handler and complete or fail the job; True when the job's lock was
        released on the way (by the completing round trip)."""
        definition = self.registry.get(job.job_class)
        started = time.perf_counter()
        context: JobContext | None = None
        try:
            # The server is inside the job's transaction (BEGIN went with the re-check).
            # Tell SQLAlchemy too, so that the handler's Session joins that transaction
            # rather than owning (and committing) one of its own.
            transaction = connection.begin()
            args = json.loads(job.args)
            if not isinstance(args, list):
                raise QueError(f"args of job {job.job_id} is {job.args!r}, not a JSON array")
            context = JobContext(
                job_id=job.job_id,
                job_class=job.job_class,
                queue=job.queue,
                priority=job.priority,
                run_at=job.run_at,
                error_count=job.error_count,
                last_error=job.last_error,
                args=args,
                connection=connection,
            )
            if definition is None:
                raise UnknownJobClassError(
                    f"no handler for job_class {job.job_class!r} in this worker "
                    f"(it knows {sorted(self.registry) or 'no job classes'})"
                )
            definition.handler(context, *args)
            context._finish_session(keep=True)
            if not self._holds_lock(connection, holder):
                raise _LostLockError(
                    f"the connection that held job {job.job_id}'s lock was lost during the job"
                )
            released = _complete(connection, job)
            transaction.commit()  # the server has committed already: bookkeeping only
        except Exception as error:
            if context is not None:
                context._finish_session(keep=False)
            self._fail(connection, job, holder, definition, error, context, started)
            return False
        except BaseException:
            # KeyboardInterrupt, SystemExit...: leave the row as it was; the caller unlocks.
            if context is not None:
                context._finish_session(keep=False)
            self._rollback_quietly(connection)
            logger.warning(
                "%s: job %s interrupted; released untouched",
                self.name,
                job.job_id,
                extra=self._extra(job, started),
            )
            raise
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "%s: job %s %s done in %.1f ms",
                self.name,
                job.job_id,
                job.job_class,
                (time.perf_counter() - started) * 1000,
                extra={**self._extra(job, started), "outcome": "done"},
            )
        if not released:
            connection.invalidate()  # the unlock was not confirmed
        return True

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

    @staticmethod
    def _rollback_quietly(connection: Connection) -> None:
        try:
            connection.rollback()
        except Exception:
            logger.debug("rollback failed", exc_info=True)

    def _retry_delay(self, definition: JobDefinition[Any] | None, error_count: int) -> float:
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

    def _fail(
        self,
        connection: Connection,
        job: LockedJob,
        holder: object,
        definition: JobDefinition[Any] | None,
        error: Exception,
        context: JobContext | None,
        started: float,
    ) -> None:
        self._rollback_quietly(connection)
        count = job.error_count + 1
        delay = self._retry_delay(definition, count)
        extra = {**self._extra(job, started), "outcome": "error", "retry_in": delay}
        if not self._holds_lock(connection, holder):
            # The lock went with the lost session. Another worker may be working the job
            # now, so leave the row alone: the job is retried as it is.
            logger.error(
                "%s: job %s %s failed after its connection was lost; leaving it as it was "
                "for a retry: %s",
                self.name,
                job.job_id,
                job.job_class,
                error,
                exc_info=error,
                extra=extra,
            )
            self._report(error, context)
            return
        attempts = [
            (format_last_error(error), delay),
            # Should the first fail, a record that cannot: the job must not stay ready, or
            # the worker would take it again at once, in a loop.
            (_error_class_name(error), default_retry_delay(count)),
        ]
        for last_error, seconds in attempts:
            try:
                connection.execute(
                    RECORD_ERROR, {**job.key, "delay": seconds, "last_error": last_error}
                )
                connection.commit()
                break
            except Exception:
                logger.exception(
                    "%s: could not record the error of job %s", self.name, job.job_id, extra=extra
                )
                self._rollback_quietly(connection)
        else:
            self._report(error, context)
            # Nothing recorded: stop taking jobs for a while (Worker.run backs off) rather
            # than take this one again at once.
            raise QueError(f"could not record the error of job {job.job_id}; backing off")
        logger.error(
            "%s: job %s %s failed (error %d), retrying in %.0fs: %s",
            self.name,
            job.job_id,
            job.job_class,
            count,
            delay,
            error,
            exc_info=error,
            extra=extra,
        )
        self._report(error, context)

    def _report(self, error: Exception, context: JobContext | None) -> None:
        if self.on_error is not None and context is not None:
            try:
                self.on_error(error, context)
            except Exception:
                logger.exception("%s: the error reporter raised; ignored", self.name)

    def _release(self, connection: Connection, job: LockedJob, holder: object) -> None:
        """Unlock the job; invalidate the connection unless the unlock is confirmed."""
        released = False
        if not self._holds_lock(connection, holder):
            # The locking session is gone (and its lock with it); whatever session the
            # connection has now must not run anything about the job.
            if not connection.invalidated and not connection.closed:
                connection.invalidate()
            return
        try:
            if connection.in_transaction():
                connection.rollback()
            raw = driver_connection(connection)
            if raw.info.transaction_status != _IDLE:
                raw.rollback()  # the job's transaction, opened by an explicit BEGIN
            released = unlock_job(connection, job.job_id)
            connection.commit()
        except Exception:
            logger.warning(
                "%s: could not unlock job %s; discarding the connection so the server "
                "releases the lock",
                self.name,
                job.job_id,
                exc_info=True,
                extra={"job_id": job.job_id},
            )
            released = False
        finally:
            if not released and not connection.invalidated:
                connection.invalidate()


def _complete(connection: Connection, job: LockedJob) -> bool:
    """Delete the job, commit, and unlock it, in one round trip; True if the unlock is
    confirmed.

    The three statements go as one multi-statement query (parameters bound client-side,
    safely quoted): the server runs them in order and stops at the first error, so the
    unlock never happens before the ``COMMIT`` has succeeded, and a failed ``DELETE`` or
    ``COMMIT`` raises with the lock still held.
    """
    raw = driver_connection(connection)
    try:
        cursor = psycopg.ClientCursor(raw)
        cursor.execute(_COMPLETE_SQL, job.key)
        cursor.nextset()  # past the DELETE's result
        cursor.nextset()  # past the COMMIT's
        row = cursor.fetchone()
    except psycopg.Error:
        if raw.closed or raw.broken:
            connection.invalidate()  # so that SQLAlchemy never hands it out again
        raise
    return bool(row and row[0])


def _checkout(engine: Engine) -> Connection:
    """A connection for a worker: the driver in autocommit mode, the job's transaction
    being opened and committed by explicit statements that share round trips with others."""
    connection = engine.connect()
    try:
        driver_connection(connection).autocommit = True
    except BaseException:
        connection.close()
        raise
    return connection


def _checkin(connection: Connection) -> None:
    """Give a worker's connection back to the pool as the pool expects it (not autocommit,
    no transaction), or discard it when that cannot be confirmed."""
    try:
        if not connection.invalidated and not connection.closed:
            raw = driver_connection(connection)
            if raw.closed or raw.broken or raw.info.transaction_status != _IDLE:
                connection.invalidate()
            else:
                raw.autocommit = False
    except Exception:
        logger.debug("discarding a worker connection", exc_info=True)
        with contextlib.suppress(Exception):
            connection.invalidate()
    finally:
        connection.close()


def _pool_capacity(engine: Engine) -> float:
    pool = engine.pool
    if isinstance(pool, QueuePool):
        overflow = getattr(pool, "_max_overflow", 0)  # no public accessor
        return math.inf if overflow < 0 else pool.size() + overflow
    if isinstance(pool, StaticPool | AssertionPool):
        return 1
    return math.inf  # NullPool and others open connections as needed


class WorkerPool:
    """Several :class:`Worker` threads on one Engine and one queue.

    Each worker holds one connection for the whole of each job, so the Engine's pool must
    be able to hand out at least ``workers`` connections at once: :meth:`start` checks it and
    refuses with an explanation otherwise (``create_engine(url, pool_size=workers)``).

    Usable as a context manager, which starts the pool and shuts it down on exit.

    :param workers: how many worker threads; default 4, as Ruby Que.
    :param check_schema: check at start that ``que_jobs`` is a Que 0.x version 3 table.
    :param listen: keep one extra, dedicated connection listening for the notifications our
        enqueue sends, so that jobs start within milliseconds of their commit instead of at
        the next poll (see :mod:`sqlalchemy_que.listener`). Turn it off where ``LISTEN``
        does not work, such as behind a transaction-pooling proxy; polling every
        ``wake_interval`` still finds every job.
    Other parameters as for :class:`Worker`.
    """

    def __init__(
        self,
        engine: Engine,
        handlers: Handlers,
        *,
        queue: str = "",
        workers: int = 4,
        wake_interval: float = 5.0,
        on_error: ErrorReporter | None = None,
        check_schema: bool = True,
        listen: bool = True,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise WorkerError(f"workers must be a whole number >= 1, got {workers!r}")
        self.engine = engine
        self.registry = _registry(handlers)
        self.queue = queue
        self.check_schema = check_schema
        self.workers = [
            Worker(
                engine,
                self.registry,
                queue=queue,
                wake_interval=wake_interval,
                on_error=on_error,
                name=f"que-worker-{index}",
                on_locked=self._wake_idle,
            )
            for index in range(workers)
        ]
        self._threads: list[threading.Thread] = []
        self.listener = Listener(engine, queue, self._wake_idle) if listen else None

    def _wake_idle(self) -> None:
        """Wake one sleeping worker, if any: one ready job wakes one worker, and each worker
        that then finds a job wakes the next, so a burst of jobs wakes as many workers as
        there are jobs (plus one, which finds nothing and sleeps again), and a single job
        does not wake the whole pool."""
        for worker in self.workers:
            if worker.sleeping:
                worker.wake()
                return
        # Nobody asleep: an idle worker may be between its last look and its sleep, having
        # looked before the job was committed. Its wake flag makes that sleep end at once.
        for worker in self.workers:
            if worker.current_job is None:
                worker.wake()
                return

    def _preflight(self) -> None:
        if self.engine.dialect.driver != "psycopg":
            raise WorkerError(
                f"workers need the psycopg (3) driver, but this Engine uses "
                f"{self.engine.dialect.driver!r}; use a postgresql+psycopg:// URL"
            )
        capacity = _pool_capacity(self.engine)
        if capacity < len(self.workers):
            pool = self.engine.pool
            raise WorkerError(
                f"the Engine's connection pool ({type(pool).__name__}, {pool.status()}) hands "
                f"out at most {capacity:g} connections, but this WorkerPool has "
                f"{len(self.workers)} workers, each holding one connection for the whole of "
                f"each job. Create the Engine with create_engine(url, pool_size="
                f"{len(self.workers)}) (plus what the rest of the process needs), or use "
                "fewer workers"
            )
        if self.check_schema:
            with self.engine.connect() as connection:
                check_schema(connection)

    def start(self, *, burst: bool = False) -> None:
        """Check the Engine and the schema, then start the worker threads.

        :param burst: each worker stops when no job is ready instead of sleeping.
        :raises WorkerError: when the Engine's pool is too small for the workers.
        :raises SchemaError: when ``que_jobs`` is missing or not a Que 0.x version 3 table.
        """
        if self._threads:
            raise WorkerError("this WorkerPool was already started")
        self._preflight()
        if self.listener is not None and not burst:  # a burst ends when nothing is ready
            self.listener.start()
        for worker in self.workers:
            thread = threading.Thread(
                target=worker.run, kwargs={"burst": burst}, name=worker.name, daemon=True
            )
            self._threads.append(thread)
            thread.start()
        logger.info(
            "started %d workers on queue %r",
            len(self.workers),
            self.queue,
            extra={"queue": self.queue, "workers": len(self.workers)},
        )

    @property
    def running_jobs(self) -> list[LockedJob]:
        """The jobs being worked right now."""
        return [job for worker in self.workers if (job := worker.current_job) is not None]

    def wake(self, count: int | None = None) -> None:
        """Wake up to ``count`` sleeping workers (all when None)."""
        for worker in self.workers[: count if count is not None else len(self.workers)]:
            worker.wake()

    def is_alive(self) -> bool:
        """True while any worker thread runs."""
        return any(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker threads to end; True when all have ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        if self.is_alive():
            return False
        if self.listener is not None:
            self.listener.stop()  # nobody left to wake
        return True

    def shutdown(self, timeout: float | None = None) -> list[LockedJob]:
        """Stop taking jobs at once, let jobs in progress finish, and return within ``timeout``.

        :returns: the jobs still running when the timeout ran out (empty when all finished).
            Their rows are intact; each is completed by its worker when its handler returns,
            and its lock is released at the latest when its connection closes (at process
            exit for the worker threads, which are daemons).
        """
        started = time.monotonic()
        for worker in self.workers:
            worker.stop()
        if self.listener is not None:
            self.listener.stop(timeout)
        self.join(None if timeout is None else max(0.0, timeout - (time.monotonic() - started)))
        still_running = self.running_jobs
        if still_running:
            logger.warning(
                "shutdown timed out with %d job(s) still running: %s",
                len(still_running),
                ", ".join(str(job.job_id) for job in still_running),
            )
        return still_running

    def run(
        self,
        *,
        burst: bool = False,
        shutdown_timeout: float | None = None,
        handle_signals: bool = True,
    ) -> list[LockedJob]:
        """Start the pool and block until it is told to stop; what the CLI's ``worker`` runs.

        It returns when every worker has ended (with ``burst``, once no job is ready), or
        after SIGTERM or SIGINT, which shut the pool down gracefully: no new job is taken
        and jobs in progress get ``shutdown_timeout`` seconds to finish. A second signal
        ends the process at once (exit status 128 + signal number); jobs in progress are
        then rolled back by the server as their connections close, their rows intact.

        :param handle_signals: install the SIGTERM/SIGINT handlers (main thread only).
        :returns: the jobs still running when the shutdown timeout ran out.
        """
        stop = threading.Event()
        received: list[int] = []

        def on_signal(signum: int, frame: object) -> None:
            received.append(signum)
            if len(received) > 1:
                logger.warning("second signal (%s): stopping at once", signal.Signals(signum).name)
                os._exit(128 + signum)
            logger.info(
                "%s received: finishing jobs in progress, then stopping "
                "(send it again to stop at once)",
                signal.Signals(signum).name,
            )
            stop.set()

        previous: dict[int, Any] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            self.start(burst=burst)
            while self.is_alive() and not stop.wait(0.1):
                pass
            return self.shutdown(shutdown_timeout)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
