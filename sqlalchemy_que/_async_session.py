"""The one owner of an async worker task's locked connection.

:class:`AsyncLockedSession` is the asyncio twin of
:class:`~sqlalchemy_que._session.LockedSession`, with the same guarantees and the same named
statements of :mod:`sqlalchemy_que._sql`, on an ``AsyncConnection`` of psycopg's async driver:

* :meth:`checkout` takes a connection over (autocommit on, its settings recorded) and
  :meth:`checkin` gives it back with no transaction, no advisory lock and its settings, or
  invalidates it so that the server ends the session and its locks;
* :meth:`lock` takes up to K job locks in one statement, re-checks them and writes their crash
  marks in another;
* the job's transaction opens on the handler's first statement (see :meth:`begin_job`):
  ``BEGIN`` is sent from SQLAlchemy's ``before_cursor_execute`` event, so a handler that never
  uses the database costs no round trip (and no hop into SQLAlchemy's greenlet);
* :meth:`complete`, :meth:`record_error`, :meth:`fail` end the job and unlock it in one
  round trip (libpq's pipeline mode), as the sync session does;
* the handler's ``commit()``/``rollback()`` on ``job.connection`` are refused.

Its own statements go straight to libpq (``PGconn``), waiting on the socket through the event
loop. A wait cut short (a cancelled task) leaves the wire in an unknown state: the session is
then marked broken and discarded at check-in, which ends its locks with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import pq
from sqlalchemy import Connection, RootTransaction, event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import await_only, greenlet_spawn

from . import _sql
from ._errors import LockError, LostSessionError, QueError
from ._session import (
    _FATAL,
    _IDLE,
    _INERROR,
    _PREPARED_KEY,
    _SYNC,
    _TIMESTAMPTZ_OID,
    LOCK_ATTEMPTS,
    LockedJob,
    StatementFailedError,
    _array,
    _begin_options,
    _keys_params,
    _Saved,
)
from ._sql import Statement

__all__ = ["AsyncLockedSession"]

logger = logging.getLogger("sqlalchemy_que.worker")

Step = tuple[Statement | bytes, Sequence[bytes | None]]

#: The job run the current task works on: set in the worker's task by
#: :meth:`AsyncLockedSession.begin_job`, and so seen by the tasks its handler starts (each
#: starts with a copy of its creator's context), as by a plain handler's greenlet.
_RUN: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "sqlalchemy_que_async_run", default=None
)


class AsyncLockedSession:
    """Owns one connection of ``engine`` for one worker task (not shared between tasks).

    :param engine: an ``AsyncEngine`` on psycopg's async driver.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        #: Jobs of the last :meth:`lock` whose earlier run ended without an outcome.
        self.crashed: dict[int, str] = {}
        self.connection: AsyncConnection | None = None
        self._raw: psycopg.AsyncConnection[Any] | None = None
        self._pgconn: pq.abc.PGconn | None = None
        self._pid = 0
        self._saved: _Saved | None = None
        self._begin = _sql.BEGIN
        self._held: dict[int, LockedJob] = {}
        self._view: RootTransaction | None = None  # SQLAlchemy's view of the job's transaction
        self._open = False  # the server is inside the job's transaction
        self._touched = False  # a handler's statement ran since checkout
        self._job_begin: bytes | None = None  # what opens the running job's transaction
        self._job_run: object | None = None  # the running job's run, until its outcome is sent
        self._ending = False
        self._broken = False  # a wait on the wire was cut short
        self._on_wire = False  # inside one of the session's own round trips
        self._load_run_at: Any = None

    # -- checkout and check-in ---------------------------------------------------------

    @property
    def checked_out(self) -> bool:
        return self.connection is not None

    def holds(self, job: LockedJob) -> bool:
        return job.job_id in self._held

    @property
    def driver_connection(self) -> psycopg.AsyncConnection[Any] | None:
        """psycopg's connection under the session (to cancel a handler's statement)."""
        return self._raw

    @property
    def on_wire(self) -> bool:
        """Whether one of the session's own round trips (locking, releasing, ending a job,
        checking in) is waiting for its answer. Its statements run whatever becomes of that
        wait: the crash marks of a lock are committed, so a task cut short there leaves them
        behind."""
        return self._on_wire

    @property
    def held(self) -> list[LockedJob]:
        return list(self._held.values())

    async def checkout(self) -> None:
        if self.connection is not None:
            raise LockError("this session already has a connection")
        connection = await self.engine.connect()
        try:
            raw = (await connection.get_raw_connection()).driver_connection
            if not isinstance(raw, psycopg.AsyncConnection):
                raise QueError(
                    "the async worker needs psycopg's async driver; this connection uses "
                    f"{type(raw).__module__}.{type(raw).__qualname__} (create the AsyncEngine "
                    "with a postgresql+psycopg:// URL)"
                )
            if raw.info.transaction_status != _IDLE:
                raise QueError("the Engine handed out a connection inside a transaction")
            saved = _Saved(
                autocommit=raw.autocommit,
                isolation_level=raw.isolation_level,
                read_only=raw.read_only,
                deferrable=raw.deferrable,
                prepare_threshold=raw.prepare_threshold,
            )
            await raw.set_autocommit(True)
            raw.prepare_threshold = None  # see LockedSession.checkout
            self.connection, self._raw, self._pgconn = connection, raw, raw.pgconn
            self._pid = raw.pgconn.backend_pid
            self._saved = saved
            self._touched = self._broken = False
            self._begin = _sql.BEGIN + _begin_options(saved)
            loader = raw.adapters.get_loader(_TIMESTAMPTZ_OID, pq.Format.TEXT)
            assert loader is not None
            self._load_run_at = loader(_TIMESTAMPTZ_OID, raw).load
            sync = connection.sync_connection
            assert sync is not None
            event.listen(sync, "commit", self._refuse_commit)
            event.listen(sync, "rollback", self._refuse_rollback)
            event.listen(sync, "before_cursor_execute", self._before_statement)
            event.listen(sync, "begin", self._before_begin)
        except BaseException:
            self.connection = None
            await self._discard(connection)
            raise

    async def checkin(self) -> None:
        """Give the connection back clean, or invalidate it when that cannot be confirmed."""
        connection = self.connection
        if connection is None:
            return
        raw, saved = self._raw, self._saved
        may_hold_locks = self._touched or bool(self._held)
        self._held.clear()
        try:
            assert raw is not None and saved is not None
            await self._end_view()
            sync = connection.sync_connection
            assert sync is not None
            event.remove(sync, "commit", self._refuse_commit)
            event.remove(sync, "rollback", self._refuse_rollback)
            event.remove(sync, "before_cursor_execute", self._before_statement)
            event.remove(sync, "begin", self._before_begin)
            if not self._alive() or raw.info.transaction_status != _IDLE:
                raise LostSessionError("the session is broken or inside a transaction")
            if may_hold_locks:
                await self._run([(_sql.UNLOCK_ALL.sql, [])], "checking in")
            raw.prepare_threshold = saved.prepare_threshold
            await raw.set_autocommit(saved.autocommit)
            await raw.set_isolation_level(saved.isolation_level)
            await raw.set_read_only(saved.read_only)
            await raw.set_deferrable(saved.deferrable)
        except Exception:
            logger.debug("discarding a worker connection", exc_info=True)
            await self._discard(connection)
        except BaseException:  # cancelled while checking in: its state is unknown
            await self._discard(connection)
            raise
        else:
            await connection.close()
        finally:
            self.connection = None
            self._raw = self._pgconn = None
            self._open = False

    async def discard(self) -> None:
        """Drop the connection: its server session, and every lock on it, end with it."""
        connection, self.connection = self.connection, None
        self._held.clear()
        self._view = None
        self._open = False
        self._raw = self._pgconn = None
        if connection is not None:
            await self._discard(connection)

    @staticmethod
    async def _discard(connection: AsyncConnection) -> None:
        with contextlib.suppress(Exception):
            await connection.invalidate()
        with contextlib.suppress(Exception):
            await connection.close()

    # -- the wire ------------------------------------------------------------------------

    def _alive(self) -> bool:
        pgconn, connection = self._pgconn, self.connection
        if pgconn is None or connection is None or self._broken:
            return False
        sync = connection.sync_connection
        return (
            pgconn.status == pq.ConnStatus.OK
            and pgconn.backend_pid == self._pid
            and sync is not None
            and not sync.invalidated
            and sync.connection.driver_connection is self._raw
        )

    def _lost(self, what: str) -> LostSessionError:
        return LostSessionError(f"the worker's session was lost while {what}")

    async def _wait(self, socket: int, *, write: bool = False) -> None:
        """Wait until libpq's socket can be read (or written)."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(socket, wake)
        if write:
            loop.add_writer(socket, wake)
        try:
            await ready
        finally:
            loop.remove_reader(socket)
            if write:
                loop.remove_writer(socket)

    async def _flush(self, pgconn: pq.abc.PGconn) -> None:
        while pgconn.flush():  # 1: more to send once the socket takes it
            await self._wait(pgconn.socket, write=True)
            pgconn.consume_input()  # a server waiting for us to read may not read either

    async def _result(self, pgconn: pq.abc.PGconn) -> pq.abc.PGresult | None:
        """The next result: parsed from what was already read when it is there (is_busy()
        reads no socket), else waited for."""
        while pgconn.is_busy():
            await self._wait(pgconn.socket)
            pgconn.consume_input()
        return pgconn.get_result()

    async def _prepare(self, statements: Sequence[Statement]) -> None:
        assert self.connection is not None and self._pgconn is not None
        info = self.connection.info
        prepared: set[bytes] = info.setdefault(_PREPARED_KEY, set())
        for statement in statements:
            if statement.name in prepared:
                continue
            self._pgconn.send_prepare(statement.name, statement.sql)
            await self._flush(self._pgconn)
            result = await self._result(self._pgconn)
            while await self._result(self._pgconn) is not None:
                pass
            self._check(result, "preparing a statement")
            prepared.add(statement.name)

    def _forget_prepared(self) -> None:
        if self.connection is not None:
            self.connection.info.pop(_PREPARED_KEY, None)

    def _check(self, result: pq.abc.PGresult | None, what: str) -> pq.abc.PGresult:
        if result is None or self._pgconn is None or self._pgconn.status != pq.ConnStatus.OK:
            raise self._lost(what)
        if result.status == _FATAL:
            raise psycopg.errors.error_from_result(result, encoding="utf-8")
        return result

    async def _run(self, steps: Sequence[Step], what: str) -> list[pq.abc.PGresult | None]:
        self._on_wire = True
        try:
            return await self._run_steps(steps, what)
        finally:
            self._on_wire = False

    async def _run_steps(self, steps: Sequence[Step], what: str) -> list[pq.abc.PGresult | None]:
        """Send the steps in one round trip (a pipeline with one sync point) and return one
        result per step: None for a step the server skipped after an earlier one failed.
        Prepared statements are used outside a job's transaction only (see
        :meth:`LockedSession.complete`)."""
        pgconn = self._pgconn
        if pgconn is None or not self._alive():
            raise self._lost(what)
        await self._prepare([step for step, _ in steps if isinstance(step, Statement)])
        results: list[pq.abc.PGresult | None] = []
        self._broken = True  # until the pipeline is read to its end
        try:
            pgconn.enter_pipeline_mode()
            for step, params in steps:
                if isinstance(step, Statement):
                    pgconn.send_query_prepared(step.name, list(params))
                else:
                    pgconn.send_query_params(step, list(params) or None)
            pgconn.pipeline_sync()
            await self._flush(pgconn)
            while True:
                result = await self._result(pgconn)
                if result is None:
                    if pgconn.status != pq.ConnStatus.OK:
                        raise self._lost(what)
                    continue
                if result.status == _SYNC:
                    break
                results.append(None if result.status == pq.ExecStatus.PIPELINE_ABORTED else result)
            pgconn.exit_pipeline_mode()
        except psycopg.Error as error:
            raise self._lost(what) from error
        self._broken = False
        if len(results) != len(steps):
            raise self._lost(what)
        return results

    async def _simple(self, sql: bytes, what: str) -> None:
        """Several statements without parameters (the simple query protocol)."""
        self._on_wire = True
        try:
            await self._simple_query(sql, what)
        finally:
            self._on_wire = False

    async def _simple_query(self, sql: bytes, what: str) -> None:
        pgconn = self._pgconn
        if pgconn is None or not self._alive():
            raise self._lost(what)
        self._broken = True
        failed: pq.abc.PGresult | None = None
        try:
            pgconn.send_query(sql)
            await self._flush(pgconn)
            while (result := await self._result(pgconn)) is not None:
                if result.status == _FATAL:
                    failed = result
        except psycopg.Error as error:
            raise self._lost(what) from error
        self._broken = False
        if pgconn.status != pq.ConnStatus.OK:
            raise self._lost(what)
        if failed is not None:
            raise psycopg.errors.error_from_result(failed, encoding="utf-8")

    # -- locking -------------------------------------------------------------------------

    def _job(self, row: int, result: pq.abc.PGresult) -> LockedJob:
        value = result.get_value
        run_at = value(row, 2)
        last_error = value(row, 7)
        return LockedJob(
            queue=(value(row, 0) or b"").decode(),
            priority=int(value(row, 1) or 0),
            run_at=None if run_at is None else self._load_run_at(run_at),
            job_id=int(value(row, 3) or 0),
            job_class=(value(row, 4) or b"").decode(),
            args=(value(row, 5) or b"[]").decode(),
            error_count=int(value(row, 6) or 0),
            last_error=None if last_error is None else last_error.decode(),
            run_at_key=(value(row, 8) or b"").decode(),
        )

    async def lock(self, queue: str, limit: int) -> list[LockedJob]:
        """Lock up to ``limit`` ready jobs of ``queue``, confirm each and write its crash
        mark; return those confirmed (the vanished ones are unlocked). A lock query that fails
        part-way may have taken locks it could not report: the caller discards the session."""
        for _ in range(LOCK_ATTEMPTS):
            (locked,) = await self._run(
                [(_sql.LOCK_JOBS, [queue.encode(), str(limit).encode()])], "locking jobs"
            )
            result = self._check(locked, "locking jobs")
            jobs = [self._job(row, result) for row in range(result.ntuples)]
            if not jobs:
                return []
            for job in jobs:
                self._held[job.job_id] = job
            (rechecked,) = await self._run(
                [(_sql.RECHECK_AND_MARK_JOBS, _keys_params(queue, jobs))], "locking jobs"
            )
            found = self._check(rechecked, "locking jobs")
            present = {int(found.get_value(row, 0) or 0) for row in range(found.ntuples)}
            self.crashed = {
                int(found.get_value(row, 0) or 0): (
                    f"started at {(found.get_value(row, 1) or b'').decode()} by backend "
                    f"pid {(found.get_value(row, 2) or b'').decode()}"
                )
                for row in range(found.ntuples)
                if found.get_value(row, 1) is not None
            }
            vanished = [job for job in jobs if job.job_id not in present]
            if vanished:
                await self.release(vanished)
            confirmed = [job for job in jobs if job.job_id in present]
            if confirmed:
                return confirmed
        return []

    async def release(self, jobs: Sequence[LockedJob]) -> None:
        """Unlock jobs locked but not started, their crash marks deleted (committed) first."""
        if not jobs:
            return
        unmark = [_array(j.job_id for j in jobs if self.crashed.pop(j.job_id, None) is None)]
        _, unmarked, committed, unlocked = await self._run(
            [
                (self._begin, ()),
                (_sql.UNMARK_JOBS, unmark),
                (_sql.COMMIT, ()),
                (_sql.UNLOCK_JOBS, [_array(job.job_id for job in jobs)]),
            ],
            "releasing jobs",
        )
        self._check(unmarked, "releasing jobs")
        self._check(committed, "releasing jobs")
        result = self._check(unlocked, "releasing jobs")
        for job in jobs:
            self._held.pop(job.job_id, None)
        if any(result.get_value(row, 0) != b"t" for row in range(result.ntuples)):
            raise LockError("a job lock this session recorded was not held by it")

    # -- the job's transaction -----------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        return self._open

    def begin_job(self, *, statement_timeout_ms: int | None = None) -> None:
        """Make ready the job's transaction, which the server opens on the handler's first
        statement: ``BEGIN`` (with the connection's isolation settings), no idle timeout (an
        idle session ended by the server would end the job's lock with it) and, for a job
        with a timeout, its ``statement_timeout``. Nothing is sent for a handler that does
        not use the database."""
        if self.connection is None:
            raise self._lost("opening the job's transaction")
        sql = self._begin + b"; " + _sql.NO_IDLE_TIMEOUT
        if statement_timeout_ms is not None:
            sql += b"; SET LOCAL statement_timeout = " + str(statement_timeout_ms).encode()
        self._job_begin = sql
        # Only this task, and the tasks it starts from now on, may use the job's connection,
        # and only until the job's outcome is sent (see _check_run).
        self._job_run = object()
        _RUN.set(self._job_run)

    def job_connection(self) -> AsyncConnection:
        """The ``AsyncConnection`` inside the job's transaction, for its handler.

        The first call begins SQLAlchemy's view of that transaction, so that a Session on the
        connection joins it in a savepoint instead of owning one (SQLAlchemy sends nothing
        for it: the server's ``BEGIN`` comes with the handler's first statement).
        """
        connection = self.connection
        sync = connection.sync_connection if connection is not None else None
        if connection is None or sync is None or self._job_begin is None:
            raise self._lost("opening the job's transaction")
        if self._view is None:
            self._view = sync.begin()
        return connection

    def job_sync_connection(self) -> Connection:
        """:meth:`job_connection`'s sync ``Connection``, for a plain ``def`` handler (which
        runs in SQLAlchemy's greenlet)."""
        sync = self.job_connection().sync_connection
        assert sync is not None
        return sync

    def _before_statement(self, connection: Connection, *args: object) -> None:
        """Before each of the handler's statements (in SQLAlchemy's greenlet): refuse a
        replaced connection, and open the job's transaction on the server at the first."""
        if connection.connection.driver_connection is not self._raw:
            raise LostSessionError(
                "the job's session was lost; a statement on a new session would run without "
                "the job's lock"
            )
        if not self._ending:
            self._check_run()
        if not self._open and self._job_begin is not None:
            self._touched = True
            await_only(self._simple(self._job_begin, "opening the job's transaction"))
            self._open = True

    def _before_begin(self, connection: Connection) -> None:
        """Before SQLAlchemy begins a transaction on the connection (the job's view, or an
        ``AsyncSession``'s): refuse one for a job that has ended, which would otherwise stay
        on the connection into the next job's run."""
        if not self._ending:
            self._check_run()

    def _check_run(self) -> None:
        """Refuse the connection to a task that is not working its current job: a task that
        a handler started and left running once its job ended (its statement would run in
        the next job's transaction, or in none, without any job's lock)."""
        if self._job_run is None or _RUN.get() is not self._job_run:
            raise QueError(
                "job.session or job.connection was used after its job ended (by a task its "
                "handler started and did not await?); the worker's connection has moved on: "
                "await that work in the handler, or give the task a connection of its own"
            )

    async def _end_view(self) -> None:
        """Close SQLAlchemy's view of a transaction the server has already ended: ours, and
        one the handler's statements began after a refused rollback()."""
        self._view = None
        self._job_begin = None
        self._job_run = None
        connection = self.connection
        sync = connection.sync_connection if connection is not None else None
        if sync is None or sync.get_transaction() is None:
            return
        self._ending = True
        try:
            with contextlib.suppress(Exception):
                await greenlet_spawn(_close_transactions, sync)
        finally:
            self._ending = False

    def _refuse_commit(self, connection: Connection) -> None:
        if not self._ending:
            raise QueError(
                "commit() on job.connection would commit the job's transaction before the "
                "job is done; the worker commits it with the job's completion (use "
                "job.session, whose commit() keeps your changes for that commit)"
            )

    def _refuse_rollback(self, connection: Connection) -> None:
        if not self._ending:
            raise QueError(
                "rollback() on job.connection would end the job's transaction; raise an "
                "exception to fail the job, or use job.session, whose rollback() undoes "
                "only your own changes"
            )

    # -- outcomes ------------------------------------------------------------------------

    def _ending_steps(self, job: LockedJob) -> tuple[list[Step], Step]:
        """As :meth:`LockedSession._ending_steps`: after a handler used the connection,
        every advisory lock of the session goes (it may have taken some of its own), and the
        crash marks of the batch's other jobs before the commit."""
        if not self._touched:
            return [], (_sql.UNLOCK_JOB.sql, [str(job.job_id).encode()])
        others = [
            held.job_id
            for held in self._held.values()
            if held.job_id != job.job_id and held.job_id not in self.crashed
        ]
        before: list[Step] = [(_sql.UNMARK_JOBS.sql, [_array(others)])] if others else []
        return before, (_sql.UNLOCK_ALL.sql, [])

    def _unlocked(self, result: pq.abc.PGresult | None, job: LockedJob) -> None:
        if self._touched:
            self._held.clear()  # every lock of the session went (see _ending_steps)
            self._touched = False
            return
        self._held.pop(job.job_id, None)
        if result is None or any(result.get_value(row, 0) != b"t" for row in range(result.ntuples)):
            raise LostSessionError(
                "an unlock after a commit was not confirmed; the session is discarded so "
                "that the server releases its locks"
            )

    async def complete(self, job: LockedJob) -> bool:
        """Delete the job, commit (with the handler's writes) and unlock it, in one round
        trip; raises as :meth:`LockedSession.complete`."""
        self._job_run = None  # from here on, the connection carries the job's outcome
        if not self._open:
            await self._end_view()
            results = await self._finish(
                [
                    (self._begin, ()),
                    (_sql.COMPLETE_JOB, job._key_params()),
                    (_sql.COMMIT, ()),
                    (_sql.UNLOCK_JOB, [str(job.job_id).encode()]),
                ],
                "completing a job",
            )
            self._unlocked(results[3], job)
            deleted = results[1]
        else:
            if self._pgconn is not None and self._pgconn.transaction_status == _INERROR:
                await self._rollback()
                raise StatementFailedError(
                    "completing a job failed: the handler left the job's transaction aborted "
                    "by an error it caught; its work is rolled back"
                )
            before, after = self._ending_steps(job)
            results = await self._finish(
                [(_sql.COMPLETE_JOB.sql, job._key_params()), *before, (_sql.COMMIT, ()), after],
                "completing a job",
            )
            self._unlocked(results[-1], job)
            deleted = results[0]
        assert deleted is not None
        return (deleted.command_tuples or 0) > 0

    async def record_error(self, job: LockedJob, *, delay: float, last_error: str) -> bool:
        """Roll back the job's transaction, then record the failure and unlock, in one round
        trip; True when the row was there."""
        await self._rollback()
        params = [*job._key_params(), repr(float(delay)).encode(), last_error.encode()]
        return await self._write_outcome(job, _sql.RECORD_RETRY, params, "recording an error")

    async def fail(self, job: LockedJob, *, last_error: str, reason: str) -> bool:
        """Roll back the job's transaction, then move the job to ``que_failed_jobs`` and
        unlock it, in one round trip; True when the row was there."""
        await self._rollback()
        params = [*job._key_params(), last_error.encode(), reason.encode()]
        return await self._write_outcome(job, _sql.MOVE_TO_FAILED, params, "failing a job")

    async def _write_outcome(
        self, job: LockedJob, statement: Statement, params: list[bytes | None], what: str
    ) -> bool:
        before, after = self._ending_steps(job)
        results = await self._finish(
            [(self._begin, ()), (statement.sql, params), *before, (_sql.COMMIT, ()), after], what
        )
        self._unlocked(results[-1], job)
        written = results[1]
        assert written is not None
        return (written.command_tuples or 0) > 0

    async def abandon(self, job: LockedJob) -> None:
        """Roll back the job's transaction and unlock the job, its row untouched (its crash
        mark deleted: it ended)."""
        touched = self._touched
        await self._rollback()
        await self.release([job])
        if touched:
            await self._run([(_sql.UNLOCK_ALL.sql, [])], "releasing a job")
            self._held.clear()
            self._touched = False

    async def _rollback(self) -> None:
        self._job_run = None  # the job's outcome follows
        try:
            if self._pgconn is not None and self._pgconn.transaction_status != _IDLE:
                await self._simple(_sql.ROLLBACK, "rolling back")
        finally:
            self._open = False
            await self._end_view()

    async def _finish(self, steps: Sequence[Step], what: str) -> list[pq.abc.PGresult | None]:
        """Run a pipeline that ends a transaction; on a refused statement, roll back and
        raise :class:`StatementFailedError` (the locks are still held)."""
        try:
            results = await self._run(steps, what)
        finally:
            self._open = False
        failed = next((r for r in results if r is not None and r.status == _FATAL), None)
        committed = any(r is not None and r.command_status == b"COMMIT" for r in results)
        if failed is not None and not committed:
            error = psycopg.errors.error_from_result(failed, encoding="utf-8")
            if error.sqlstate == "26000":
                self._forget_prepared()
            await self._rollback()
            raise StatementFailedError(f"{what} failed: {error}") from error
        await self._end_view()
        if not committed:
            raise StatementFailedError(
                f"{what} failed: the job's transaction was aborted by an earlier error in "
                "the handler"
            )
        if failed is not None:
            raise StatementFailedError(
                f"{what}: committed, but a statement after the commit failed: "
                f"{psycopg.errors.error_from_result(failed, encoding='utf-8')}"
            )
        return results


def _close_transactions(connection: Connection) -> None:
    """Roll back (the driver is idle: nothing is sent) SQLAlchemy's transactions of
    ``connection``, in SQLAlchemy's greenlet."""
    for _ in range(2):
        transaction = connection.get_transaction()
        if transaction is None:
            return
        if transaction.is_active:
            transaction.rollback()
        else:
            transaction.close()
