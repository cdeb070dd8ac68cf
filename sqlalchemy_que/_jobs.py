"""Declaring jobs once, with types, and enqueueing them by reference.

A job is a function whose first parameter receives the running job (a :class:`JobContext`)
and whose other parameters are the job's positional arguments. :func:`job` turns it into a
:class:`JobDefinition` carrying the name other languages know it by, its default queue and
priority, and its retry delay::

    from sqlalchemy_que import JobContext, JobRegistry

    jobs = JobRegistry()

    @jobs.job("SendEmail", queue="mail", priority=10)
    def send_email(job: JobContext, user_id: int, template: str = "welcome") -> None:
        ...

    session.add(send_email.enqueue(42, template="reset"))   # type-checked arguments
    session.add(send_email.options(priority=1).enqueue(42))

Keyword arguments are bound to their positions when the job is enqueued, because Que stores
positional arguments only (Ruby Que 0.x has no keyword arguments). The plain string form,
``enqueue("SendEmail", 42)``, stays available for jobs handled by other languages.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import inspect
import math
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Concatenate, Generic, ParamSpec, TypeAlias, TypeVar

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from ._checks import JobDefaults, check_job_class, check_priority, check_queue, check_schedule
from ._enqueue import Bind, enqueue, insert_job
from ._errors import InvalidJobError, QueError
from ._model import QueJob
from ._schedule import Schedule

if typing.TYPE_CHECKING:
    from .asyncio import AsyncBind

__all__ = [
    "JobContext",
    "JobDefinition",
    "JobRegistry",
    "RetryDelay",
    "default_retry_delay",
    "job",
]

P = ParamSpec("P")

#: A retry delay in seconds: a constant, or a function of the job's new error count.
RetryDelay: TypeAlias = "float | Callable[[int], float]"


def default_retry_delay(error_count: int) -> float:
    """Que's retry delay: ``error_count ** 4 + 3`` seconds (4, 19, 84, 259, 628...)."""
    return float(error_count**4 + 3)


