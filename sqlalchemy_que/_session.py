"""The one owner of a worker's locked connection.

A :class:`LockedSession` checks a connection out of the Engine and owns it from the first job
lock to the last unlock. It records the connection's settings at checkout (autocommit,
isolation level, read-only, deferrable, prepared-statement threshold) and puts them back at
check-in; in between, it is the only code
that sends statements about its jobs, and it sends them itself, on the driver's connection,
as statements the server has prepared once (see :mod:`sqlalchemy_que._sql`):

* :meth:`lock` takes up to K job locks in one statement and re-checks them in another;
* :meth:`open_transaction` opens a job's transaction when its handler first asks for the
  database, and hands out the SQLAlchemy ``Connection`` inside it;
* :meth:`complete` sends ``DELETE``, ``COMMIT`` and the unlock in one round trip (a pipeline:
  the server stops at the first error, so the unlock never runs before the commit), and
  :meth:`complete_many` does the same for several jobs in one transaction;
* :meth:`record_error` writes a failure and unlocks, in one round trip too;
* :meth:`checkin` leaves no transaction and no advisory lock of any kind on the session, or
  discards the connection so that the server ends the session and its locks.

Before every write about a job it confirms that its driver connection is still the session
that took the lock (same object, same backend pid, not broken). Its statements never go
through a layer that could reconnect: a session lost under a job raises
:class:`LostSessionError`, and nothing more is written about that job from this worker.

The handler's own statements go through SQLAlchemy on the same session and inside the same
transaction. That Connection's ``commit()`` and ``rollback()`` are refused while a job runs:
they would end the job's transaction half-way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import select
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg
from psycopg import pq
from sqlalchemy import Connection, Engine, RootTransaction, event

from . import _sql
from ._errors import ConfigurationError, LockError, LostSessionError, QueError
from ._sql import Statement

__all__ = ["LockedJob", "LockedSession", "LostSessionError", "StatementFailedError"]

logger = logging.getLogger("sqlalchemy_que.worker")

#: How many locked-but-vanished batches one :meth:`LockedSession.lock` call tolerates.
LOCK_ATTEMPTS = 10

_OK = pq.ExecStatus.COMMAND_OK
_TUPLES = pq.ExecStatus.TUPLES_OK
_FATAL = pq.ExecStatus.FATAL_ERROR
_SYNC = pq.ExecStatus.PIPELINE_SYNC
_IDLE = pq.TransactionStatus.IDLE
_INERROR = pq.TransactionStatus.INERROR
_TIMESTAMPTZ_OID = 1184
_PREPARED_KEY = "sqlalchemy_que.prepared"

_ISOLATION = {
    psycopg.IsolationLevel.READ_UNCOMMITTED: b" ISOLATION LEVEL READ UNCOMMITTED",
    psycopg.IsolationLevel.READ_COMMITTED: b" ISOLATION LEVEL READ COMMITTED",
    psycopg.IsolationLevel.REPEATABLE_READ: b" ISOLATION LEVEL REPEATABLE READ",
    psycopg.IsolationLevel.SERIALIZABLE: b" ISOLATION LEVEL SERIALIZABLE",
}


class StatementFailedError(QueError):
    """A statement about a job was refused by the server; the session is usable and the
    job's lock is still held (its transaction, if any, rolled back)."""


@dataclasses.dataclass(frozen=True, slots=True)
class LockedJob:
    """A row of ``que_jobs`` whose advisory lock a worker's session holds.

    ``args`` is the stored JSON text, exactly as written. ``run_at`` is None only for a row
    whose ``run_at`` no Python datetime can hold (``-infinity``, year 0...); ``run_at_key``
    is the server's exact spelling of it, which every statement about the job matches on.
    """

    queue: str
    priority: int
    run_at: datetime.datetime | None
    job_id: int
    job_class: str
    args: str
    error_count: int
    last_error: str | None
    run_at_key: str = ""

    @property
    def key(self) -> dict[str, object]:
        """The full primary key, which every statement about the job matches on."""
        return {
            "queue": self.queue,
            "priority": self.priority,
            "run_at": self.run_at_key,
            "job_id": self.job_id,
        }

    def _key_params(self) -> list[bytes | None]:
        return [
            self.queue.encode(),
            str(self.priority).encode(),
            self.run_at_key.encode(),
            str(self.job_id).encode(),
        ]


