"""Typed job declarations: :func:`job`, :class:`JobDefinition`, :class:`JobRegistry` and retry
delays; enqueueing by reference on a real PostgreSQL, and what type checkers see."""

from __future__ import annotations

import datetime
import functools
import math
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from sqlalchemy_que import (
    InvalidJobError,
    JobContext,
    JobDefinition,
    JobRegistry,
    Worker,
    WorkerError,
    WorkerPool,
    default_retry_delay,
    enqueue,
    insert_job,
    insert_jobs,
    insert_many,
    job,
)
from sqlalchemy_que.testing import drain

UTC = datetime.timezone.utc
LATER = datetime.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


@job("SendEmail", queue="mail", priority=10)
def send_email(job: JobContext, user_id: int, template: str = "welcome") -> str:
    return f"{job.job_id}:{user_id}:{template}"


@job("Notify")
def notify(job: JobContext, user_id: int, channel: str = "email", urgent: bool = False) -> None:
    """Two trailing defaults: giving the last one by keyword needs the middle one filled."""


@job("Sum")
def total(job: JobContext, *numbers: int) -> int:
    return sum(numbers)


@job("Tag")
def tag(job: JobContext, first: str, *rest: str) -> None:
    pass


def rows(bind: Connection | Session) -> list[dict[str, Any]]:
    result = bind.execute(
        text(
            "SELECT job_id, job_class, queue, priority, run_at, args::text AS args, "
            "now() AS now FROM que_jobs ORDER BY job_id"
        )
    )
    return [dict(row._mapping) for row in result]


def stored(bind: Connection | Session) -> list[tuple[str, str, int, str]]:
    return [(r["job_class"], r["queue"], r["priority"], r["args"]) for r in rows(bind)]


# Enqueueing a declared job ------------------------------------------------------------------


def test_declared_job_enqueues_with_its_name_queue_and_priority(session: Session) -> None:
    session.add(send_email.enqueue(42))
    session.flush()
    (row,) = rows(session)
    assert (row["job_class"], row["queue"], row["priority"], row["args"]) == (
        "SendEmail",
        "mail",
        10,
        "[42]",  # an unused default is not written: Ruby fills its own defaults
    )
    assert row["run_at"] == row["now"]


def test_declaration_without_defaults_takes_the_database_defaults(session: Session) -> None:
    session.add(notify.enqueue(7))
    session.flush()
    (row,) = rows(session)
    assert (row["job_class"], row["queue"], row["priority"], row["args"]) == (
        "Notify",
        "",
        100,
        "[7]",
    )
    assert row["run_at"] == row["now"]


def test_options_override_and_leave_the_original_unchanged(session: Session) -> None:
    urgent = send_email.options(queue="urgent", priority=1, run_at=LATER)
    session.add(urgent.enqueue(42))
    session.add(send_email.enqueue(43))
    session.flush()
    first, second = rows(session)
    assert (first["queue"], first["priority"], first["run_at"], first["args"]) == (
        "urgent",
        1,
        LATER,
        "[42]",
    )
    assert (second["queue"], second["priority"], second["args"]) == ("mail", 10, "[43]")
    assert second["run_at"] == second["now"]
    assert (send_email.queue, send_email.priority, send_email.run_at) == ("mail", 10, None)
    assert urgent.name == "SendEmail"
    assert urgent.handler is send_email.handler


def test_options_change_only_what_is_given_and_accept_zero_and_empty(session: Session) -> None:
    session.add(send_email.options(priority=0).enqueue(1))
    session.add(send_email.options(queue="").enqueue(2))
    session.flush()
    assert stored(session) == [("SendEmail", "mail", 0, "[1]"), ("SendEmail", "", 10, "[2]")]