class JobContext:
    """The job a handler is working, passed as the handler's first argument.

    It carries the job's fields (``job_id``, ``job_class``, ``queue``, ``priority``,
    ``run_at``, ``error_count``, ``last_error``, and the decoded ``args``), and the database
    transaction the job will complete in:

    * :attr:`connection`, the worker's locked connection, inside the job's transaction;
    * :attr:`session`, a ``Session`` on that same transaction, made on first use.

    The job's transaction opens when the handler first uses either (a handler that never
    touches the database costs no transaction of its own). What the handler writes through
    them commits in the same transaction as the job's ``DELETE``, or is rolled back when the
    handler raises: a job's effects and its completion are atomic. The session works in a
    savepoint of the job's transaction: its ``commit()`` keeps the handler's changes for the
    worker's final commit, and its ``rollback()`` undoes the handler's changes since the
    last ``commit()`` without failing the job. ``commit()`` and ``rollback()`` on
    :attr:`connection` itself are refused while the job runs: they would end the job's
    transaction half-way.

    Attempts, time and cancelling: :attr:`attempt` is this run's number (``error_count + 1``),
    :attr:`attempts_remaining` how many runs are left after this one; :attr:`deadline` and
    :meth:`time_left` say how long the job may still run under its ``timeout``; and
    :attr:`cancel_requested` turns true when someone asks to cancel the job (see
    :func:`sqlalchemy_que.admin.cancel`).

    :param connection: the Connection to hand out (a unit test may pass one of its own), or
        None with ``open_connection`` to open it on first use.
    :param open_connection: called once, on the first use of :attr:`connection`.
    :param max_attempts: the job's attempts in all; default None (no limit, as Que 0.x).
    :param timeout: seconds the job may run from now; default None (no limit).
    """

    __slots__ = (
        "_cancel",
        "_connection",
        "_deadline",
        "_finishers",
        "_open_connection",
        "_session",
        "args",
        "deadline",
        "error_count",
        "job_class",
        "job_id",
        "last_error",
        "max_attempts",
        "priority",
        "queue",
        "run_at",
    )

    def __init__(
        self,
        *,
        job_id: int,
        job_class: str,
        queue: str,
        priority: int,
        run_at: datetime.datetime,
        error_count: int,
        last_error: str | None,
        args: list[Any],
        connection: Connection | None = None,
        open_connection: Callable[[], Connection] | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self.job_id = job_id
        self.job_class = job_class
        self.queue = queue
        self.priority = priority
        self.run_at = run_at
        self.error_count = error_count
        self.last_error = last_error
        self.args = args
        self._connection = connection
        self._open_connection = open_connection
        self._session: Session | None = None
        self._finishers: list[Callable[[bool], None]] = []
        self.max_attempts = max_attempts
        #: When the job's timeout runs out (UTC), or None without a timeout.
        self.deadline: datetime.datetime | None = None
        self._deadline: float | None = None  # the same, on the monotonic clock
        if timeout is not None:
            self._deadline = time.monotonic() + timeout
            self.deadline = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
                seconds=timeout
            )
        self._cancel = threading.Event()

    @property
    def attempt(self) -> int:
        """This run's number: 1 for the first run, ``error_count + 1`` after failures."""
        return self.error_count + 1

    @property
    def attempts_remaining(self) -> int | None:
        """How many more runs the job gets if this one fails (0: this is its last attempt),
        or None when it has no limit."""
        if self.max_attempts is None:
            return None
        return max(0, self.max_attempts - self.attempt)

    def time_left(self) -> float | None:
        """Seconds until :attr:`deadline` (negative once it has passed), or None without a
        timeout."""
        if self._deadline is None:
            return None
        return self._deadline - time.monotonic()

    @property
    def cancel_requested(self) -> bool:
        """True once a cancel was requested for this job: return (or raise) soon; the worker
        then fails the job as cancelled, rolling back its transaction."""
        return self._cancel.is_set()

    def _request_cancel(self) -> None:
        self._cancel.set()

    @property
    def connection(self) -> Connection:
        """The worker's locked connection, inside the job's transaction (opened on first
        use)."""
        if self._connection is None:
            if self._open_connection is None:
                raise QueError("this JobContext was made without a connection")
            self._connection = self._open_connection()
        return self._connection

    @property
    def touched_database(self) -> bool:
        """True once the handler has asked for :attr:`connection` or :attr:`session`."""
        return self._connection is not None and self._open_connection is not None

    @property
    def session(self) -> Session:
        """A Session in a savepoint of the job's transaction (it never commits that
        transaction)."""
        if self._session is None:
            # Savepoint mode: the handler's commit() releases, and its rollback() rolls back
            # to, a savepoint of its own; the job's transaction stays the worker's.
            self._session = Session(bind=self.connection, join_transaction_mode="create_savepoint")
        return self._session

    def _finish_session(self, *, keep: bool) -> None:
        """Keep (on success) or drop what the handler did through the Session, then let go of
        it. Keeping flushes what is pending and releases the session's savepoint into the
        job's transaction, which the worker then commits. Then the callbacks given to
        :meth:`_on_finish` run, each once, told whether the job's writes are kept."""
        try:
            if self._session is not None:
                try:
                    if keep:
                        self._session.commit()
                except BaseException:
                    keep = False
                    raise
                finally:
                    self._session.close()
                    self._session = None
        finally:
            finishers, self._finishers = self._finishers, []
            for finish in finishers:
                finish(keep)

    def _on_finish(self, finish: Callable[[bool], None]) -> None:
        """Call ``finish(keep)`` when the job's writes are kept (right before the worker
        commits the job's transaction: ``keep`` is True) or dropped (False). A ``finish``
        that raises with ``keep`` True fails the job."""
        self._finishers.append(finish)

    def __repr__(self) -> str:
        return (
            f"<JobContext job_id={self.job_id} job_class={self.job_class!r} "
            f"queue={self.queue!r} error_count={self.error_count}>"
        )


Handler: TypeAlias = "Callable[..., object]"

#: The type of a handler's first parameter: JobContext, or AsyncJobContext for ``async def``.
_Context = TypeVar("_Context", bound=JobContext)


def is_async_handler(handler: object) -> bool:
    """True for an ``async def`` handler (or a callable object whose ``__call__`` is one):
    only :class:`~sqlalchemy_que.AsyncWorkerPool` runs those."""
    return inspect.iscoroutinefunction(handler) or (
        callable(handler)
        and not inspect.isroutine(handler)
        and inspect.iscoroutinefunction(type(handler).__call__)
    )