@dataclasses.dataclass(frozen=True, slots=True)
class _Saved:
    """A connection's settings at checkout, put back at check-in."""

    autocommit: bool
    isolation_level: psycopg.IsolationLevel | None
    read_only: bool | None
    deferrable: bool | None
    prepare_threshold: int | None


def _array(values: Iterable[object]) -> bytes:
    """A PostgreSQL array literal of ints or of strings that hold no quote or backslash."""
    return ("{" + ",".join(f'"{value}"' for value in values) + "}").encode()


def _keys_params(queue: str, jobs: Sequence[LockedJob]) -> list[bytes | None]:
    return [
        queue.encode(),
        _array(job.priority for job in jobs),
        _array(job.run_at_key for job in jobs),
        _array(job.job_id for job in jobs),
    ]


class LockedSession:
    """Owns one connection of ``engine`` for a worker: every job lock, job transaction and
    unlock of that worker goes through it. Not thread-safe: one worker thread uses it.

    :param engine: where the connection comes from (psycopg 3 driver).
    :param mark: write a crash mark (``que_job_runs``) for each job the re-check confirms,
        in the re-check's own statement, and delete it with the job's outcome; what a
        worker does. :attr:`crashed` then names the jobs whose earlier run left a mark.
    """

    def __init__(self, engine: Engine, *, mark: bool = False) -> None:
        self.engine = engine
        self.mark = mark
        #: Jobs of the last :meth:`lock` whose earlier run ended without an outcome: job_id
        #: to a description of that run (when it started, on which backend).
        self.crashed: dict[int, str] = {}
        self._recheck = _sql.RECHECK_AND_MARK_JOBS if mark else _sql.RECHECK_JOBS
        self._delete_job = _sql.COMPLETE_JOB if mark else _sql.DELETE_JOB
        self._delete_jobs = _sql.COMPLETE_JOBS if mark else _sql.DELETE_JOBS
        self._record_error = _sql.RECORD_RETRY if mark else _sql.RECORD_ERROR
        self.connection: Connection | None = None
        self._raw: psycopg.Connection[Any] | None = None
        self._pgconn: pq.abc.PGconn | None = None
        self._pid = 0
        self._saved: _Saved | None = None
        self._begin = _sql.BEGIN
        self._begin_idle = _sql.BEGIN
        self._touched = False
        #: Called before a job's transaction opens (the worker commits its batched
        #: completions there).
        self.before_transaction: Callable[[], object] | None = None
        self._held: dict[int, LockedJob] = {}
        self._transaction: RootTransaction | None = None
        self._ending = False  # the session itself is ending the job's transaction
        self._load_run_at: Any = None

    # -- checkout and check-in ---------------------------------------------------------

    @property
    def checked_out(self) -> bool:
        return self.connection is not None

    @property
    def held(self) -> list[LockedJob]:
        """The jobs whose locks this session holds right now."""
        return list(self._held.values())

    def checkout(self) -> None:
        """Check a connection out of the Engine and take it over."""
        if self.connection is not None:
            raise LockError("this session already has a connection")
        connection = self.engine.connect()
        try:
            raw = connection.connection.driver_connection
            if not isinstance(raw, psycopg.Connection):
                raise ConfigurationError(
                    f"sqlalchemy-que needs the psycopg (3) driver; this connection uses "
                    f"{type(raw).__module__}.{type(raw).__qualname__} (use a "
                    "postgresql+psycopg:// URL)"
                )
            if raw.info.transaction_status != _IDLE:
                raise LockError("the Engine handed out a connection inside a transaction")
            saved = _Saved(
                autocommit=raw.autocommit,
                isolation_level=raw.isolation_level,
                read_only=raw.read_only,
                deferrable=raw.deferrable,
                prepare_threshold=raw.prepare_threshold,
            )
            raw.autocommit = True
            # psycopg answers a ROLLBACK by deallocating every prepared statement when it has
            # prepared any itself; it prepares none while the worker holds the connection.
            raw.prepare_threshold = None
            self.connection, self._raw, self._pgconn = connection, raw, raw.pgconn
            self._pid = raw.pgconn.backend_pid
            self._saved = saved
            self._touched = False
            self._begin = _sql.BEGIN + _begin_options(saved)
            # The session sits idle in the job's transaction while the handler computes in
            # Python: a server that ended it there would end the job's lock with it, letting
            # a second worker start the job. SET LOCAL ends with the transaction.
            self._begin_idle = self._begin + b"; " + _sql.NO_IDLE_TIMEOUT
            loader = raw.adapters.get_loader(_TIMESTAMPTZ_OID, pq.Format.TEXT)
            assert loader is not None
            self._load_run_at = loader(_TIMESTAMPTZ_OID, raw).load
            event.listen(connection, "commit", self._refuse_commit)
            event.listen(connection, "rollback", self._refuse_rollback)
            event.listen(connection, "before_cursor_execute", self._refuse_other_session)
        except BaseException:
            self.connection = None
            self._discard(connection)
            raise

    def checkin(self) -> None:
        """Give the connection back clean (no transaction, no advisory lock, the settings it
        came with), or discard it when that cannot be confirmed."""
        connection = self.connection
        if connection is None:
            return
        raw, saved = self._raw, self._saved
        # Only a handler that used the connection, or jobs still recorded as held, can have
        # left an advisory lock on the session: otherwise there is nothing to send.
        may_hold_locks = self._touched or bool(self._held)
        self._held.clear()
        try:
            assert raw is not None and saved is not None
            self._end_transaction_view()
            event.remove(connection, "commit", self._refuse_commit)
            event.remove(connection, "rollback", self._refuse_rollback)
            event.remove(connection, "before_cursor_execute", self._refuse_other_session)
            if not self._alive() or raw.info.transaction_status != _IDLE:
                raise LostSessionError("the session is broken or inside a transaction")
            if may_hold_locks:
                self._execute(_sql.UNLOCK_ALL, [], prepared=False)
            raw.prepare_threshold = saved.prepare_threshold
            raw.autocommit = saved.autocommit
            raw.isolation_level = saved.isolation_level
            raw.read_only = saved.read_only
            raw.deferrable = saved.deferrable
        except Exception:
            logger.debug("discarding a worker connection", exc_info=True)
            self._discard(connection)
        else:
            connection.close()
        finally:
            self.connection = None
            self._raw = self._pgconn = None

    def discard(self) -> None:
        """Drop the connection without talking to the server: its session, and every lock
        it holds, end with it."""
        connection, self.connection = self.connection, None
        self._held.clear()
        self._transaction = None
        self._raw = self._pgconn = None
        if connection is not None:
            self._discard(connection)

    @staticmethod
    def _discard(connection: Connection) -> None:
        with contextlib.suppress(Exception):
            connection.invalidate()
        with contextlib.suppress(Exception):
            connection.close()

    # -- the wire ------------------------------------------------------------------------

    def _alive(self) -> bool:
        """True while the driver connection is the session that took this session's locks."""
        pgconn = self._pgconn
        return (
            pgconn is not None
            and pgconn.status == pq.ConnStatus.OK
            and pgconn.backend_pid == self._pid
            and self.connection is not None
            and not self.connection.invalidated
            and self.connection.connection.driver_connection is self._raw
        )

    def _lost(self, what: str) -> LostSessionError:
        return LostSessionError(f"the worker's session was lost while {what}")

    def _prepare(self, statements: Iterable[Statement]) -> None:
        assert self.connection is not None and self._pgconn is not None
        info = self.connection.connection.info
        prepared: set[bytes] = info.setdefault(_PREPARED_KEY, set())
        for statement in statements:
            if statement.name in prepared:
                continue
            result = self._pgconn.prepare(statement.name, statement.sql)
            self._check(result, "preparing a statement")
            prepared.add(statement.name)

    def _forget_prepared(self) -> None:
        if self.connection is not None:
            self.connection.connection.info.pop(_PREPARED_KEY, None)

    def _check(self, result: pq.abc.PGresult | None, what: str) -> pq.abc.PGresult:
        if result is None or self._pgconn is None or self._pgconn.status != pq.ConnStatus.OK:
            raise self._lost(what)
        if result.status == _FATAL:
            raise psycopg.errors.error_from_result(result, encoding="utf-8")
        return result

    def _execute(
        self,
        statement: Statement,
        params: Sequence[bytes | None],
        *,
        prepared: bool = True,
        simple: bool = False,
    ) -> pq.abc.PGresult:
        """Run one statement and return its result; a statement psycopg deallocated under us
        (SQLSTATE 26000) is prepared again and re-sent, which is safe for the statements sent
        this way: none of them has run when that error is raised."""
        pgconn = self._pgconn
        if pgconn is None or not self._alive():
            raise self._lost("sending a statement")
        pgconn.nonblocking = 0
        try:
            if simple:  # several statements, no parameters: the simple query protocol
                return self._check(pgconn.exec_(statement.sql), "working")
            if not prepared:
                return self._check(pgconn.exec_params(statement.sql, list(params)), "working")
            for attempt in (1, 2):
                self._prepare([statement])
                result = pgconn.exec_prepared(statement.name, list(params))  # type: ignore[arg-type]
                if (
                    attempt == 1
                    and result is not None
                    and result.status == _FATAL
                    and result.error_field(pq.DiagnosticField.SQLSTATE) == b"26000"
                ):
                    self._forget_prepared()
                    continue
                return self._check(result, "working")
            raise AssertionError("unreachable")
        finally:
            if pgconn.status == pq.ConnStatus.OK:
                pgconn.nonblocking = 1

    def _pipeline(
        self, steps: Sequence[tuple[Statement | bytes, Sequence[bytes | None]]], what: str
    ) -> list[pq.abc.PGresult | None]:
        """Send the steps in one round trip (libpq's pipeline mode, one sync point at the
        end) and return one result per step: None for a step the server skipped because
        an earlier one failed."""
        pgconn = self._pgconn
        if pgconn is None or not self._alive():
            raise self._lost(what)
        self._prepare(step for step, _ in steps if isinstance(step, Statement))
        pgconn.nonblocking = 0
        results: list[pq.abc.PGresult | None] = []
        try:
            pgconn.enter_pipeline_mode()
            try:
                for step, params in steps:
                    # Lists, not tuples: older psycopg takes nothing else.
                    if isinstance(step, Statement):
                        pgconn.send_query_prepared(step.name, list(params))
                    else:
                        pgconn.send_query_params(step, list(params) or None)
                pgconn.pipeline_sync()
                while True:
                    result = _next_result(pgconn)
                    if result is None:
                        if pgconn.status != pq.ConnStatus.OK:
                            raise self._lost(what)
                        continue  # the end of one step's results
                    if result.status == _SYNC:
                        break
                    if result.status == pq.ExecStatus.PIPELINE_ABORTED:
                        results.append(None)
                    else:
                        results.append(result)
            finally:
                if pgconn.status == pq.ConnStatus.OK:
                    pgconn.exit_pipeline_mode()
        except psycopg.Error as error:
            if pgconn.status != pq.ConnStatus.OK:
                raise self._lost(what) from error
            raise
        finally:
            if pgconn.status == pq.ConnStatus.OK:
                pgconn.nonblocking = 1
        if len(results) != len(steps):
            raise self._lost(what)
        return results

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

    def lock(self, queue: str, limit: int) -> list[LockedJob]:
        """Lock up to ``limit`` ready jobs of ``queue``, most urgent first, confirm each in a
        fresh statement, and return those confirmed; the vanished ones are unlocked.

        A lock query that fails part-way may have taken locks it could not report: the
        caller must then :meth:`discard` the session.
        """
        for _ in range(LOCK_ATTEMPTS):
            result = self._execute(_sql.LOCK_JOBS, [queue.encode(), str(limit).encode()])
            jobs = [self._job(row, result) for row in range(result.ntuples)]
            if not jobs:
                return []
            for job in jobs:
                self._held[job.job_id] = job
            found = self._execute(self._recheck, _keys_params(queue, jobs))
            present = {int(found.get_value(row, 0) or 0) for row in range(found.ntuples)}
            if self.mark:
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
                logger.debug(
                    "%d job(s) vanished between the lock query and the re-check",
                    len(vanished),
                    extra={"queue": queue},
                )
                self.release(vanished)
            confirmed = [job for job in jobs if job.job_id in present]
            if confirmed:
                return confirmed
        return []

    def release(self, jobs: Sequence[LockedJob]) -> None:
        """Unlock jobs that were locked but not started (left exactly as they are)."""
        if not jobs:
            return
        ids = [_array(job.job_id for job in jobs)]
        if self.mark:
            # The marks go first (committed: autocommit), then the locks. A job found with
            # an earlier run's mark keeps it: that crash is still to be counted by whoever
            # takes the job next.
            # The delete commits before the unlock (BEGIN/COMMIT in the pipeline), so that no
            # worker that takes the job next can see the mark and count a crash.
            unmark = [_array(j.job_id for j in jobs if self.crashed.pop(j.job_id, None) is None)]
            _, unmarked, committed, unlocked = self._pipeline(
                [
                    (self._begin, ()),
                    (_sql.UNMARK_JOBS, unmark),
                    (_sql.COMMIT, ()),
                    (_sql.UNLOCK_JOBS, ids),
                ],
                "releasing jobs",
            )
            self._check(unmarked, "releasing jobs")
            self._check(committed, "releasing jobs")
            result = self._check(unlocked, "releasing jobs")
        else:
            result = self._execute(_sql.UNLOCK_JOBS, ids)
        for job in jobs:
            self._held.pop(job.job_id, None)
        if any(result.get_value(row, 0) != b"t" for row in range(result.ntuples)):
            raise LockError("a job lock this session recorded was not held by it")

    # -- the job's transaction -----------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """True while a job's transaction is open (its handler used the database)."""
        return self._transaction is not None

    def open_transaction(self) -> Connection:
        """Open the job's transaction (once) and return the SQLAlchemy Connection inside it.

        ``BEGIN`` takes the isolation level, read-only and deferrable settings the connection
        came with (as ``create_engine(..., isolation_level=...)`` sets them).
        """
        connection = self.connection
        if connection is None:
            raise self._lost("opening the job's transaction")
        if self._transaction is None:
            if self.before_transaction is not None:
                # Jobs done but not yet committed (batched completion) are committed first:
                # this job ends with every advisory lock of the session released.
                self.before_transaction()
            self._end_transaction_view()  # whatever SQLAlchemy began on its own
            self._touched = True
            self._execute(_sql.Statement(b"", self._begin_idle), [], prepared=False, simple=True)
            # The server is inside the transaction now; SQLAlchemy is told, so that a
            # Session on this Connection joins it (in a savepoint) instead of owning one.
            self._transaction = connection.begin()
        return connection

    def _end_transaction_view(self) -> None:
        """Close SQLAlchemy's view of a transaction the server has already ended."""
        transaction, self._transaction = self._transaction, None
        connection = self.connection
        # A refused rollback() still makes SQLAlchemy forget its transaction, and the
        # handler's next statement then begins another: close that one too.
        stray = connection.get_transaction() if connection is not None else None
        self._ending = True
        try:
            for view in (transaction, stray):
                if view is None:
                    continue
                with contextlib.suppress(Exception):
                    if view.is_active:
                        view.rollback()  # the driver is idle: nothing is sent
                    else:
                        view.close()
        finally:
            self._ending = False

    def _refuse_other_session(self, connection: Connection, *args: object) -> None:
        """A handler's statement on a connection SQLAlchemy has replaced (it reconnects after
        a lost session once no transaction is open) would run without the job's lock."""
        if connection.connection.driver_connection is not self._raw:
            raise LostSessionError(
                "the job's session was lost; a statement on a new session would run without "
                "the job's lock"
            )

    def _refuse_commit(self, connection: Connection) -> None:
        if not self._ending:
            raise LockError(
                "commit() on job.connection would commit the job's transaction before the "
                "job is done; the worker commits it with the job's completion (use "
                "job.session, whose commit() keeps your changes for that commit)"
            )

    def _refuse_rollback(self, connection: Connection) -> None:
        if not self._ending:
            raise LockError(
                "rollback() on job.connection would end the job's transaction; raise an "
                "exception to fail the job, or use job.session, whose rollback() undoes "
                "only your own changes"
            )

    # -- completion ----------------------------------------------------------------------

    def complete(self, job: LockedJob) -> bool:
        """Delete the job, commit, and unlock it, in one round trip.

        :returns: True when the row was there to delete (False: the handler deleted it).
        :raises StatementFailedError: the server refused the delete or the commit (a
            deferred constraint, a serialization failure...): the job's transaction is
            rolled back and the job is still locked, for :meth:`record_error`.
        :raises LostSessionError: the session is gone, and the job's lock with it.
        """
        if self._transaction is None:
            results = self._finish(
                [
                    (self._begin, ()),
                    (self._delete_job, job._key_params()),
                    (_sql.COMMIT, ()),
                    (_sql.UNLOCK_JOB, [str(job.job_id).encode()]),
                ],
                "completing a job",
            )
            self._unlocked(results[3], [job])
            deleted = results[1]
        else:
            self._refuse_aborted("completing a job")
            # The handler's statements may have made psycopg deallocate prepared statements
            # (it does on ROLLBACK): inside its transaction only unnamed statements are sent.
            before, after = self._ending_steps(job, touched=True)
            results = self._finish(
                [(self._delete_job.sql, job._key_params()), *before, (_sql.COMMIT, ()), after],
                "completing a job",
            )
            self._after_unlock(results[-1], job, touched=True)
            deleted = results[0]
        assert deleted is not None
        return (deleted.command_tuples or 0) > 0

    def _refuse_aborted(self, what: str) -> None:
        """A handler that caught a database error and returned left the job's transaction
        aborted: nothing can commit it. Roll back and fail the job."""
        if self._pgconn is not None and self._pgconn.transaction_status == _INERROR:
            self._rollback()
            raise StatementFailedError(
                f"{what} failed: the handler left the job's transaction aborted by an error "
                "it caught; its work is rolled back"
            )

    def _ending_steps(
        self, job: LockedJob, *, touched: bool
    ) -> tuple[
        list[tuple[Statement | bytes, Sequence[bytes | None]]], tuple[bytes, list[bytes | None]]
    ]:
        """The steps that end a job's pipeline around its ``COMMIT``: after it, the job's
        unlock, or, when its handler used the connection, every advisory lock of the session
        (see :meth:`_unlocked_all`); then, before the commit, the crash marks of the batch's
        other jobs go too, in the same transaction (a mark of an earlier crash stays, for
        whoever takes that job next)."""
        if not touched:
            return [], (_sql.UNLOCK_JOB.sql, [str(job.job_id).encode()])
        others = [
            held.job_id
            for held in self._held.values()
            if held.job_id != job.job_id and held.job_id not in self.crashed
        ]
        before: list[tuple[Statement | bytes, Sequence[bytes | None]]] = []
        if self.mark and others:
            before.append((_sql.UNMARK_JOBS.sql, [_array(others)]))
        return before, (_sql.UNLOCK_ALL.sql, [])

    def _after_unlock(self, result: pq.abc.PGresult | None, job: LockedJob, touched: bool) -> None:
        if touched:
            self._unlocked_all()
        else:
            self._unlocked(result, [job])

    def _unlocked_all(self) -> None:
        """After ``pg_advisory_unlock_all()``: a handler that used the connection may have
        taken advisory locks of its own (even on the id of another job of this batch, which
        no count of ``pg_locks`` rows can tell apart), so every lock of the session went, and
        the batch's jobs not yet started are left for anyone to take."""
        self._held.clear()

    def complete_many(self, queue: str, jobs: Sequence[LockedJob]) -> int:
        """Delete several jobs of ``queue`` in one transaction, commit, and unlock them, in
        one round trip; return how many rows were deleted. Raises as :meth:`complete`."""
        if self._transaction is not None:
            raise LockError("complete_many() runs outside any job's transaction")
        results = self._finish(
            [
                (self._begin, ()),
                (self._delete_jobs, _keys_params(queue, jobs)),
                (_sql.COMMIT, ()),
                (_sql.UNLOCK_JOBS, [_array(job.job_id for job in jobs)]),
            ],
            "completing jobs",
        )
        self._unlocked(results[3], jobs)
        deleted = results[1]
        assert deleted is not None
        return deleted.command_tuples or 0

    def record_error(self, job: LockedJob, *, delay: float, last_error: str) -> bool:
        """Roll back the job's transaction (if open), then in one round trip record the
        failure as Que does and unlock the job.

        :returns: True when the row was there to update.
        :raises StatementFailedError: the server refused the update (the job stays locked).
        """
        touched = self._transaction is not None
        self._rollback()
        params = [*job._key_params(), repr(float(delay)).encode(), last_error.encode()]
        before, after = self._ending_steps(job, touched=touched)
        results = self._finish(
            [
                (self._begin, ()),
                (self._record_error.sql, params),
                *before,
                (_sql.COMMIT, ()),
                after,
            ],
            "recording a job's error",
        )
        self._after_unlock(results[-1], job, touched)
        updated = results[1]
        assert updated is not None
        return (updated.command_tuples or 0) > 0

    def fail(self, job: LockedJob, *, last_error: str, reason: str) -> bool:
        """Roll back the job's transaction (if open), then in one round trip move the job
        from ``que_jobs`` to ``que_failed_jobs`` (one more error, ``last_error``, ``reason``),
        delete its crash mark, commit, and unlock it.

        :returns: True when the row was there to move.
        :raises StatementFailedError: the server refused the move (the job stays locked).
        """
        touched = self._transaction is not None
        self._rollback()
        params = [*job._key_params(), last_error.encode(), reason.encode()]
        before, after = self._ending_steps(job, touched=touched)
        results = self._finish(
            [
                (self._begin, ()),
                (_sql.MOVE_TO_FAILED.sql, params),
                *before,
                (_sql.COMMIT, ()),
                after,
            ],
            "failing a job",
        )
        self._after_unlock(results[-1], job, touched)
        moved = results[1]
        assert moved is not None
        return (moved.command_tuples or 0) > 0

    def abandon(self, job: LockedJob) -> None:
        """Roll back the job's transaction and unlock the job, its row untouched."""
        touched = self._transaction is not None
        self._rollback()
        self.release([job])  # its crash mark goes too: it ended, untouched
        if touched:
            self._execute(_sql.UNLOCK_ALL, [], prepared=False)
            self._unlocked_all()

    def holds(self, job: LockedJob) -> bool:
        """True while this session holds the job's lock."""
        return job.job_id in self._held

    def _rollback(self) -> None:
        try:
            if self._pgconn is not None and self._pgconn.transaction_status != _IDLE:
                self._execute(_sql.Statement(b"", _sql.ROLLBACK), [], prepared=False)
        finally:
            self._end_transaction_view()

    def _finish(
        self, steps: Sequence[tuple[Statement | bytes, Sequence[bytes | None]]], what: str
    ) -> list[pq.abc.PGresult | None]:
        """Run a pipeline that ends a transaction; on a refused statement, roll back and
        raise :class:`StatementFailedError` (the locks are still held)."""
        try:
            results = self._pipeline(steps, what)
        except LostSessionError:
            self._transaction = None
            raise
        failed = next(
            (result for result in results if result is not None and result.status == _FATAL),
            None,
        )
        committed = any(
            result is not None and result.command_status == b"COMMIT" for result in results
        )
        if failed is not None and not committed:
            error = psycopg.errors.error_from_result(failed, encoding="utf-8")
            if error.sqlstate == "26000":
                self._forget_prepared()  # prepared again at the next use
            self._rollback()
            raise StatementFailedError(f"{what} failed: {error}") from error
        if not committed:
            # COMMIT answered ROLLBACK: the handler left the transaction aborted.
            self._end_transaction_view()
            raise StatementFailedError(
                f"{what} failed: the job's transaction was aborted by an earlier error in "
                "the handler"
            )
        self._end_transaction_view()
        if failed is not None:
            # After the commit (the unlock or the lock count): the job is done; settle the
            # locks the slow way.
            raise StatementFailedError(
                f"{what}: committed, but a statement after the commit failed: "
                f"{psycopg.errors.error_from_result(failed, encoding='utf-8')}"
            )
        return results

    def _unlocked(self, result: pq.abc.PGresult | None, jobs: Sequence[LockedJob]) -> None:
        for job in jobs:
            self._held.pop(job.job_id, None)
        if result is None or any(result.get_value(row, 0) != b"t" for row in range(result.ntuples)):
            raise LostSessionError(
                "an unlock after a commit was not confirmed; the session is discarded so "
                "that the server releases its locks"
            )


def _next_result(pgconn: pq.abc.PGconn) -> pq.abc.PGresult | None:
    """The next result of a pipeline, waiting for it without holding the GIL (libpq's
    ``PQgetResult`` would wait holding it, stalling every other worker thread while the
    server flushes a commit)."""
    while pgconn.is_busy():
        select.select([pgconn.socket], [], [])
        pgconn.consume_input()
    return pgconn.get_result()


def _begin_options(saved: _Saved) -> bytes:
    options = _ISOLATION.get(saved.isolation_level, b"") if saved.isolation_level else b""
    if saved.read_only is not None:
        options += b" READ ONLY" if saved.read_only else b" READ WRITE"
    if saved.deferrable is not None:
        options += b" DEFERRABLE" if saved.deferrable else b" NOT DEFERRABLE"
    return options