def test_options_are_checked_when_given() -> None:
    with pytest.raises(InvalidJobError, match=r"priority 40000 is outside the smallint range"):
        send_email.options(priority=40000)
    with pytest.raises(InvalidJobError, match=r"run_at 2030-01-01T00:00:00 has no time zone"):
        send_email.options(run_at=datetime.datetime(2030, 1, 1))
    with pytest.raises(InvalidJobError, match=r"run_at 9999-12-31T23:59:59.999999\+00:00 is out"):
        send_email.options(run_at=datetime.datetime.max.replace(tzinfo=UTC))
    with pytest.raises(InvalidJobError, match=r"queue must be a str, got 1 of type int"):
        send_email.options(queue=1)  # type: ignore[arg-type]


def test_options_run_in_delays_every_form_after_the_databases_now(session: Session) -> None:
    later = send_email.options(run_in=datetime.timedelta(minutes=5))
    assert later.run_in == datetime.timedelta(minutes=5)
    assert send_email.options(run_in=90).run_in == datetime.timedelta(seconds=90)
    session.add(later.enqueue(1))
    session.add(enqueue(later, 2))
    session.flush()
    later.insert(session, 3)
    insert_job(session, later, 4)
    insert_jobs(session, [later.enqueue(5)])
    insert_many(session, later, [[6]])
    result = rows(session)
    assert [r["args"] for r in result] == ["[1]", "[2]", "[3]", "[4]", "[5]", "[6]"]
    assert {r["run_at"] - r["now"] for r in result} == {datetime.timedelta(minutes=5)}
    assert {(r["job_class"], r["queue"], r["priority"]) for r in result} == {
        ("SendEmail", "mail", 10)
    }


def test_a_time_given_when_enqueueing_replaces_the_definitions(session: Session) -> None:
    delayed = send_email.options(run_in=60)
    fixed = send_email.options(run_at=LATER)
    session.add(enqueue(delayed, 1, run_at=LATER))
    session.add(enqueue(fixed, 2, run_in=30))
    session.flush()
    insert_job(session, fixed, 3, run_in=30)
    insert_many(session, delayed, [[4]], run_at=LATER)
    first, second, third, fourth = rows(session)
    assert (first["run_at"], fourth["run_at"]) == (LATER, LATER)
    assert second["run_at"] - second["now"] == datetime.timedelta(seconds=30)
    assert third["run_at"] - third["now"] == datetime.timedelta(seconds=30)


def test_options_run_at_and_run_in_replace_each_other() -> None:
    assert send_email.options(run_in=60).options(run_at=LATER).run_in is None
    assert send_email.options(run_in=60).options(run_at=LATER).run_at == LATER
    assert send_email.options(run_at=LATER).options(run_in=60).run_at is None
    assert send_email.options(run_at=LATER).options(priority=1).run_at == LATER
    assert send_email.options(run_in=5).options(queue="q").run_in == datetime.timedelta(seconds=5)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: send_email.options(run_at=LATER, run_in=60),
            r"give run_at or run_in, not both \(got run_at=datetime.datetime\(2031, 5, 6",
        ),
        (
            lambda: JobDefinition("X", handler, run_at=LATER, run_in=1),
            r"give run_at or run_in, not both",
        ),
        (lambda: send_email.options(run_in=-5), r"run_in must not be negative, got -5"),
        (lambda: send_email.options(run_in=math.nan), r"run_in must be a finite number .*nan"),
        (lambda: send_email.options(run_in=True), r"run_in must be a datetime.timedelta .*True"),
        (lambda: loose_send_email.options(run_in="1"), r"run_in must be .* got '1' of type str"),
    ],
)
def test_bad_run_in_options_are_refused_naming_the_value(make: Any, message: str) -> None:
    with pytest.raises(InvalidJobError, match=message):
        make()


def test_keyword_arguments_are_bound_to_their_positions(session: Session) -> None:
    session.add(send_email.enqueue(42, template="reset"))
    session.add(send_email.enqueue(user_id=43, template="bye"))
    session.add(send_email.enqueue(template="first", user_id=44))
    session.flush()
    assert [r["args"] for r in rows(session)] == [
        '[42,"reset"]',
        '[43,"bye"]',
        '[44,"first"]',
    ]


