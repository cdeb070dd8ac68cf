"""Locking a job by hand, for scripts and tools that work jobs without a worker.

:func:`locked_job` locks the most urgent ready job of a queue on a connection of its own, and
whatever the code inside the ``with`` block does (returns, raises, breaks the connection), it
leaves no lock behind: the job is completed, released untouched, or its connection discarded
so that the server ends the session and the lock with it::

    from sqlalchemy_que import locked_job

    with locked_job(engine, queue="") as lock:
        if lock is not None:
            print(lock.job.job_id, lock.job.args)
            lock.connection.execute(...)   # inside the job's transaction
            lock.complete()                # DELETE, COMMIT and unlock, in one round trip

Locks are Que's: session-level ``pg_try_advisory_lock(job_id)``, taken by a walk along the
primary key that tries each visited row once, re-checked by full key in a fresh statement
(see :mod:`sqlalchemy_que._sql`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Connection, Engine

from ._errors import LockError
from ._session import LockedJob, LockedSession

__all__ = ["JobLock", "LockedJob", "locked_job"]


class JobLock:
    """A job locked by :func:`locked_job`: the job's row, its transaction and its end."""

    def __init__(self, session: LockedSession, job: LockedJob) -> None:
        self._session = session
        self.job = job
        self.done = False

    @property
    def connection(self) -> Connection:
        """The locked connection, inside the job's transaction (opened on first use). Its
        ``commit()`` and ``rollback()`` are refused: :meth:`complete` commits."""
        return self._session.open_transaction()

    def complete(self) -> bool:
        """Delete the job, commit the job's transaction with it, and unlock it.

        :returns: True when the row was there to delete.
        """
        if self.done:
            raise LockError(f"job {self.job.job_id} was already completed; its lock is released")
        deleted = self._session.complete(self.job)
        self.done = True
        return deleted


@contextlib.contextmanager
def locked_job(engine: Engine, queue: str = "") -> Iterator[JobLock | None]:
    """Lock the most urgent ready job of ``queue`` for the ``with`` block (None when no job
    is ready). On leaving the block, a job not completed is released untouched (its
    transaction rolled back), and the connection goes back to the pool with no lock, or is
    discarded."""
    session = LockedSession(engine)
    session.checkout()
    try:
        jobs = session.lock(queue, 1)
        if not jobs:
            yield None
            return
        lock = JobLock(session, jobs[0])
        try:
            yield lock
        finally:
            if not lock.done:
                session.abandon(lock.job)
    except BaseException:
        session.discard()
        raise
    finally:
        session.checkin()
