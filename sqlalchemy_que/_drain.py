"""Running jobs in the caller's own transaction, for tests: :func:`drain` and its report,
:func:`enqueued` and :func:`assert_enqueued`, and :func:`job_context` for calling a handler
without the queue. Re-exported by :mod:`sqlalchemy_que.testing`.

A test that runs inside an outer transaction (rolled back at its end) enqueues jobs that no
other connection can see, so no worker can run them. :func:`drain` runs them on the test's
own connection instead: each job in a savepoint, in which its handler's writes and its
``DELETE`` are released together, or rolled back together when it fails (and then its error
is recorded as a worker records it). The outer transaction is never committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, scoped_session
from sqlalchemy.types import BigInteger, DateTime, Float, Text

from ._errors import QueError, UnknownJobClassError
from ._jobs import JobContext, JobDefinition, JobRegistry, refuse_async_handlers
from ._worker import Handlers, format_last_error, registry_of, retry_delay

__all__ = [
    "DrainReport",
    "EnqueuedAssertionError",
    "EnqueuedJob",
    "FailedJob",
    "assert_enqueued",
    "call_handler",
    "drain",
    "enqueued",
    "job_context",
]

logger = logging.getLogger("sqlalchemy_que.testing")

#: What the helpers accept as the test's database handle.
DatabaseBind = Connection | Session | scoped_session[Any]

#: The most jobs :func:`drain` runs by default (a job that enqueues itself stops there).
DEFAULT_MAX_JOBS = 1000

_JOB_COLUMNS = (
    "job_id, job_class, queue, priority, run_at, args::text AS args, error_count, last_error"
)

# The next ready job of the drain: the queues (NULL for all), the drain's "now", and the ids
# this drain has already tried (each job runs at most once per drain).
_NEXT_JOB = text(
    f"SELECT {_JOB_COLUMNS} FROM que_jobs "
    "WHERE (CAST(:queues AS text[]) IS NULL OR queue = ANY(CAST(:queues AS text[]))) "
    "AND run_at <= COALESCE(CAST(:now AS timestamptz), now() + make_interval(secs => :ahead)) "
    "AND NOT job_id = ANY(CAST(:seen AS bigint[])) "
    "ORDER BY priority, run_at, job_id LIMIT 1"
).bindparams(
    bindparam("queues", type_=ARRAY(Text)),
    bindparam("now", type_=DateTime(timezone=True)),
    bindparam("ahead", type_=Float),
    bindparam("seen", type_=ARRAY(BigInteger)),
)

_ONE_JOB = text(f"SELECT {_JOB_COLUMNS} FROM que_jobs WHERE job_id = :job_id")

_TRY_LOCK = text("SELECT pg_try_advisory_lock(:job_id)")
_UNLOCK = text("SELECT pg_advisory_unlock(:job_id)")

_DELETE = text(
    "DELETE FROM que_jobs "
    "WHERE queue = :queue AND priority = :priority AND run_at = :run_at AND job_id = :job_id"
)

_RECORD_ERROR = text(
    "UPDATE que_jobs SET error_count = error_count + 1, "
    "run_at = COALESCE(CAST(:now AS timestamptz), now() + make_interval(secs => :ahead)) "
    "+ make_interval(secs => :delay), last_error = :last_error "
    "WHERE queue = :queue AND priority = :priority AND run_at = :run_at AND job_id = :job_id"
).bindparams(bindparam("now", type_=DateTime(timezone=True)))


@dataclasses.dataclass(frozen=True, slots=True)
class EnqueuedJob:
    """One row of ``que_jobs``, with its ``args`` decoded from JSON."""

    job_id: int
    job_class: str
    queue: str
    priority: int
    run_at: datetime.datetime
    args: list[Any]
    error_count: int
    last_error: str | None

    def describe(self) -> str:
        """One line for failure messages: ``#7 SendEmail args=[42] queue='mail' ...``."""
        text = (
            f"#{self.job_id} {self.job_class} args={self.args!r} queue={self.queue!r} "
            f"priority={self.priority} run_at={self.run_at.isoformat()}"
        )
        if self.error_count:
            text += f" error_count={self.error_count}"
        return text