def test_a_skipped_middle_default_is_filled_when_a_later_one_is_given() -> None:
    assert notify.positional(1, urgent=True) == [1, "email", True]
    assert notify.positional(1, channel="sms") == [1, "sms"]
    assert notify.positional(1) == [1]
    assert notify.enqueue(1, urgent=True).args == [1, "email", True]


#: For calls a type checker would refuse: what untyped callers (and other languages) may send.
loose_send_email: Any = send_email
loose_tag: Any = tag
loose_job: Any = job


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: loose_send_email.enqueue(1, "a", "b"), r"job 'SendEmail' do not fit: too many"),
        (lambda: loose_send_email.enqueue(1, nope=2), r"job 'SendEmail' do not fit: .*'nope'"),
        (lambda: loose_send_email.enqueue(), r"job 'SendEmail' do not fit: missing .*'user_id'"),
        (
            lambda: loose_send_email.enqueue(1, user_id=2),
            r"job 'SendEmail' do not fit: multiple values .*'user_id'",
        ),
        (lambda: loose_tag.enqueue(), r"job 'Tag' do not fit: missing .*'first'"),
        (lambda: loose_send_email.insert(None, 1, 2, 3), r"job 'SendEmail' do not fit: too many"),
    ],
)
def test_arguments_that_do_not_fit_are_refused_naming_the_job(call: Any, message: str) -> None:
    with pytest.raises(InvalidJobError, match=message):
        call()


def test_arguments_that_are_not_json_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(InvalidJobError, match=r"args\[1\] is nan"):
        send_email.enqueue(1, template=math.nan)  # type: ignore[arg-type]


def test_var_positional_handlers_take_any_number_of_arguments(session: Session) -> None:
    session.add(total.enqueue(1, 2, 3))
    session.add(total.enqueue())
    session.add(tag.enqueue("a", "b", "c"))
    session.add(tag.enqueue("only"))
    session.flush()
    assert [r["args"] for r in rows(session)] == ["[1,2,3]", "[]", '["a","b","c"]', '["only"]']


def test_a_handler_taking_only_star_args_receives_the_job_in_it(session: Session) -> None:
    def anything(*args: Any) -> None:
        pass

    definition = job("Anything")(anything)
    session.add(definition.enqueue(1, "two", [3]))
    session.flush()
    assert stored(session) == [("Anything", "", 100, '[1,"two",[3]]')]


def test_insert_returns_the_job_id(connection: Connection) -> None:
    first = send_email.insert(connection, 42)
    second = send_email.options(priority=3, run_at=LATER).insert(connection, 43, template="x")
    assert isinstance(first, int)
    assert second != first
    by_id = {r["job_id"]: r for r in rows(connection)}
    assert set(by_id) == {first, second}
    assert (by_id[first]["job_class"], by_id[first]["queue"], by_id[first]["priority"]) == (
        "SendEmail",
        "mail",
        10,
    )
    assert by_id[first]["args"] == "[42]"
    assert (by_id[second]["priority"], by_id[second]["run_at"], by_id[second]["args"]) == (
        3,
        LATER,
        '[43,"x"]',
    )


def test_insert_accepts_a_session(session: Session) -> None:
    job_id = total.insert(session, 5, 6)
    assert [(r["job_id"], r["args"]) for r in rows(session)] == [(job_id, "[5,6]")]