def refuse_async_handlers(registry: Mapping[str, JobDefinition[Any]], what: str) -> None:
    """Refuse a registry with ``async def`` handlers for a sync worker (``what``).

    :raises InvalidJobError: naming the async handlers' jobs.
    """
    names = sorted(name for name, d in registry.items() if is_async_handler(d.handler))
    if names:
        raise InvalidJobError(
            f"{what} runs plain def handlers, but the handlers of {', '.join(map(repr, names))} "
            "are async def: run them with sqlalchemy_que.AsyncWorkerPool on an AsyncEngine "
            "(sqlalchemy-que worker chooses it by itself), which runs plain handlers too"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class JobDefinition(JobDefaults, Generic[P]):
    """A job declared once: its handler, name and defaults. Made by :func:`job`.

    Calling the definition calls the handler directly (handy in tests).
    """

    name: str
    #: Takes a JobContext first (an AsyncJobContext for an ``async def``).
    handler: Callable[Concatenate[Any, P], object]
    queue: str | None = None
    priority: int | None = None
    retry_delay: RetryDelay | None = None
    run_at: datetime.datetime | None = None
    run_in: datetime.timedelta | float | None = None
    #: Derives a job's unique key from its arguments (called with them as the handler
    #: takes them, after the JobContext); enqueue such a job with :meth:`insert_unique`.
    unique_key: Callable[P, str] | None = None
    #: The schedules that enqueue this job periodically (see :func:`~sqlalchemy_que.cron`).
    schedules: tuple[Schedule, ...] = ()
    max_attempts: int | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidJobError(f"a job's name must be a non-empty str, got {self.name!r}")
        check_job_class(self.name)
        if self.priority is not None:
            check_priority(self.priority)
        if self.queue is not None:
            check_queue(self.queue)
        # Kept as a timedelta, whether given as one or as seconds.
        object.__setattr__(self, "run_in", check_schedule(self.run_at, self.run_in)[1])
        delay = self.retry_delay
        if (
            delay is not None
            and not callable(delay)
            and (
                isinstance(delay, bool)
                or not isinstance(delay, int | float)
                or not 0 <= delay < math.inf  # also refuses NaN
            )
        ):
            raise InvalidJobError(
                f"retry_delay must be seconds >= 0 or a function of the error count, got {delay!r}"
            )
        if self.max_attempts is not None:
            check_max_attempts(self.max_attempts)
        if self.timeout is not None:
            object.__setattr__(self, "timeout", check_timeout(self.timeout))
        _check_handler(self.handler, self.name)
        _positional_parameters(self.handler, self.name)
        if self.unique_key is not None and not callable(self.unique_key):
            raise InvalidJobError(
                f"unique_key of job {self.name!r} must be a function of the job's arguments "
                f"returning a str, got {self.unique_key!r}"
            )
        schedules = (self.schedules,) if isinstance(self.schedules, Schedule) else self.schedules
        for schedule in schedules:
            if not isinstance(schedule, Schedule):
                raise InvalidJobError(
                    f"schedule of job {self.name!r} must be made by cron() or every(), "
                    f"got {schedule!r}"
                )
            self.positional(*schedule.args)  # type: ignore[call-arg]  # must fit the handler
        object.__setattr__(self, "schedules", tuple(schedules))

    def __call__(self, job: JobContext, *args: P.args, **kwargs: P.kwargs) -> object:
        return self.handler(job, *args, **kwargs)

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        run_at: datetime.datetime | None = None,
        run_in: datetime.timedelta | float | None = None,
    ) -> JobDefinition[P]:
        """Return a copy that enqueues with another queue, priority, or time: ``run_at``, or
        ``run_in`` (a delay after the database's ``now()``), which replaces the other.

        :raises InvalidJobError: naming a bad value, or when both times are given.
        """
        changes: dict[str, Any] = {}
        if queue is not None:
            changes["queue"] = queue
        if priority is not None:
            changes["priority"] = priority
        if run_at is not None or run_in is not None:
            changes["run_at"], changes["run_in"] = run_at, run_in
        return dataclasses.replace(self, **changes)

    def positional(self, *args: P.args, **kwargs: P.kwargs) -> list[Any]:
        """Bind the arguments to the handler's signature and return them in position order.

        :raises InvalidJobError: when they do not fit the handler's signature.
        """
        parameters = _positional_parameters(self.handler, self.name)
        try:
            bound = inspect.Signature(parameters).bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidJobError(f"arguments for job {self.name!r} do not fit: {exc}") from None
        values: list[Any] = []
        pending: list[Any] = []  # defaults of skipped parameters, used if a later one is given
        for parameter in parameters:
            if parameter.name in bound.arguments:
                given = bound.arguments[parameter.name]
                values.extend(pending)
                pending.clear()
                if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                    values.extend(given)
                else:
                    values.append(given)
            elif parameter.default is not inspect.Parameter.empty:
                pending.append(parameter.default)
        return values

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> QueJob:
        """Build a checked :class:`~sqlalchemy_que.QueJob` for ``session.add()``."""
        return enqueue(self, *self.positional(*args, **kwargs))

    def insert(self, bind: Bind, /, *args: P.args, **kwargs: P.kwargs) -> int:
        """Insert the job on a Core ``Connection`` (or ``Session``); return its ``job_id``."""
        return insert_job(bind, self, *self.positional(*args, **kwargs))

    def insert_unique(self, bind: Bind, /, *args: P.args, **kwargs: P.kwargs) -> int | None:
        """Insert the job as a unique job, its key from the definition's ``unique_key``
        function; return its ``job_id``, or None when a job with that key is still waiting
        or running (nothing is inserted then). See ``docs/scheduling.md``.

        :raises InvalidJobError: when the definition has no ``unique_key`` function, or it
            does not return a non-empty str.
        """
        if self.unique_key is None:
            raise InvalidJobError(
                f"job {self.name!r} has no unique_key function; declare one with "
                "job(..., unique_key=lambda *args: ...) or pass "
                "insert_job(bind, job, ..., unique_key='...')"
            )
        positional = self.positional(*args, **kwargs)
        key = self.unique_key(*positional)  # type: ignore[call-arg]
        if not isinstance(key, str):
            raise InvalidJobError(
                f"the unique_key function of job {self.name!r} returned {key!r}, not a str"
            )
        return insert_job(bind, self, *positional, unique_key=key)

    async def insert_async(self, bind: AsyncBind, /, *args: P.args, **kwargs: P.kwargs) -> int:
        """Insert the job on an ``AsyncConnection`` (or ``AsyncSession``); return its
        ``job_id``. The arguments are checked against the handler's signature first."""
        from .asyncio import insert_job as insert_job_async

        return await insert_job_async(bind, self, *self.positional(*args, **kwargs))

    def delay_for(self, error_count: int) -> float:
        """The retry delay in seconds after the job's ``error_count``-th failure."""
        delay = self.retry_delay
        if delay is None:
            return default_retry_delay(error_count)
        if callable(delay):
            return float(delay(error_count))
        return float(delay)


