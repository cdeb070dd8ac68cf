"""Putting jobs in ``que_jobs`` inside the caller's transaction.

Enqueueing never commits: the job is written in the caller's unit of work, so it is committed
together with the data it concerns, or vanishes with it on rollback::

    from sqlalchemy.orm import Session
    from sqlalchemy_que import enqueue

    with Session(engine) as session:
        user = User(email="ada@example.com")
        session.add(user)
        session.flush()
        session.add(enqueue("SendWelcomeEmail", user.id, queue="mail"))
        session.commit()          # the user and the job, or neither

Three forms share one set of checks:

* :func:`enqueue` builds a :class:`~sqlalchemy_que.QueJob` for ``session.add()`` (ORM);
* :func:`insert_job` runs one ``INSERT`` on a Core ``Connection`` (or a ``Session``) and returns
  the new ``job_id``;
* :func:`insert_jobs` writes many jobs in one ``COPY`` round trip (bulk), and
  :func:`insert_many` many jobs of one class from their argument lists, faster still.

Every field is checked before anything is sent: a refused job raises
:class:`~sqlalchemy_que.InvalidJobError` naming the bad value, and leaves the session as it was.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union, overload

from sqlalchemy import BigInteger, Connection, DateTime, TextClause, bindparam, text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, scoped_session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from . import _tracing
from ._checks import (
    JobDefaults,
    check_job_class,
    check_priority,
    check_queue,
    check_schedule,
)
from ._errors import InvalidJobError
from ._json import _PreDumped, dump_args
from ._model import QueJob
from ._notify import _payload, channel_for, notify_job, pending_wakeup
from ._unique import check_unique_key, unique_insert_statement, unique_parameters

if TYPE_CHECKING:
    from ._jobs import JobDefinition

__all__ = ["Bind", "enqueue", "insert_job", "insert_jobs", "insert_many", "job_values"]

#: What the Core forms accept as "the caller's transaction".
Bind = Union[Connection, Session, "scoped_session[Any]"]


def job_values(
    job_class: str | JobDefinition[Any],
    args: Sequence[Any],
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime.datetime | None = None,
    run_in: datetime.timedelta | float | None = None,
) -> dict[str, Any]:
    """Check a job's fields and return the column values to insert.

    Only the fields that were given appear in the result, so the others take the database
    defaults. A :class:`~sqlalchemy_que.JobDefinition` supplies its name and its default
    queue, priority and run_at or run_in. ``args`` comes back as compact JSON text, and a
    ``run_in`` as a ``timedelta`` under the key ``"run_in"``: the job's ``run_at`` is the
    database's ``now()`` plus that.

    :raises InvalidJobError: naming the first bad field and value.
    """
    if not isinstance(job_class, str):
        if not isinstance(job_class, JobDefaults):  # a JobDefinition
            raise InvalidJobError(
                f"job_class must be a str or a JobDefinition, got {job_class!r} "
                f"of type {type(job_class).__name__}"
            )
        queue = job_class.queue if queue is None else queue
        priority = job_class.priority if priority is None else priority
        if run_at is None and run_in is None:  # a time given here replaces the definition's
            run_at, run_in = job_class.run_at, job_class.run_in
        job_class = job_class.name
    values: dict[str, Any] = {
        "job_class": check_job_class(job_class),
        "args": _PreDumped(dump_args(args)),
    }
    if queue is not None:
        values["queue"] = check_queue(queue)
    if priority is not None:
        values["priority"] = check_priority(priority)
    checked_run_at, checked_run_in = check_schedule(run_at, run_in)
    if checked_run_at is not None:
        values["run_at"] = checked_run_at
    if checked_run_in is not None:
        values["run_in"] = checked_run_in
    return values


def enqueue(
    job_class: str | JobDefinition[Any],
    *args: Any,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime.datetime | None = None,
    run_in: datetime.timedelta | float | None = None,
) -> QueJob:
    """Build a checked, unsaved :class:`~sqlalchemy_que.QueJob` for ``session.add()``.

    Nothing is sent and nothing is committed: the job is inserted at the session's next flush,
    in the session's transaction. Fields left out take the database defaults.

    :param job_class: the job's name, as workers in any language know it (``"SendEmail"``,
        ``"Billing::ChargeJob"``), at most 500 characters; or a
        :class:`~sqlalchemy_que.JobDefinition`.
    :param args: the job's positional arguments; plain JSON values only (str, int, finite
        float, bool, None, lists, dicts with str keys), nested at most 100 levels deep (the
        args array being level 1), with no list or dict inside itself.
    :param queue: the queue's name, at most 500 characters; default the definition's queue,
        else ``''``.
    :param priority: -32768..32767, lower runs first; default the definition's, else 100.
    :param run_at: a timezone-aware time before which the job does not run, from 1900-01-01
        to 9000-01-01 UTC; default the definition's (set by its ``options()``), else
        ``now()`` by the database clock.
    :param run_in: instead of ``run_at``, a delay (a ``timedelta``, or seconds as an int or
        float; at most 100 years) after the database's ``now()``, the start of the
        transaction. ``run_at`` is then filled in at flush.
    :raises InvalidJobError: naming the bad value, before anything is sent; also for a job
        declared with a ``unique_key`` (``session.add()`` could not say that a job was not
        added: use :func:`insert_job` or the definition's ``insert_unique()``).
    """
    _refuse_unique(job_class, "enqueue()")
    values = job_values(
        job_class, args, queue=queue, priority=priority, run_at=run_at, run_in=run_in
    )
    values["args"] = list(args)
    if "run_in" in values:
        values["run_at"] = _AfterNow(values.pop("run_in"))
    return QueJob(**values)


class _AfterNow(FunctionElement[datetime.datetime]):
    """The ``run_at`` of a job enqueued with ``run_in``: the database's ``now()`` plus the
    delay, which it keeps as :attr:`run_in` for :func:`insert_jobs`."""

    type = DateTime(timezone=True)
    inherit_cache = True

    def __init__(self, run_in: datetime.timedelta) -> None:
        self.run_in = run_in
        super().__init__(bindparam(None, _microseconds(run_in), type_=BigInteger()))


@compiles(_AfterNow)
def _compile_after_now(element: _AfterNow, compiler: SQLCompiler, **kw: Any) -> str:
    return f"now() + {compiler.process(element.clauses, **kw)} * {_ONE_MICROSECOND}"


#: A delay is added as a count of microseconds, elapsed time as a ``timedelta`` means it: an
#: interval of days would be calendar days in the session's time zone, some 23 or 25 hours.
_ONE_MICROSECOND = "INTERVAL '1 microsecond'"


def _microseconds(delay: datetime.timedelta) -> int:
    return (delay.days * 86_400 + delay.seconds) * 1_000_000 + delay.microseconds


def _refuse_unique(job_class: object, form: str) -> None:
    """A job declared unique must go through a form that can say it was not enqueued."""
    if getattr(job_class, "unique_key", None) is not None:
        name = getattr(job_class, "name", job_class)
        raise InvalidJobError(
            f"job {name!r} is declared with a unique_key; {form} cannot say when a job "
            f"with the same key is already waiting: use {name}.insert_unique(bind, ...) or "
            "insert_job(bind, job, ..., unique_key=...), which return None then"
        )


@overload
def insert_job(
    bind: Bind,
    job_class: str | JobDefinition[Any],
    *args: Any,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime.datetime | None = None,
    run_in: datetime.timedelta | float | None = None,
    unique_key: None = None,
) -> int: ...


@overload
def insert_job(
    bind: Bind,
    job_class: str | JobDefinition[Any],
    *args: Any,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime.datetime | None = None,
    run_in: datetime.timedelta | float | None = None,
    unique_key: str,
) -> int | None: ...


def insert_job(
    bind: Bind,
    job_class: str | JobDefinition[Any],
    *args: Any,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime.datetime | None = None,
    run_in: datetime.timedelta | float | None = None,
    unique_key: str | None = None,
) -> int | None:
    """Insert one job with a single ``INSERT ... RETURNING`` in ``bind``'s transaction.

    The Core counterpart of :func:`enqueue`, for code that holds a ``Connection`` (it also
    accepts a ``Session``). It never commits. Parameters as for :func:`enqueue`, and:

    :param unique_key: make the job unique (see ``docs/scheduling.md``): while a job
        enqueued with this key is waiting or running (still in ``que_jobs``), nothing is
        inserted and None is returned. The key is released when that job's row leaves
        ``que_jobs`` (completed, or failed for good), in the same transaction; a retry keeps
        it. A concurrent, uncommitted enqueue of the same key makes this one wait for that
        transaction to end. A non-empty str of at most 500 characters.
    :returns: the new job's ``job_id``; with ``unique_key``, None when the key is held.
    :raises InvalidJobError: naming the bad value, before anything is sent.
    """
    if unique_key is None:
        _refuse_unique(job_class, "insert_job() without unique_key")
    else:
        unique_key = check_unique_key(unique_key)
    values = job_values(
        job_class, args, queue=queue, priority=priority, run_at=run_at, run_in=run_in
    )
    due = values.get("run_at")
    if "run_in" in values:
        # The wake-up's time is a hint for the listener (which compares it with its own clock).
        due = datetime.datetime.now(_UTC) + values["run_in"]
        values["run_in"] = _microseconds(values["run_in"])
    if unique_key is not None:
        return _insert_unique(bind, values, unique_key, due)
    wakeup = pending_wakeup(_connection_of(bind), values.get("queue", ""), due)
    columns = tuple(name for name in _INSERT_ORDER if name in values)
    if wakeup is not None:
        values["channel"], values["payload"] = wakeup
    with _tracing.enqueue_span(values.get("queue", ""), values["job_class"], 1) as span:
        row = bind.execute(_insert_statement(columns, notify=wakeup is not None), values).first()
        assert row is not None  # INSERT ... RETURNING one row
        if span is not None:
            span.set_attribute("messaging.message.id", str(row[0]))
    if isinstance(bind, Session | scoped_session) and ENQUEUED_KEY in bind.info:
        bind.info[ENQUEUED_KEY].append(int(row[0]))  # for the synchronous mode
    return int(row[0])


def _insert_unique(
    bind: Bind, values: dict[str, Any], unique_key: str, due: datetime.datetime | None
) -> int | None:
    form, parameters = unique_parameters(values, unique_key)
    # The wake-up rides in the statement and is sent only with a job actually inserted (the
    # per-transaction accounting of pending_wakeup would count a skipped one as sent; the
    # server folds repeated identical notifications of one transaction into one).
    queue = parameters["queue"]
    parameters["channel"] = channel_for(queue)
    parameters["payload"] = _payload(queue, None if due is None else due.timestamp())
    row = bind.execute(unique_insert_statement(form, notify=True), parameters).first()
    return None if row is None else int(row[0])


#: Where a Session in the synchronous mode (sqlalchemy_que.testing.run_synchronously) lists
#: the ids of the jobs its transaction enqueued.
ENQUEUED_KEY = "sqlalchemy_que.enqueued"


_UTC = datetime.timezone.utc

#: The column each value of :func:`job_values` fills, and the SQL that binds it.
_COLUMNS = {
    "job_class": ("job_class", "CAST(:job_class AS text)"),
    "args": ("args", "CAST(:args AS json)"),
    "queue": ("queue", "CAST(:queue AS text)"),
    "priority": ("priority", "CAST(:priority AS smallint)"),
    "run_at": ("run_at", "CAST(:run_at AS timestamptz)"),
    "run_in": ("run_at", f"now() + CAST(:run_in AS bigint) * {_ONE_MICROSECOND}"),
}
_INSERT_ORDER = tuple(_COLUMNS)


@functools.cache
def _insert_statement(columns: tuple[str, ...], *, notify: bool) -> TextClause:
    """The single-job INSERT for a set of given values (names from the fixed list above),
    with the wake-up riding in the same statement, and round trip, when ``notify``.

    Built once per shape, so that SQLAlchemy's compiled cache serves every call."""
    names = ", ".join(_COLUMNS[name][0] for name in columns)
    binds = ", ".join(_COLUMNS[name][1] for name in columns)
    insert_sql = f"INSERT INTO que_jobs ({names}) VALUES ({binds}) RETURNING job_id"
    if not notify:
        return text(insert_sql)
    return text(
        f"WITH new_job AS ({insert_sql}) "
        "SELECT new_job.job_id, pg_notify(:channel, :payload) FROM new_job"
    )


def _connection_of(bind: Bind) -> Connection:
    return bind.connection() if isinstance(bind, Session | scoped_session) else bind


#: The columns COPY writes, in this order; run_at last, where a row due ``now() + run_in``
#: gets its time once the database's now() is known.
_COPY_ORDER = ("job_class", "args", "queue", "priority", "run_at")


def _values_of(job: QueJob) -> dict[str, Any]:
    state = job.__dict__
    run_at = state.get("run_at")
    run_in: datetime.timedelta | None = None
    if isinstance(run_at, _AfterNow):  # enqueue()d with run_in
        run_in = run_at.run_in
        run_at = None
    return job_values(
        state.get("job_class"),  # type: ignore[arg-type]  # checked by job_values
        state.get("args", []),
        queue=state.get("queue"),
        priority=state.get("priority"),
        run_at=run_at,
        run_in=run_in,
    )


def insert_jobs(bind: Bind, jobs: Iterable[QueJob]) -> int:
    """Insert many jobs in ``bind``'s transaction with PostgreSQL's ``COPY``.

    Build the jobs with :func:`enqueue`; they are not added to any session. Every job is
    checked before the first row is sent, so a bad one leaves nothing behind. Jobs that leave
    different fields unset are copied in separate groups, so unset fields still take the
    database defaults. Jobs given ``run_in`` are due that long after the database's
    ``now()``, read once before the copy. It never commits.

    :returns: the number of jobs inserted.
    :raises InvalidJobError: naming the bad job and value, before anything is sent.
    """
    groups: dict[tuple[str, ...], list[list[Any]]] = {}
    # The earliest run_at per queue (None: now), for one wake-up per queue.
    earliest: dict[str, datetime.datetime | None] = {}
    delayed: list[tuple[list[Any], str, datetime.timedelta]] = []  # rows due now() + run_in
    count = 0
    for index, job in enumerate(jobs):
        if not isinstance(job, QueJob):
            raise InvalidJobError(
                f"jobs[{index}] is {job!r}; build each job with sqlalchemy_que.enqueue()"
            )
        try:
            values = _values_of(job)
        except InvalidJobError as exc:
            raise InvalidJobError(f"jobs[{index}]: {exc}") from None
        run_in = values.pop("run_in", None)
        if run_in is not None:
            values["run_at"] = None  # known once the database's now() is
        columns = tuple(name for name in _COPY_ORDER if name in values)
        row = [values[name] for name in columns]
        groups.setdefault(columns, []).append(row)
        queue = values.get("queue", "")
        if run_in is None:
            _note_due(earliest, queue, values.get("run_at"))
        else:
            delayed.append((row, queue, run_in))
        count += 1
    if not count:
        return 0
    connection = _connection_of(bind)
    if delayed:
        now = _database_now(connection)
        for row, queue, run_in in delayed:
            row[-1] = now + run_in
            _note_due(earliest, queue, row[-1])
    queue = next(iter(earliest)) if len(earliest) == 1 else ""
    with _tracing.enqueue_span(queue, None, count):
        _copy(connection, groups, earliest)
    return count


def _note_due(
    earliest: dict[str, datetime.datetime | None], queue: str, run_at: datetime.datetime | None
) -> None:
    """Keep in ``earliest`` the earliest time a job of ``queue`` is due (None: now)."""
    if queue not in earliest:
        earliest[queue] = run_at
        return
    previous = earliest[queue]
    if previous is not None and (run_at is None or run_at < previous):
        earliest[queue] = run_at


def _database_now(connection: Connection) -> datetime.datetime:
    """The database's ``now()``: the start of the transaction, the time the default run_at
    and the single-row forms' ``now() + run_in`` use."""
    now: datetime.datetime = connection.execute(_NOW).scalar_one()
    return now


_NOW = text("SELECT now()")


def insert_many(
    bind: Bind,
    job_class: str | JobDefinition[Any],
    arguments: Iterable[Sequence[Any]],
    *,
    queue: str | None = None,
    priority: int | None = None,
    run_at: datetime.datetime | None = None,
    run_in: datetime.timedelta | float | None = None,
) -> int:
    """Insert many jobs of one class, one per argument list, with ``COPY``; the fastest form.

    ``insert_many(connection, "Reindex", ([page] for page in pages))`` is
    :func:`insert_jobs` without building a :class:`~sqlalchemy_que.QueJob` per job: the
    fields shared by all the jobs are checked once, each argument list on its own, all
    before the first row is sent. It never commits.

    :returns: the number of jobs inserted.
    :raises InvalidJobError: naming the bad argument list and value, before anything is sent.
    """
    _refuse_unique(job_class, "insert_many()")
    shared = job_values(job_class, (), queue=queue, priority=priority, run_at=run_at, run_in=run_in)
    delay = shared.pop("run_in", None)
    if delay is not None:
        shared["run_at"] = None  # known once the database's now() is
    columns = tuple(name for name in _COPY_ORDER if name in shared)
    position = columns.index("args")
    template = [shared[name] for name in columns]
    rows: list[tuple[Any, ...]] = []
    for index, args in enumerate(arguments):
        try:
            template[position] = dump_args(args)
        except InvalidJobError as exc:
            raise InvalidJobError(f"arguments[{index}]: {exc}") from None
        rows.append(tuple(template))
    if not rows:
        return 0
    connection = _connection_of(bind)
    due = shared.get("run_at")
    if delay is not None:
        due = _database_now(connection) + delay
        rows = [(*row[:-1], due) for row in rows]  # run_at is the last column
    with _tracing.enqueue_span(shared.get("queue", ""), shared["job_class"], len(rows)):
        _copy(connection, {columns: rows}, {shared.get("queue", ""): due})
    return len(rows)


def _copy(
    connection: Connection,
    groups: Mapping[tuple[str, ...], Sequence[Sequence[Any]]],
    earliest: dict[str, datetime.datetime | None],
) -> None:
    """COPY each group of rows (rows with the same columns) in ``connection``'s transaction,
    then send one wake-up per queue."""
    if not connection.in_transaction():
        connection.begin()
    raw = connection.connection.driver_connection
    if raw is None:  # pragma: no cover - a detached connection cannot be written to
        raise InvalidJobError("the connection is closed")
    table = connection.dialect.identifier_preparer.format_table(QueJob.__table__)
    statements = [
        (f"COPY {table} ({', '.join(columns)}) FROM STDIN", rows)
        for columns, rows in groups.items()
    ]
    if _is_async(raw):
        # psycopg's AsyncConnection under an AsyncConnection's run_sync (sqlalchemy_que.asyncio)
        _await(_copy_async(raw, statements))
    else:
        with raw.cursor() as cursor:
            for statement, rows in statements:
                with cursor.copy(statement) as copy:
                    for row in rows:
                        copy.write_row(row)
    for queue, run_at in earliest.items():
        notify_job(connection, queue, run_at)


def _is_async(raw: Any) -> bool:
    import psycopg

    return isinstance(raw, psycopg.AsyncConnection)


def _await(awaitable: Any) -> Any:
    """Run ``awaitable`` from sync code called through SQLAlchemy's ``run_sync``."""
    from sqlalchemy import util

    await_ = getattr(util, "await_", None) or util.await_only  # SQLAlchemy 2.1 / 2.0
    return await_(awaitable)


async def _copy_async(raw: Any, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
    async with raw.cursor() as cursor:
        for statement, rows in statements:
            async with cursor.copy(statement) as copy:
                for row in rows:
                    await copy.write_row(row)