def test_the_plain_enqueue_functions_use_the_definitions_name_and_defaults(
    session: Session,
) -> None:
    session.add(enqueue(send_email, 1))
    session.add(enqueue(send_email, 2, "reset", queue="other", priority=0))
    session.add(enqueue(send_email.options(run_at=LATER), 3))
    session.flush()
    insert_job(session, send_email, 4)
    insert_jobs(session, [enqueue(send_email, 5), enqueue(send_email.options(run_at=LATER), 6)])
    result = rows(session)
    assert [(r["job_class"], r["queue"], r["priority"], r["args"]) for r in result] == [
        ("SendEmail", "mail", 10, "[1]"),
        ("SendEmail", "other", 0, '[2,"reset"]'),
        ("SendEmail", "mail", 10, "[3]"),
        ("SendEmail", "mail", 10, "[4]"),
        ("SendEmail", "mail", 10, "[5]"),
        ("SendEmail", "mail", 10, "[6]"),
    ]
    assert [r["run_at"] == LATER for r in result] == [False, False, True, False, False, True]


def test_calling_the_definition_calls_the_handler(connection: Connection) -> None:
    context = JobContext(
        job_id=7,
        job_class="SendEmail",
        queue="mail",
        priority=10,
        run_at=LATER,
        error_count=0,
        last_error=None,
        args=[1],
        connection=connection,
    )
    assert send_email(context, 1) == "7:1:welcome"
    assert send_email(context, 2, template="reset") == "7:2:reset"
    assert total(context, 1, 2, 3) == 6


# Declarations that are refused ---------------------------------------------------------------


def keyword_only(job: JobContext, user_id: int, *, flag: bool = False) -> None:
    pass


def var_keyword(job: JobContext, **options: Any) -> None:
    pass


def star_args_then_keyword(*args: Any, flag: bool = False) -> None:
    pass


def star_args_and_kwargs(*args: Any, **kwargs: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("handler", "parameter"),
    [
        (keyword_only, "flag"),
        (var_keyword, "options"),
        (star_args_then_keyword, "flag"),
        (star_args_and_kwargs, "kwargs"),
    ],
)
def test_a_keyword_only_parameter_is_refused(handler: Any, parameter: str) -> None:
    with pytest.raises(
        InvalidJobError,
        match=rf"job 'Bad' has the keyword-only parameter '{parameter}'; Que passes positional",
    ):
        job("Bad")(handler)
    with pytest.raises(InvalidJobError, match=rf"keyword-only parameter '{parameter}'"):
        JobRegistry({"Bad": handler})


def no_parameters() -> None:
    pass


def keyword_only_job(*, job: JobContext) -> None:
    pass


def only_var_keyword(**kwargs: Any) -> None:
    pass


@pytest.mark.parametrize("handler", [no_parameters, keyword_only_job, only_var_keyword])
def test_a_handler_without_a_first_positional_parameter_is_refused(handler: Any) -> None:
    with pytest.raises(
        InvalidJobError,
        match=r"handler of job 'Bad' must take the running job \(JobContext\) as its first",
    ):
        job("Bad")(handler)


async def coroutine_handler(job: JobContext, user_id: int) -> None:
    pass


async def async_generator_handler(job: JobContext) -> AsyncIterator[int]:
    yield 1


def generator_handler(job: JobContext) -> Iterator[int]:
    yield 1


class AsyncCallable:
    async def __call__(self, job: JobContext) -> None:
        pass


@pytest.mark.parametrize(
    ("handler", "kind"),
    [
        (async_generator_handler, "an async generator function"),
        (generator_handler, "a generator function"),
    ],
)
def test_generator_handlers_are_refused_wherever_they_are_given(
    handler: Any, kind: str, engine: Engine
) -> None:
    """The worker would call them, get a generator it never runs, and delete the job as
    done."""
    message = rf"the handler of job 'Bad' is {kind}; the worker would only create"
    with pytest.raises(InvalidJobError, match=message):
        job("Bad")(handler)
    with pytest.raises(InvalidJobError, match=message):
        JobRegistry().job("Bad")(handler)
    with pytest.raises(InvalidJobError, match=message):
        JobDefinition("Bad", handler)
    with pytest.raises(InvalidJobError, match=message):
        JobRegistry({"Bad": handler})