def check_max_attempts(value: object) -> int:
    """:raises InvalidJobError: unless ``value`` is a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidJobError(f"max_attempts must be a whole number >= 1, got {value!r}")
    return value


def check_timeout(value: object) -> float:
    """:raises InvalidJobError: unless ``value`` is a positive number of seconds (or a
    ``timedelta``)."""
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else value
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 0 < seconds < math.inf
    ):
        raise InvalidJobError(f"timeout must be a positive number of seconds, got {value!r}")
    return float(seconds)


def _check_handler(handler: Handler, name: str) -> None:
    """Refuse a handler the worker cannot run: a coroutine, async generator or generator
    function (calling it would only make an object the worker never runs, and the job would
    be deleted as done), or one whose first positional parameter, which receives the
    :class:`JobContext`, is annotated with a type a JobContext is not.

    :raises InvalidJobError: naming the job and what is wrong with its handler.
    """
    try:
        problem = _cached_handler_problem(handler)  # options() checks its copy's handler again
    except TypeError:  # an unhashable callable object
        problem = _handler_problem(handler)
    if problem is not None:
        raise InvalidJobError(f"the handler of job {name!r} {problem}")


def _handler_problem(handler: Handler) -> str | None:
    """What :func:`_check_handler` refuses ``handler`` for, or None."""
    functions: list[object] = [handler]
    if callable(handler) and not inspect.isroutine(handler):
        # A callable object's __call__: inspect looks only at functions, methods and partials.
        functions.append(type(handler).__call__)
    for function in functions:
        if inspect.isasyncgenfunction(function) or inspect.isgeneratorfunction(function):
            kind = "an async generator" if inspect.isasyncgenfunction(function) else "a generator"
            return (
                f"is {kind} function; the worker would only create the generator, never run "
                "its body, and delete the job as done: write a function (def or async def) "
                "that returns when the work is done"
            )
    try:
        # String annotations (``from __future__ import annotations``) evaluated.
        parameters = list(inspect.signature(handler, eval_str=True).parameters.values())
    except Exception:  # a name only imported for type checkers, no signature...
        return None  # nothing to hold against the handler
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        return None  # ``*args`` takes the job; no positional parameter is refused elsewhere
    first = parameters[0]
    if first.annotation is inspect.Parameter.empty or _may_be_a_job_context(first.annotation):
        return None
    return (
        f"takes {first.name}: {inspect.formatannotation(first.annotation)} first, but its "
        "first positional parameter receives the running job (a JobContext); declare it as "
        "def handler(job: JobContext, ...), the job's arguments after it"
    )


_cached_handler_problem = functools.lru_cache(maxsize=1024)(_handler_problem)


def _may_be_a_job_context(annotation: Any) -> bool:
    """Whether a parameter annotated with ``annotation`` may be given a :class:`JobContext`:
    false only for classes (or unions of classes) unrelated to it."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _may_be_a_job_context(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return any(_may_be_a_job_context(member) for member in typing.get_args(annotation))
    if origin is not None:
        annotation = origin  # list[int] is a list
    if annotation is None:
        annotation = type(None)
    if annotation is Any or not isinstance(annotation, type):
        return True  # a TypeVar, a NewType, a forward reference...: cannot tell
    try:
        return issubclass(JobContext, annotation) or issubclass(annotation, JobContext)
    except TypeError:  # a Protocol that is not runtime-checkable, and the like
        return True