@dataclasses.dataclass(frozen=True, slots=True)
class FailedJob:
    """A job whose handler raised during :func:`drain`: the job as it was before the run, the
    exception, and the ``last_error`` recorded for it."""

    job: EnqueuedJob
    error: Exception
    last_error: str


@dataclasses.dataclass(slots=True)
class DrainReport:
    """What :func:`drain` did: the jobs completed and failed, in the order they ran."""

    completed: list[EnqueuedJob] = dataclasses.field(default_factory=list)
    failed: list[FailedJob] = dataclasses.field(default_factory=list)
    #: True when the drain stopped at ``max_jobs`` with a job still ready.
    limit_reached: bool = False

    @property
    def worked(self) -> int:
        """How many jobs ran (completed or failed)."""
        return len(self.completed) + len(self.failed)

    def raise_first(self) -> None:
        """Raise the first failed job's exception, if a job failed."""
        if self.failed:
            raise self.failed[0].error

    def __str__(self) -> str:
        lines = [f"{len(self.completed)} completed, {len(self.failed)} failed"]
        lines += [f"  done   {job.describe()}" for job in self.completed]
        lines += [
            f"  failed {failure.job.describe()}: {failure.last_error.splitlines()[0]}"
            for failure in self.failed
        ]
        return "\n".join(lines)


def _connection(bind: DatabaseBind) -> Connection:
    """The Connection under ``bind``; a Session is flushed first, so that what it holds
    pending (jobs added with ``session.add``) is in the table."""
    if isinstance(bind, Session | scoped_session):
        bind.flush()
        return bind.connection()
    if isinstance(bind, Connection):
        return bind
    raise QueError(f"expected a Connection or a Session, got {bind!r}")


def _row(row: Any) -> EnqueuedJob:
    args = json.loads(row.args)
    return EnqueuedJob(
        job_id=row.job_id,
        job_class=row.job_class,
        queue=row.queue,
        priority=row.priority,
        run_at=row.run_at,
        args=args if isinstance(args, list) else [args],  # que-go stores a lone value as is
        error_count=row.error_count,
        last_error=row.last_error,
    )


def _check_queues(queue: str | None, queues: Sequence[str] | None) -> list[str] | None:
    if queue is not None and queues is not None:
        raise QueError("give queue= or queues=, not both")
    if queue is not None:
        if not isinstance(queue, str):
            raise QueError(f"queue must be a str, got {queue!r}")
        return [queue]
    if queues is None:
        return None
    if isinstance(queues, str) or not all(isinstance(q, str) for q in queues):
        raise QueError(f"queues must be a list of queue names, got {queues!r}")
    return list(queues)


def _check_now(
    now: datetime.datetime | datetime.timedelta | None,
) -> tuple[datetime.datetime | None, float]:
    """The drain's time: an absolute instant, or seconds ahead of the database's now()."""
    if now is None:
        return None, 0.0
    if isinstance(now, datetime.datetime):
        if now.tzinfo is None or now.utcoffset() is None:
            raise QueError(f"now must be a timezone-aware datetime, got {now!r}")
        return now, 0.0
    if isinstance(now, datetime.timedelta):
        return None, now.total_seconds()
    raise QueError(f"now must be a datetime or a timedelta (ahead of now()), got {now!r}")


def _check_max_jobs(max_jobs: object) -> int:
    if isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1:
        raise QueError(f"max_jobs must be a whole number >= 1, got {max_jobs!r}")
    return max_jobs