@pytest.mark.parametrize(
    "handler",
    [coroutine_handler, functools.partial(coroutine_handler), AsyncCallable()],
)
def test_async_handlers_are_declared_but_refused_by_the_sync_workers_and_the_drain(
    handler: Any, engine: Engine
) -> None:
    """Only AsyncWorkerPool awaits them: a sync worker would get a coroutine it never runs
    and delete the job as done."""
    definition = job("Async")(handler)
    assert JobRegistry({"Async": handler})["Async"].handler is handler
    message = r"the handlers of 'Async' are async def: run them with sqlalchemy_que\.AsyncWorker"
    with pytest.raises(WorkerError, match=message):
        Worker(engine, {"Async": handler})
    with pytest.raises(WorkerError, match=message):
        WorkerPool(engine, [definition])
    with engine.connect() as connection, pytest.raises(InvalidJobError, match=message):
        drain(connection, [definition])


def first_is_an_id(user_id: int, template: str) -> None:
    pass


def first_is_a_union(value: int | str) -> None:
    pass


def first_is_a_generic(values: list[int]) -> None:
    pass


def first_is_a_session(session: Session, user_id: int) -> None:
    pass


def mailer_then_an_id(mailer: object, user_id: int) -> None:
    pass


@pytest.mark.parametrize(
    ("handler", "described"),
    [
        (first_is_an_id, "user_id: int"),
        (first_is_a_union, "value: int | str"),
        (first_is_a_generic, r"values: list\[int\]"),
        (first_is_a_session, r"session: sqlalchemy\.orm\.session\.Session"),
        (functools.partial(mailer_then_an_id, object()), "user_id: int"),
    ],
)
def test_a_handler_whose_first_parameter_cannot_take_the_job_is_refused(
    handler: Any, described: str
) -> None:
    """``def h(user_id: int)`` would receive the JobContext as user_id and fail every run.
    The annotations here are strings (``from __future__ import annotations``): resolved."""
    message = (
        rf"the handler of job 'Bad' takes {described} first, but its first positional "
        r"parameter receives the running job \(a JobContext\)"
    )
    with pytest.raises(InvalidJobError, match=message):
        job("Bad")(handler)
    with pytest.raises(InvalidJobError, match=message):
        JobRegistry({"Bad": handler})


class SpecialContext(JobContext):
    __slots__ = ()


class CallableHandler:
    def __call__(self, job: JobContext, user_id: int) -> None:
        pass


def unannotated(job, user_id) -> None:  # type: ignore[no-untyped-def]  # noqa: ANN001
    pass


def annotated_any(job: Any) -> None:
    pass


def annotated_object(job: object) -> None:
    pass


def annotated_optional(job: JobContext | None) -> None:
    pass


def annotated_subclass(job: SpecialContext) -> None:
    pass


def annotated_unknown(job: NotImportedAtRunTime) -> None:  # type: ignore[name-defined]  # noqa: F821
    pass


def mailer_first(mailer: object, job: JobContext, user_id: int) -> None:
    pass


@pytest.mark.parametrize(
    "handler",
    [
        send_email.handler,
        unannotated,
        annotated_any,
        annotated_object,
        annotated_optional,
        annotated_subclass,
        annotated_unknown,  # an annotation that cannot be resolved is not held against it
        CallableHandler(),
        functools.partial(mailer_first, object()),
        max,  # a builtin without a signature
        len,
        lambda *args: None,
    ],
)
def test_handlers_that_can_take_the_job_are_accepted(handler: Any) -> None:
    assert JobRegistry({"Good": handler})["Good"].handler is handler
    assert job("Good")(handler).handler is handler


def test_a_handler_that_is_not_callable_is_refused() -> None:
    with pytest.raises(InvalidJobError, match=r"the handler of job 'Bad' is 42, not a function"):
        JobRegistry({"Bad": 42})