def _positional_parameters(handler: Handler, name: str) -> list[inspect.Parameter]:
    """The handler's parameters after the first (the JobContext), all positional.

    :raises InvalidJobError: for keyword-only parameters or ``**kwargs``, which Que's
        positional argument arrays cannot carry.
    """
    if not callable(handler):
        raise InvalidJobError(f"the handler of job {name!r} is {handler!r}, not a function")
    try:
        parameters = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: accept anything
        return [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)]
    if parameters and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL:
        rest = parameters  # ``*args`` receives the JobContext, then the job's arguments
    elif parameters and parameters[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        rest = parameters[1:]
    else:
        raise InvalidJobError(
            f"the handler of job {name!r} must take the running job (JobContext) as its "
            "first positional parameter"
        )
    for parameter in rest:
        if parameter.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD):
            raise InvalidJobError(
                f"the handler of job {name!r} has the keyword-only parameter "
                f"{parameter.name!r}; Que passes positional arguments only"
            )
    return rest


def job(
    name: str,
    *,
    queue: str | None = None,
    priority: int | None = None,
    retry_delay: RetryDelay | None = None,
    unique_key: Callable[..., str] | None = None,
    schedule: Schedule | Sequence[Schedule] = (),
    max_attempts: int | None = None,
    timeout: float | datetime.timedelta | None = None,
) -> Callable[[Callable[Concatenate[_Context, P], object]], JobDefinition[P]]:
    """Declare a job: decorate its handler to get a :class:`JobDefinition`.

    :param name: the ``job_class`` stored in ``que_jobs``; for jobs shared with Ruby, the Ruby
        class name (``"Billing::ChargeJob"``). Keep it stable: queued jobs refer to it.
    :param queue: the default queue when enqueueing; default ``''``.
    :param priority: the default priority when enqueueing; default 100.
    :param retry_delay: seconds to wait before a retry, constant or a function of the new error
        count; default :func:`default_retry_delay` (``count ** 4 + 3``).
    :param unique_key: a function of the job's arguments returning its unique key: such a job
        is enqueued with :meth:`JobDefinition.insert_unique` (the forms that cannot say that
        nothing was enqueued refuse it); default none.
    :param schedule: one schedule or several (:func:`~sqlalchemy_que.cron`,
        :func:`~sqlalchemy_que.every`) that enqueue this job periodically; default none.
    :param max_attempts: runs in all before the job is failed for good (moved to
        ``que_failed_jobs``); default None: the worker's ``max_attempts`` (16).
    :param timeout: seconds a run may take (a number or a ``timedelta``): its transaction
        gets that ``statement_timeout``, and a run that overruns is failed as a timeout;
        default None: the worker's ``timeout`` (none).
    :raises InvalidJobError: when decorating a handler no worker can run: an async generator
        or generator function,
        one with keyword-only parameters, or one whose first positional parameter cannot
        take the :class:`JobContext`.
    """

    schedules = (schedule,) if isinstance(schedule, Schedule) else tuple(schedule)

    def decorate(handler: Callable[Concatenate[_Context, P], object]) -> JobDefinition[P]:
        return JobDefinition(
            name=name,
            handler=handler,
            queue=queue,
            priority=priority,
            retry_delay=retry_delay,
            unique_key=unique_key,
            schedules=schedules,
            max_attempts=max_attempts,
            timeout=timeout,  # type: ignore[arg-type]  # a timedelta is kept as seconds
        )

    return decorate


