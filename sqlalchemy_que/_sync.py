"""The synchronous mode: jobs enqueued in a Session run in-process right after its commit.

For development and tests. The jobs still go through ``que_jobs`` (so what is committed, and
when, is as in production); only the worker is replaced by a call after ``commit()``. A job
is run only when the Session's transaction commits, never when it rolls back, each job in a
transaction of its own on the Session's engine, locked as a worker locks it. A Session
joined to an outer transaction it does not own (the usual test recipe) "commits" into that
transaction only, so there each job runs in a savepoint of the outer transaction instead,
and is rolled back with it. Re-exported by :mod:`sqlalchemy_que.testing`.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy import Connection, event, inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, SessionTransaction, UOWTransaction, scoped_session, sessionmaker

from ._drain import FailedJob, fetch_job, run_locked_job, try_lock, unlock
from ._enqueue import ENQUEUED_KEY
from ._errors import QueError
from ._model import QueJob
from ._worker import Handlers, registry_of

__all__ = ["SynchronousMode", "run_synchronously"]

logger = logging.getLogger("sqlalchemy_que.testing")

#: What to do with a job's error in the synchronous mode.
OnError = Literal["raise", "log"]

#: Where a Session's transaction notes the connection it runs on.
_CONNECTION_KEY = "sqlalchemy_que.connection"

#: What the synchronous mode listens on: a Session, a sessionmaker, a scoped_session, or a
#: Session class (then every Session of that class).
Target = Session | sessionmaker[Any] | scoped_session[Any] | type[Session]

_EVENTS = ("after_begin", "after_flush", "after_commit", "after_soft_rollback")


class SynchronousMode:
    """The synchronous mode on one target, made by :func:`run_synchronously`; :meth:`stop`
    (or leaving its ``with`` block) turns it off."""

    def __init__(
        self,
        target: Target,
        handlers: Handlers,
        *,
        errors: OnError = "raise",
        wrap: Callable[[Callable[..., object]], Callable[..., object]] | None = None,
        accept: Callable[[Session], bool] | None = None,
    ) -> None:
        if errors not in ("raise", "log"):
            raise QueError(f"errors must be 'raise' or 'log', got {errors!r}")
        if not isinstance(target, Session | sessionmaker | scoped_session) and not (
            isinstance(target, type) and issubclass(target, Session)
        ):
            raise QueError(
                f"the synchronous mode needs a Session, sessionmaker, scoped_session or "
                f"Session class, got {target!r}"
            )
        self.target = target
        self.registry = registry_of(handlers)
        self.errors = errors
        self._wrap = wrap
        self._accept = accept
        # Jobs committed while this thread is running others: run next, by the outer loop.
        self._local = threading.local()
        self._listening = False
        for name in _EVENTS:
            event.listen(target, name, getattr(self, f"_{name}"))
        self._listening = True

    def stop(self) -> None:
        """Stop running jobs after commits (jobs enqueued later wait for a worker)."""
        if self._listening:
            for name in _EVENTS:
                event.remove(self.target, name, getattr(self, f"_{name}"))
            self._listening = False

    def __enter__(self) -> SynchronousMode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- events ----------------------------------------------------------------------------

    def _accepts(self, session: Session) -> bool:
        return self._accept is None or self._accept(session)

    def _after_begin(
        self, session: Session, transaction: SessionTransaction, connection: Connection
    ) -> None:
        if self._accepts(session):
            session.info.setdefault(ENQUEUED_KEY, [])
            if _CONNECTION_KEY not in session.info and _is_queue_connection(session, connection):
                session.info[_CONNECTION_KEY] = connection

    def _after_flush(self, session: Session, flush_context: UOWTransaction) -> None:
        if self._accepts(session):
            ids = session.info.setdefault(ENQUEUED_KEY, [])
            ids.extend(job.job_id for job in session.new if isinstance(job, QueJob))

    def _after_soft_rollback(self, session: Session, previous: SessionTransaction) -> None:
        if not previous.nested and previous.parent is None:
            # The whole transaction rolled back: its jobs are gone, none runs.
            session.info.pop(ENQUEUED_KEY, None)
            session.info.pop(_CONNECTION_KEY, None)

    def _after_commit(self, session: Session) -> None:
        if session.in_nested_transaction() or not self._accepts(session):
            return  # a savepoint's release: the transaction has not committed yet
        ids: list[int] = session.info.pop(ENQUEUED_KEY, [])
        connection: Connection | None = session.info.pop(_CONNECTION_KEY, None)
        if not ids or connection is None:
            return
        pending: collections.deque[tuple[Connection, int]] | None = getattr(
            self._local, "pending", None
        )
        work = [(connection, job_id) for job_id in ids]
        if pending is not None:
            pending.extend(work)  # a handler's Session committed: run after its job
            return
        self._run_all(collections.deque(work))

    # -- running ---------------------------------------------------------------------------

    def _run_all(self, pending: collections.deque[tuple[Connection, int]]) -> None:
        self._local.pending = pending
        failures: list[FailedJob] = []
        try:
            while pending:
                connection, job_id = pending.popleft()
                failure = self._run_one(connection, job_id)
                if failure is not None:
                    failures.append(failure)
        finally:
            del self._local.pending
        if failures and self.errors == "raise":
            raise failures[0].error

    def _run_one(self, connection: Connection, job_id: int) -> FailedJob | None:
        if not connection.closed and connection.in_transaction():
            # The Session committed into a transaction it does not own: the job runs in a
            # savepoint of it, as drain() does.
            return self._locked(connection, job_id)
        with connection.engine.connect() as own:
            # As a worker: lock, run and commit, and only then unlock (so that no worker
            # can take the job between its DELETE and the commit).
            locked = try_lock(own, job_id)
            own.commit()
            if not locked:
                return None  # a worker has it
            try:
                with own.begin():
                    return self._run_locked(own, job_id)
            finally:
                unlock(own, job_id)
                own.commit()

    def _locked(self, connection: Connection, job_id: int) -> FailedJob | None:
        if not try_lock(connection, job_id):
            return None  # a worker has it
        try:
            return self._run_locked(connection, job_id)
        finally:
            unlock(connection, job_id)

    def _run_locked(self, connection: Connection, job_id: int) -> FailedJob | None:
        job = fetch_job(connection, job_id)
        if job is None:
            return None  # rolled back with a savepoint, or worked already
        return run_locked_job(connection, self.registry, job, wrap=self._wrap)

    def __repr__(self) -> str:
        state = "on" if self._listening else "stopped"
        return f"<SynchronousMode {state} errors={self.errors!r} target={self.target!r}>"


def _is_queue_connection(session: Session, connection: Connection) -> bool:
    """Whether ``connection`` is where ``session`` writes ``que_jobs`` (a Session with
    several binds, such as Flask-SQLAlchemy's with ``SQLALCHEMY_BINDS``, begins one
    connection per database)."""
    try:
        bind = session.get_bind(mapper=inspect(QueJob))
    except SQLAlchemyError:
        return False  # no bind for the queue's table: this Session enqueues nothing
    return bind is connection or bind is connection.engine


def run_synchronously(
    target: Target, handlers: Handlers, *, errors: OnError = "raise"
) -> SynchronousMode:
    """Run the jobs enqueued in ``target``'s Sessions right after each commit, in this
    process, through ``handlers`` (for development and tests).

    Jobs added with ``session.add(enqueue(...))`` (or ``definition.enqueue(...)``), and
    those inserted with :func:`~sqlalchemy_que.insert_job` on the Session, are run after the
    Session's transaction commits, in the order they were enqueued, each in a transaction of
    its own (a savepoint, when the Session is joined to an outer transaction it does not
    own); nothing runs when it rolls back. A failed job is rescheduled in the table as a
    worker would, and its error is then raised from ``commit()`` (``errors="raise"``, after
    the other jobs ran) or only logged (``errors="log"``). A job that a worker elsewhere has
    locked is left to it. Jobs that handlers enqueue run after their own job, when the
    handler's Session is one of ``target``'s.

    :param target: a Session, a sessionmaker, a scoped_session (such as Flask-SQLAlchemy's
        ``db.session``), or a Session class.
    :param handlers: a :class:`~sqlalchemy_que.JobRegistry`, a mapping of job_class to
        handler, or an iterable of job definitions.
    :param errors: ``"raise"`` (default) or ``"log"``.
    :returns: the mode; call its ``stop()`` (or use it as a context manager) to turn it off.
    """
    return SynchronousMode(target, handlers, errors=errors)