def handler(job: JobContext) -> None:
    pass


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        (lambda: job("X", priority=40000), r"priority 40000 is outside the smallint range"),
        (lambda: job("X", priority=-32769), r"priority -32769 is outside the smallint range"),
        (lambda: job("X", priority=True), r"priority must be an int, got True of type bool"),
        (lambda: loose_job("X", priority="1"), r"priority must be an int, got '1' of type str"),
        (lambda: job(""), r"a job's name must be a non-empty str, got ''"),
        (lambda: loose_job(None), r"a job's name must be a non-empty str, got None"),
        (lambda: loose_job("X", queue=5), r"queue must be a str, got 5"),
        (lambda: job("X", queue="q" * 501), r"queue 'q{40}'\.\.\. is 501 characters long"),
        (lambda: job("X" * 501), r"job_class 'X{40}'\.\.\. is 501 characters long"),
        (lambda: job("X\x00"), r"job_class 'X\\x00' contains a NUL character"),
        (lambda: job("X\udc00"), r"job_class 'X\\udc00' is not valid UTF-8 text"),
        (lambda: job("X", retry_delay=-1), r"retry_delay must be seconds >= 0 .*got -1"),
        (lambda: job("X", retry_delay=-0.5), r"retry_delay must be seconds >= 0 .*got -0.5"),
        (lambda: job("X", retry_delay=math.nan), r"retry_delay must be seconds >= 0 .*got nan"),
        (lambda: job("X", retry_delay=math.inf), r"retry_delay must be seconds >= 0 .*got inf"),
        (lambda: loose_job("X", retry_delay="5"), r"retry_delay must be seconds >= 0 .*got '5'"),
        (lambda: job("X", retry_delay=True), r"retry_delay must be seconds >= 0 .*got True"),
    ],
)
def test_bad_declarations_are_refused(declare: Any, message: str) -> None:
    with pytest.raises(InvalidJobError, match=message):
        declare()(handler)


def test_the_same_checks_apply_to_registry_declarations() -> None:
    registry = JobRegistry()
    with pytest.raises(InvalidJobError, match=r"priority 32768 is outside the smallint range"):
        registry.job("X", priority=32768)(handler)
    assert len(registry) == 0


# Retry delays ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_count", "seconds"), [(1, 4), (2, 19), (3, 84), (4, 259), (5, 628), (6, 1299)]
)
def test_the_default_retry_delay_is_count_to_the_fourth_plus_three(
    error_count: int, seconds: float
) -> None:
    assert default_retry_delay(error_count) == seconds
    assert send_email.delay_for(error_count) == seconds


def test_a_constant_retry_delay() -> None:
    every_minute = job("Poll", retry_delay=60)(handler)
    never_wait = job("Now", retry_delay=0)(handler)
    assert [every_minute.delay_for(n) for n in (1, 2, 10)] == [60.0, 60.0, 60.0]
    assert isinstance(every_minute.delay_for(1), float)
    assert never_wait.delay_for(5) == 0.0
    assert job("Half", retry_delay=0.5)(handler).delay_for(3) == 0.5


def test_a_retry_delay_function_of_the_error_count() -> None:
    seen: list[int] = []

    def doubling(error_count: int) -> float:
        seen.append(error_count)
        return float(2**error_count)

    backoff = job("Backoff", retry_delay=doubling)(handler)
    assert [backoff.delay_for(n) for n in (1, 2, 3, 10)] == [2.0, 4.0, 8.0, 1024.0]
    assert seen == [1, 2, 3, 10]
    assert backoff.options(priority=1).delay_for(4) == 16.0  # options keep the retry delay


# The registry ---------------------------------------------------------------------------------