def _add_schedule(found: dict[str, Schedule], schedule: Schedule) -> None:
    if schedule.key in found and found[schedule.key] != schedule:
        raise InvalidJobError(
            f"two schedules are named {schedule.key!r}; give one of them name=..."
        )
    found[schedule.key] = schedule


class JobRegistry(Mapping[str, "JobDefinition[Any]"]):
    """A set of job definitions by name: what a worker is given to know which jobs it runs.

    ``registry.job(...)`` declares and registers in one step; :meth:`add` registers existing
    definitions. Plain mappings of ``{"Name": handler}`` work for workers too.
    """

    def __init__(self, definitions: Mapping[str, Any] | None = None) -> None:
        self._definitions: dict[str, JobDefinition[Any]] = {}
        self._schedules: list[Schedule] = []
        for name, handler in (definitions or {}).items():
            if isinstance(handler, JobDefinition):
                self.add(
                    handler if handler.name == name else dataclasses.replace(handler, name=name)
                )
            else:
                self.add(JobDefinition(name=name, handler=handler))

    def add(self, *definitions: JobDefinition[Any]) -> None:
        """Register definitions.

        :raises InvalidJobError: when a name is already registered to another handler (the
            same handler registered again replaces the definition).
        """
        for definition in definitions:
            existing = self._definitions.get(definition.name)
            if existing is not None and existing.handler is not definition.handler:
                raise InvalidJobError(
                    f"job {definition.name!r} is already registered to {existing.handler!r}"
                )
            self._definitions[definition.name] = definition

    def job(
        self,
        name: str,
        *,
        queue: str | None = None,
        priority: int | None = None,
        retry_delay: RetryDelay | None = None,
        unique_key: Callable[..., str] | None = None,
        schedule: Schedule | Sequence[Schedule] = (),
        max_attempts: int | None = None,
        timeout: float | datetime.timedelta | None = None,
    ) -> Callable[[Callable[Concatenate[_Context, P], object]], JobDefinition[P]]:
        """Like :func:`job`, and register the definition here."""

        def decorate(handler: Callable[Concatenate[_Context, P], object]) -> JobDefinition[P]:
            definition = job(
                name,
                queue=queue,
                priority=priority,
                retry_delay=retry_delay,
                unique_key=unique_key,
                schedule=schedule,
                max_attempts=max_attempts,
                timeout=timeout,
            )(handler)
            self.add(definition)
            return definition

        return decorate

    def schedule(
        self, job: str | JobDefinition[Any], schedule: Schedule, /, *, args: Sequence[Any] = ()
    ) -> Schedule:
        """Enqueue ``job`` (a definition, or a job_class handled in any language) on
        ``schedule``, with ``args`` when given (else the schedule's own); return the
        schedule, attached to the job. Every worker pool given this registry takes part.

        :raises InvalidJobError: when another schedule of this registry has its name.
        """
        if not isinstance(schedule, Schedule):
            raise InvalidJobError(f"schedule must be made by cron() or every(), got {schedule!r}")
        if isinstance(job, JobDefinition):
            job.positional(*(args or schedule.args))  # the arguments must fit the handler
        bound = dataclasses.replace(schedule.bound(job), args=tuple(args) or schedule.args)
        if bound.key in self.schedules:
            raise InvalidJobError(
                f"this registry already has a schedule named {bound.key!r}; give name=..."
            )
        self._schedules.append(bound)
        return bound

    @property
    def schedules(self) -> dict[str, Schedule]:
        """Every schedule of the registry by name: its definitions' and its own."""
        found: dict[str, Schedule] = {}
        for definition in self._definitions.values():
            for schedule in definition.schedules:
                bound = schedule.bound(definition) if schedule.job is None else schedule
                _add_schedule(found, bound)
        for schedule in self._schedules:
            _add_schedule(found, schedule)
        return found

    def __getitem__(self, name: str) -> JobDefinition[Any]:
        return self._definitions[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._definitions)

    def __len__(self) -> int:
        return len(self._definitions)

    def __repr__(self) -> str:
        return f"JobRegistry({sorted(self._definitions)!r})"