@contextlib.contextmanager
def _refusing_commit(connection: Connection) -> Iterator[None]:
    """While a handler runs on the caller's connection, its ``commit()`` and ``rollback()``
    would end the caller's (the test's) transaction: refuse them, as a worker does. They
    are refused before SQLAlchemy changes any state (an event listener would run too late:
    the transaction would be left to roll back), by shadowing the two methods on this
    Connection for the duration of the handler."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise QueError(
            "a job's handler may not commit or roll back its connection: the job's writes "
            "and its completion are kept together when it returns (use job.session, whose "
            "commit() and rollback() work on a savepoint, or raise to fail the job)"
        )

    setattr(connection, "commit", refuse)  # noqa: B010
    setattr(connection, "rollback", refuse)  # noqa: B010
    try:
        yield
    finally:
        del connection.commit
        del connection.rollback


def run_locked_job(
    connection: Connection,
    registry: JobRegistry,
    job: EnqueuedJob,
    *,
    now: datetime.datetime | None = None,
    ahead: float = 0.0,
    wrap: Any = None,
) -> FailedJob | None:
    """Run ``job`` (locked by the caller) in a savepoint of ``connection``'s transaction:
    release the savepoint with its ``DELETE`` on success; on failure roll it back and record
    the error as a worker does. Returns the failure, or None when the job completed.

    ``wrap``, when given, is applied to the handler (the Flask extension runs it in an
    application context)."""
    definition = registry.get(job.job_class)
    savepoint = connection.begin_nested()
    context = JobContext(
        job_id=job.job_id,
        job_class=job.job_class,
        queue=job.queue,
        priority=job.priority,
        run_at=job.run_at,
        error_count=job.error_count,
        last_error=job.last_error,
        args=list(job.args),
        connection=connection,
    )
    key = {"queue": job.queue, "priority": job.priority, "run_at": job.run_at}
    try:
        if definition is None:
            raise UnknownJobClassError(
                f"no handler for job_class {job.job_class!r} "
                f"(the handlers know {sorted(registry) or 'no job classes'})"
            )
        handler = definition.handler if wrap is None else wrap(definition.handler)
        with _refusing_commit(connection):
            handler(context, *job.args)
            context._finish_session(keep=True)
        connection.execute(_DELETE, {**key, "job_id": job.job_id})
        savepoint.commit()
        return None
    except Exception as error:
        with contextlib.suppress(Exception):
            context._finish_session(keep=False)
        if savepoint.is_active:
            savepoint.rollback()
        last_error = format_last_error(error)
        delay = retry_delay(definition, job.error_count + 1)
        with connection.begin_nested():
            connection.execute(
                _RECORD_ERROR,
                {
                    **key,
                    "job_id": job.job_id,
                    "now": now,
                    "ahead": ahead,
                    "delay": delay,
                    "last_error": last_error,
                },
            )
        logger.error(
            "job %s %s failed (error %d), retrying in %.0fs: %s",
            job.job_id,
            job.job_class,
            job.error_count + 1,
            delay,
            error,
            exc_info=error,
            extra={"job_id": job.job_id, "job_class": job.job_class, "queue": job.queue},
        )
        return FailedJob(job=job, error=error, last_error=last_error)
    except BaseException:
        # KeyboardInterrupt, SystemExit...: as in a worker, the job is left as it was.
        with contextlib.suppress(Exception):
            context._finish_session(keep=False)
        with contextlib.suppress(Exception):
            if savepoint.is_active:
                savepoint.rollback()
        raise


def try_lock(connection: Connection, job_id: int) -> bool:
    """Take Que's session-level advisory lock on ``job_id`` if no one holds it."""
    return bool(connection.execute(_TRY_LOCK, {"job_id": job_id}).scalar_one())


def unlock(connection: Connection, job_id: int) -> None:
    """Let go of the lock of :func:`try_lock`. It outlives transactions (a rollback of the
    caller's transaction would not release it): every lock taken is released this way."""
    connection.execute(_UNLOCK, {"job_id": job_id})


def fetch_job(connection: Connection, job_id: int) -> EnqueuedJob | None:
    row = connection.execute(_ONE_JOB, {"job_id": job_id}).first()
    return None if row is None else _row(row)


