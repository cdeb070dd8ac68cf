"""Exceptions raised by sqlalchemy-que.

Every exception the library raises on purpose derives from :class:`QueError`, so one
``except sqlalchemy_que.QueError`` catches them all::

    QueError
    ├── InvalidJobError      (also a ValueError) a job field was refused before anything was sent
    ├── SchemaError          que_jobs is missing, not at the expected version, or Que 1.x/2.x's
    │   └── UnsupportedSchemaError   the table belongs to Que 1.x/2.x (comment '4'..'7')
    ├── UnknownJobClassError  a job's job_class has no handler in this worker (recorded as
    │                         the job's error; the job is kept and retried)
    ├── ConfigurationError   (also a ValueError) a setting was refused: a database URL, an
    │   │                    import path, a Flask config key
    │   └── WorkerError      a worker or pool was misconfigured or could not start
    ├── LockError            a job lock was not where it had to be: already released, held
    │   │                    by no one, or used after its job was completed
    │   └── LostSessionError the session holding a worker's locks was lost; its jobs are
    │                        left for another worker, never written from this one
    ├── FailJob              raised by a handler: fail the job for good, no retry
    ├── RetryJob             raised by a handler: retry at a time of its choosing
    ├── JobTimeoutError      recorded for a job that overran its timeout
    ├── JobCancelledError    recorded for a job failed because it was cancelled
    ├── JobCrashedError      recorded for a job whose earlier run ended with its process
    └── JobLockedError       an operation refused a job a worker holds right now

Every class shows as ``sqlalchemy_que.<Name>``, as users import it.

Errors from the database driver are not wrapped when they concern the caller's own
transaction (an ``INSERT`` refused by the server is the caller's ``sqlalchemy.exc.DBAPIError``);
where the library adds meaning it raises its own error ``from`` the driver's.
"""

from __future__ import annotations

import datetime
import math

__all__ = [
    "ConfigurationError",
    "FailJob",
    "InvalidJobError",
    "JobCancelledError",
    "JobCrashedError",
    "JobLockedError",
    "JobTimeoutError",
    "LockError",
    "LostSessionError",
    "QueError",
    "RetryJob",
    "SchemaError",
    "UnknownJobClassError",
    "UnsupportedSchemaError",
    "WorkerError",
]


class QueError(Exception):
    """The root of every exception sqlalchemy-que raises on purpose."""


class InvalidJobError(QueError, ValueError):
    """A job's field was refused before anything was sent to the database.

    The message names the field and the offending value. Nothing has been written, and the
    caller's session or transaction is left as it was.
    """


class SchemaError(QueError):
    """The database's ``que_jobs`` table is missing or is not the one this library expects.

    The message says what was found and the command that fixes it.
    """


class UnsupportedSchemaError(SchemaError):
    """``que_jobs`` was created by Que 1.x or 2.x (table comment ``'4'`` to ``'7'``).

    That table has another shape; working or migrating it as a Que 0.x table would corrupt it.

    :ivar version: the schema version read from the table comment.
    """

    def __init__(self, message: str, *, version: int) -> None:
        super().__init__(message)
        self.version = version


class ConfigurationError(QueError, ValueError):
    """A setting was refused (a database URL, an import path of handlers, a configuration
    key); the message names the setting and its value, and says what is expected."""


class WorkerError(ConfigurationError):
    """A worker or worker pool is misconfigured or cannot start (for example, an Engine whose
    connection pool is smaller than the number of workers)."""


class UnknownJobClassError(QueError):
    """A job's ``job_class`` has no handler in this worker.

    Raised inside the worker and recorded as the job's error, like any handler failure: the
    job is kept and retried later, perhaps by a worker (in any language) that knows it.
    """


class LockError(QueError):
    """A job lock was not where it had to be: used after its job was completed, or reported
    released by the server although this session had recorded it as held."""


class LostSessionError(LockError):
    """The session that held a worker's job locks is gone (or was replaced) while the worker
    had it.

    Its locks went with it; nothing more is written about its jobs from here, since another
    worker may hold them by now.
    """


class FailJob(QueError):
    """Raise it in a handler to fail the job for good, without the retries it has left: it
    is moved to ``que_failed_jobs`` with this exception as its final error (reason
    ``failed``), and the job's transaction is rolled back::

        raise sqlalchemy_que.FailJob(f"user {user_id} does not exist")
    """


class RetryJob(QueError):
    """Raise it in a handler to retry the job after ``in_`` seconds (a number or a
    ``timedelta``; default 0, as soon as possible) instead of Que's retry delay. It counts
    as an attempt like any failure, with this exception as ``last_error``; at the last
    attempt the job is failed for good. The job's transaction is rolled back.

    :param reason: what ``last_error`` says.
    """

    def __init__(self, reason: str = "", *, in_: float | datetime.timedelta = 0.0) -> None:
        seconds = in_.total_seconds() if isinstance(in_, datetime.timedelta) else in_
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 <= seconds < math.inf
        ):
            raise InvalidJobError(
                f"RetryJob(in_=...) must be seconds >= 0 or a timedelta, got {in_!r}"
            )
        super().__init__(reason)
        self.reason = reason
        self.delay = float(seconds)


class JobTimeoutError(QueError):
    """The error recorded for a job that ran past its ``timeout`` (or whose statement was
    cancelled by the ``statement_timeout`` the timeout sets). Counts as an attempt."""


class JobCancelledError(QueError):
    """The error recorded for a job failed because it was cancelled (reason ``cancelled``)."""


class JobCrashedError(QueError):
    """The error recorded for a job whose earlier run never recorded an outcome: the worker
    process died under it (SIGKILL, an out-of-memory kill, ``os._exit``) or lost its
    connection. Counts as an attempt, with the normal retry delay."""


class JobLockedError(QueError):
    """An operation on a job was refused because a worker holds the job's lock right now;
    nothing was written about it. The message names the job and the locking backend."""


for _error in (
    QueError,
    InvalidJobError,
    SchemaError,
    UnsupportedSchemaError,
    ConfigurationError,
    WorkerError,
    UnknownJobClassError,
    LockError,
    LostSessionError,
    FailJob,
    RetryJob,
    JobTimeoutError,
    JobCancelledError,
    JobCrashedError,
    JobLockedError,
):
    _error.__module__ = "sqlalchemy_que"  # as users see and import them
del _error