def test_registry_job_declares_and_registers() -> None:
    registry = JobRegistry()

    @registry.job("SendEmail", queue="mail", priority=10, retry_delay=30)
    def send(job: JobContext, user_id: int) -> None:
        pass

    @registry.job("Billing::ChargeJob")
    def charge(job: JobContext, amount: int) -> None:
        pass

    assert isinstance(send, JobDefinition)
    assert isinstance(registry, Mapping)
    assert len(registry) == 2
    assert list(registry) == ["SendEmail", "Billing::ChargeJob"]
    assert registry["SendEmail"] is send
    assert registry["Billing::ChargeJob"] is charge
    assert "SendEmail" in registry
    assert "Missing" not in registry
    assert registry.get("Missing") is None
    with pytest.raises(KeyError):
        registry["Missing"]
    assert dict(registry) == {"SendEmail": send, "Billing::ChargeJob": charge}
    assert (send.name, send.queue, send.priority) == ("SendEmail", "mail", 10)
    assert send.delay_for(3) == 30
    assert repr(registry) == "JobRegistry(['Billing::ChargeJob', 'SendEmail'])"


def test_registry_refuses_a_second_handler_for_a_name() -> None:
    registry = JobRegistry()
    registry.add(send_email)
    registry.add(send_email)  # the same definition again is harmless
    assert len(registry) == 1

    def other(job: JobContext, user_id: int) -> None:
        pass

    with pytest.raises(InvalidJobError, match=r"job 'SendEmail' is already registered to"):
        registry.job("SendEmail")(other)
    with pytest.raises(InvalidJobError, match=r"job 'SendEmail' is already registered to"):
        registry.add(job("SendEmail")(other))
    assert registry["SendEmail"] is send_email


def test_registry_wraps_plain_handlers_and_renames_definitions() -> None:
    def print_name(job: JobContext, name: str) -> None:
        pass

    registry = JobRegistry({"PrintName": print_name, "Mail::Send": send_email, "Sum": total})
    assert list(registry) == ["PrintName", "Mail::Send", "Sum"]
    wrapped = registry["PrintName"]
    assert isinstance(wrapped, JobDefinition)
    assert (wrapped.name, wrapped.handler, wrapped.queue, wrapped.priority) == (
        "PrintName",
        print_name,
        None,
        None,
    )
    assert wrapped.enqueue("ada").job_class == "PrintName"
    assert wrapped.enqueue("ada").args == ["ada"]
    renamed = registry["Mail::Send"]
    assert (renamed.name, renamed.handler, renamed.queue, renamed.priority) == (
        "Mail::Send",
        send_email.handler,
        "mail",
        10,
    )
    assert send_email.name == "SendEmail"  # renaming copies
    assert registry["Sum"] is total
    assert len(JobRegistry()) == 0
    assert len(JobRegistry(None)) == 0


# What type checkers see ------------------------------------------------------------------------


TYPED_MODULE = """
from sqlalchemy_que import JobContext, job


@job("SendEmail", queue="mail")
def send_email(job: JobContext, user_id: int, template: str = "welcome") -> None:
    pass

"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_type_checkers_see_the_job_arguments(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text(
        TYPED_MODULE
        + textwrap.dedent(
            """
            send_email.enqueue(42)
            send_email.enqueue(42, "reset")
            send_email.enqueue(user_id=42, template="reset")
            send_email.options(priority=1).enqueue(42)
            """
        )
    )
    (tmp_path / "bad.py").write_text(
        TYPED_MODULE
        + textwrap.dedent(
            """
            send_email.enqueue("not-an-int")
            send_email.enqueue(42, templat="reset")
            """
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "good.py",
            "bad.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    assert not [line for line in lines if line.startswith("good.py")], result.stdout
    errors = [line for line in lines if line.startswith("bad.py") and ": error:" in line]
    assert len(errors) == 2, result.stdout
    first, second = errors
    assert first.startswith("bad.py:10:"), first
    assert '"str"' in first, first
    assert '"int"' in first, first
    assert first.endswith("[arg-type]"), first
    assert second.startswith("bad.py:11:"), second
    assert '"templat"' in second, second
    assert second.endswith("[call-arg]"), second