def drain(
    bind: DatabaseBind,
    handlers: Handlers,
    *,
    queue: str | None = None,
    queues: Sequence[str] | None = None,
    max_jobs: int = DEFAULT_MAX_JOBS,
    now: datetime.datetime | datetime.timedelta | None = None,
    raise_errors: bool = True,
) -> DrainReport:
    """Run every ready job on ``bind`` (the test's Connection or Session), synchronously, in
    the calling thread, and return a :class:`DrainReport`.

    Jobs run in ``(priority, run_at, job_id)`` order, each locked with Que's advisory lock
    (so a worker on another connection never runs it too) and inside a savepoint: its
    handler's writes (through ``job.connection`` or ``job.session``) and its ``DELETE`` are
    kept together, or rolled back together when the handler raises, and then the job's
    error is recorded (``error_count + 1``, ``last_error``, ``run_at`` moved by the retry
    delay) as a worker does. The transaction of ``bind`` is never committed: what the drain
    did is rolled back with the test's transaction. Jobs that handlers enqueue are drained
    too; each job runs at most once per drain (a failed job that is ready again at once is
    not retried in the same drain). A Session is flushed first.

    :param handlers: a :class:`~sqlalchemy_que.JobRegistry`, a mapping of job_class to
        handler, or an iterable of job definitions.
    :param queue: only this queue; default: every queue.
    :param queues: only these queues, instead of ``queue``.
    :param max_jobs: the most jobs to run (default 1000); the report's ``limit_reached``
        says when a ready job was left.
    :param now: the time jobs must be due by: a timezone-aware datetime, or a timedelta
        ahead of the database's ``now()`` (which, inside a transaction, is the time it
        began); default ``now()``. It is also the time failed jobs are rescheduled from.
    :param raise_errors: re-raise the first handler error (default), after its savepoint was
        rolled back and its error recorded; with False, keep draining and report failures.
    :raises QueError: for a bad argument, naming it, before any job runs.
    """
    return drain_wrapped(
        bind,
        handlers,
        queue=queue,
        queues=queues,
        max_jobs=max_jobs,
        now=now,
        raise_errors=raise_errors,
    )


def drain_wrapped(
    bind: DatabaseBind,
    handlers: Handlers,
    *,
    queue: str | None = None,
    queues: Sequence[str] | None = None,
    max_jobs: int = DEFAULT_MAX_JOBS,
    now: datetime.datetime | datetime.timedelta | None = None,
    raise_errors: bool = True,
    wrap: Any = None,
) -> DrainReport:
    """:func:`drain`, with each handler wrapped by ``wrap`` (the Flask extension runs them
    in an application context)."""
    registry = registry_of(handlers)
    refuse_async_handlers(registry, "the test drain")
    chosen = _check_queues(queue, queues)
    at, ahead = _check_now(now)
    limit = _check_max_jobs(max_jobs)
    connection = _connection(bind)
    report = DrainReport()
    seen: list[int] = []
    while True:
        row = connection.execute(
            _NEXT_JOB, {"queues": chosen, "now": at, "ahead": ahead, "seen": seen}
        ).first()
        if row is None:
            break
        if report.worked >= limit:
            report.limit_reached = True
            break
        job = _row(row)
        seen.append(job.job_id)
        if not try_lock(connection, job.job_id):
            continue  # a worker elsewhere is running it
        try:
            failure = run_locked_job(connection, registry, job, now=at, ahead=ahead, wrap=wrap)
        finally:
            unlock(connection, job.job_id)
        if failure is None:
            report.completed.append(job)
        else:
            report.failed.append(failure)
            if raise_errors:
                raise failure.error
    if isinstance(bind, Session | scoped_session):
        bind.expire_all()  # the handlers wrote on its connection behind its back
    return report


def _class_name(job_class: str | JobDefinition[Any] | None) -> str | None:
    if job_class is None or isinstance(job_class, str):
        return job_class
    if isinstance(job_class, JobDefinition):
        return job_class.name
    raise QueError(f"job_class must be a str or a JobDefinition, got {job_class!r}")


def enqueued(
    bind: DatabaseBind,
    job_class: str | JobDefinition[Any] | None = None,
    *,
    queue: str | None = None,
) -> list[EnqueuedJob]:
    """The jobs in ``que_jobs`` as ``bind``'s transaction sees them, in the order a worker
    would take them (a Session is flushed first).

    :param job_class: only jobs of this class (a name or a job definition).
    :param queue: only jobs of this queue.
    """
    name = _class_name(job_class)
    connection = _connection(bind)
    rows = connection.execute(
        text(
            f"SELECT {_JOB_COLUMNS} FROM que_jobs "
            "WHERE (CAST(:job_class AS text) IS NULL OR job_class = :job_class) "
            "AND (CAST(:queue AS text) IS NULL OR queue = :queue) "
            "ORDER BY priority, run_at, job_id"
        ),
        {"job_class": name, "queue": queue},
    )
    return [_row(row) for row in rows]


class EnqueuedAssertionError(AssertionError):
    """:func:`assert_enqueued` did not find what it was told to expect."""


def assert_enqueued(
    bind: DatabaseBind,
    job_class: str | JobDefinition[Any] | None = None,
    *,
    args: Sequence[Any] | None = None,
    queue: str | None = None,
    priority: int | None = None,
    count: int | None = None,
) -> list[EnqueuedJob]:
    """Assert that jobs matching every given field are enqueued, and return them.

    :param job_class: the jobs' class (a name or a job definition); default: any.
    :param args: the jobs' decoded positional arguments, exactly; default: any.
    :param queue: the jobs' queue; default: any.
    :param priority: the jobs' priority; default: any.
    :param count: how many must match; default: at least one (``count=0`` asserts none).
    :raises AssertionError: listing what is enqueued instead.
    """
    name = _class_name(job_class)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise QueError(f"count must be a whole number >= 0, got {count!r}")
    everything = enqueued(bind)
    wanted = None if args is None else list(args)
    matching = [
        job
        for job in everything
        if (name is None or job.job_class == name)
        and (wanted is None or job.args == wanted)
        and (queue is None or job.queue == queue)
        and (priority is None or job.priority == priority)
    ]
    if (count is None and matching) or len(matching) == count:
        return matching
    fields = [f"job_class={name!r}" if name is not None else "any job_class"]
    if wanted is not None:
        fields.append(f"args={wanted!r}")
    if queue is not None:
        fields.append(f"queue={queue!r}")
    if priority is not None:
        fields.append(f"priority={priority}")
    expected = "at least one job" if count is None else f"{count} job(s)"
    listing = "\n".join(f"  {job.describe()}" for job in everything) or "  (no jobs at all)"
    raise EnqueuedAssertionError(
        f"expected {expected} with {', '.join(fields)}, found {len(matching)}; enqueued:\n{listing}"
    )


def job_context(
    job_class: str | JobDefinition[Any] = "TestJob",
    args: Sequence[Any] = (),
    *,
    connection: DatabaseBind | None = None,
    job_id: int = 1,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime.datetime | None = None,
    error_count: int = 0,
    last_error: str | None = None,
) -> JobContext:
    """A :class:`~sqlalchemy_que.JobContext` for calling a handler in a unit test, without
    a row in ``que_jobs``.

    :param job_class: the job's class, or its definition (whose queue and priority then
        serve as defaults).
    :param args: the job's positional arguments (``job.args``).
    :param connection: the Connection (or Session, whose connection is used) that
        ``job.connection`` and ``job.session`` work on; default none (they raise when used).
    :param run_at: default: the current time (UTC).
    """
    definition = job_class if isinstance(job_class, JobDefinition) else None
    name = _class_name(job_class)
    assert name is not None
    return JobContext(
        job_id=job_id,
        job_class=name,
        queue=queue if queue is not None else (definition and definition.queue) or "",
        priority=priority
        if priority is not None
        else (definition.priority if definition and definition.priority is not None else 100),
        run_at=run_at or datetime.datetime.now(datetime.timezone.utc),
        error_count=error_count,
        last_error=last_error,
        args=list(args),
        connection=None if connection is None else _connection(connection),
    )


def call_handler(
    definition: JobDefinition[Any],
    *args: Any,
    connection: DatabaseBind | None = None,
    context: JobContext | None = None,
    **kwargs: Any,
) -> object:
    """Call ``definition``'s handler as a worker would, minus the queue: with a
    :func:`job_context` (or ``context``) and the arguments bound to the handler's
    signature (keywords too). What the handler did through ``job.session`` is flushed into
    ``connection``'s transaction when it returns, and dropped when it raises; nothing is
    committed. Returns what the handler returned.

    :param connection: the Connection (or Session) for ``job.connection`` and
        ``job.session``; ignored when ``context`` is given.
    :param context: the JobContext to pass, made with :func:`job_context` for other fields
        (``error_count``, ``job_id``...).
    """
    refuse_async_handlers({definition.name: definition}, "call_handler()")
    positional = definition.positional(*args, **kwargs)
    if context is None:
        context = job_context(definition, positional, connection=connection)
    try:
        result = definition.handler(context, *positional)
    except BaseException:
        context._finish_session(keep=False)
        raise
    context._finish_session(keep=True)
    return result
