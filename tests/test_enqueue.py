"""Enqueue: the ORM, Core and bulk forms, the checks on every field, and the round trip of
arguments, on a real PostgreSQL (contract sections 2 and 7)."""

from __future__ import annotations

import ast
import datetime
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Engine, func, make_url, select, text
from sqlalchemy.orm import Session

import sqlalchemy_que as que
from sqlalchemy_que import InvalidJobError, QueJob, enqueue, insert_job, insert_jobs, insert_many
from sqlalchemy_que._notify import channel_for, parse_payload

UTC = datetime.timezone.utc


def rows(bind: Connection | Session) -> list[dict[str, Any]]:
    result = bind.execute(
        text(
            "SELECT priority, run_at, job_id, job_class, args::text AS args, error_count, "
            "last_error, queue FROM que_jobs ORDER BY job_id"
        )
    )
    return [dict(row._mapping) for row in result]


def test_bare_enqueue_takes_the_database_defaults(session: Session) -> None:
    session.add(enqueue("SendEmail"))
    session.flush()
    now = session.execute(select(func.now())).scalar_one()
    (row,) = rows(session)
    assert row["queue"] == ""
    assert row["priority"] == 100
    assert row["run_at"] == now  # the database clock: now() of the inserting transaction
    assert row["args"] == "[]"
    assert row["error_count"] == 0
    assert row["last_error"] is None
    assert row["job_class"] == "SendEmail"


def test_args_are_stored_as_a_compact_json_array_with_string_keys(session: Session) -> None:
    session.add(enqueue("Billing::ChargeJob", 1, "two", {"three": 3, "nested": [None, True]}))
    session.flush()
    (row,) = rows(session)
    assert row["job_class"] == "Billing::ChargeJob"  # stored verbatim
    assert row["args"] == '[1,"two",{"three":3,"nested":[null,true]}]'


def test_non_ascii_text_is_stored_unescaped(session: Session) -> None:
    session.add(enqueue("Greet", "héllo wörld ☃", {"名前": "太郎"}))
    session.flush()
    assert rows(session)[0]["args"] == '["héllo wörld ☃",{"名前":"太郎"}]'


def test_priority_queue_and_run_at_are_honoured(session: Session) -> None:
    run_at = datetime.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    session.add(enqueue("Report", priority=0, queue="reports", run_at=run_at))
    session.add(enqueue("Report", priority=-32768))
    session.add(enqueue("Report", priority=32767))
    session.flush()
    first, low, high = rows(session)
    assert (first["priority"], first["queue"], first["run_at"]) == (0, "reports", run_at)
    assert low["priority"] == -32768
    assert high["priority"] == 32767


def test_run_at_keeps_microseconds_across_time_zones(session: Session) -> None:
    tokyo = datetime.timezone(datetime.timedelta(hours=9))
    run_at = datetime.datetime(2030, 1, 1, 9, 0, 0, 1, tzinfo=tokyo)
    job = enqueue("Later", run_at=run_at)
    session.add(job)
    session.flush()
    assert rows(session)[0]["run_at"] == run_at
    assert rows(session)[0]["run_at"].astimezone(UTC) == datetime.datetime(
        2030, 1, 1, 0, 0, 0, 1, tzinfo=UTC
    )


def test_the_returned_model_carries_the_generated_key(session: Session) -> None:
    job = enqueue("SendEmail", 7)
    session.add(job)
    session.flush()
    assert job.job_id == rows(session)[0]["job_id"]
    assert job.priority == 100
    assert job.queue == ""
    assert job.args == [7]


@pytest.fixture
def users(engine: Engine) -> Engine:
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS test_users"))
        connection.execute(text("CREATE TABLE test_users (id serial PRIMARY KEY, email text)"))
    return engine


def counts(engine: Engine) -> tuple[int, int]:
    with engine.connect() as connection:
        users = connection.execute(text("SELECT count(*) FROM test_users")).scalar_one()
        jobs = connection.execute(text("SELECT count(*) FROM que_jobs")).scalar_one()
    return users, jobs


def test_enqueue_commits_with_the_callers_changes(users: Engine) -> None:
    with Session(users) as session:
        user_id = session.execute(
            text("INSERT INTO test_users (email) VALUES ('ada@example.com') RETURNING id")
        ).scalar_one()
        session.add(enqueue("SendWelcomeEmail", user_id))
        assert counts(users) == (0, 0)  # nothing visible before the caller commits
        session.commit()
    assert counts(users) == (1, 1)


def test_enqueue_vanishes_with_the_callers_rollback(users: Engine) -> None:
    with Session(users) as session:
        session.execute(text("INSERT INTO test_users (email) VALUES ('ada@example.com')"))
        session.add(enqueue("SendWelcomeEmail", 1))
        session.flush()
        session.rollback()
    assert counts(users) == (0, 0)


def test_core_insert_joins_the_connections_transaction(users: Engine) -> None:
    with users.connect() as connection:
        job_id = insert_job(connection, "SendEmail", 1, queue="mail", priority=5)
        assert isinstance(job_id, int)
        connection.rollback()
    assert counts(users) == (0, 0)
    with users.begin() as connection:
        job_id = insert_job(connection, "SendEmail", 1, queue="mail", priority=5)
    with users.connect() as connection:
        (row,) = rows(connection)
    assert (row["job_id"], row["queue"], row["priority"], row["args"]) == (job_id, "mail", 5, "[1]")


def test_core_insert_accepts_a_session(session: Session) -> None:
    job_id = insert_job(session, "SendEmail", "x")
    assert rows(session)[0]["job_id"] == job_id


def test_bulk_insert_writes_every_job_with_defaults_per_field(connection: Connection) -> None:
    run_at = datetime.datetime(2040, 1, 1, tzinfo=UTC)
    jobs = [enqueue("Bulk", index) for index in range(500)]
    jobs.append(enqueue("Bulk", "special", queue="other", priority=0, run_at=run_at))
    assert insert_jobs(connection, jobs) == 501
    now = connection.execute(select(func.now())).scalar_one()
    stored = rows(connection)
    assert len(stored) == 501
    plain = [row for row in stored if row["queue"] == ""]
    assert [row["args"] for row in plain] == [f"[{index}]" for index in range(500)]
    assert {(row["priority"], row["run_at"]) for row in plain} == {(100, now)}
    (special,) = [row for row in stored if row["queue"] == "other"]
    assert (special["priority"], special["run_at"], special["args"]) == (0, run_at, '["special"]')


def test_bulk_insert_is_rolled_back_with_the_caller(users: Engine) -> None:
    with users.connect() as connection:
        insert_jobs(connection, [enqueue("Bulk", index) for index in range(10)])
        connection.rollback()
    assert counts(users) == (0, 0)
    with users.connect() as connection:
        insert_jobs(connection, [enqueue("Bulk", index) for index in range(10)])
        connection.commit()
    assert counts(users) == (0, 10)


def test_bulk_insert_through_a_session_commits_with_it(users: Engine) -> None:
    with Session(users) as session:
        session.execute(text("INSERT INTO test_users (email) VALUES ('a@example.com')"))
        assert insert_jobs(session, (enqueue("Bulk", index) for index in range(3))) == 3
        session.commit()
    assert counts(users) == (1, 3)


def test_bulk_insert_of_nothing_sends_nothing(connection: Connection) -> None:
    assert insert_jobs(connection, []) == 0
    assert rows(connection) == []


def test_bulk_insert_with_one_bad_job_writes_none(connection: Connection) -> None:
    good = enqueue("Bulk", 1)
    bad = QueJob(job_class="Bulk", args=[math.nan])
    with pytest.raises(InvalidJobError, match=r"jobs\[1\]: args\[0\] is nan"):
        insert_jobs(connection, [good, bad])
    with pytest.raises(InvalidJobError, match=r"jobs\[0\] is 'Bulk'"):
        insert_jobs(connection, ["Bulk"])  # type: ignore[list-item]
    assert rows(connection) == []


class NotJSON:
    def __repr__(self) -> str:
        return "<NotJSON>"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: enqueue(""), r"job_class must be a non-empty str naming the job, got ''"),
        (lambda: enqueue(42), r"job_class must be a str or a JobDefinition, got 42 of type int"),  # type: ignore[arg-type]
        (lambda: enqueue(None), r"job_class must be a str or a JobDefinition, got None"),  # type: ignore[arg-type]
        (lambda: enqueue("A\x00B"), r"job_class 'A\\x00B' contains a NUL character"),
        (lambda: enqueue("Job", NotJSON()), r"args\[0\] is <NotJSON> of type NotJSON"),
        (
            lambda: enqueue("Job", 1, {"when": datetime.date(2020, 1, 2)}),
            r"args\[1\]\['when'\] is datetime.date\(2020, 1, 2\) of type date",
        ),
        (lambda: enqueue("Job", {1: "a"}), r"args\[0\] has the key 1 of type int"),
        (lambda: enqueue("Job", math.nan), r"args\[0\] is nan; NaN and Infinity"),
        (lambda: enqueue("Job", [1, math.inf]), r"args\[0\]\[1\] is inf"),
        (lambda: enqueue("Job", -math.inf), r"args\[0\] is -inf"),
        (lambda: enqueue("Job", b"bytes"), r"args\[0\] is b'bytes' of type bytes"),
        (lambda: enqueue("Job", "\ud800"), r"args\[0\] is '\\ud800', which is not valid UTF-8"),
        (lambda: enqueue("Job", priority=32768), r"priority 32768 is outside the smallint range"),
        (lambda: enqueue("Job", priority=-32769), r"priority -32769 is outside the smallint"),
        (lambda: enqueue("Job", priority="1"), r"priority must be an int, got '1' of type str"),  # type: ignore[arg-type]
        (lambda: enqueue("Job", priority=True), r"priority must be an int, got True of type bool"),
        (lambda: enqueue("Job", priority=1.5), r"priority must be an int, got 1.5 of type float"),  # type: ignore[arg-type]
        (
            lambda: enqueue("Job", run_at=datetime.datetime(2030, 1, 1)),
            r"run_at 2030-01-01T00:00:00 has no time zone",
        ),
        (lambda: enqueue("Job", run_at="2030-01-01"), r"run_at must be a timezone-aware datetime"),  # type: ignore[arg-type]
        (lambda: enqueue("Job", queue=5), r"queue must be a str, got 5 of type int"),  # type: ignore[arg-type]
        (lambda: enqueue("Job", queue=b"q"), r"queue must be a str, got b'q' of type bytes"),  # type: ignore[arg-type]
    ],
)
def test_bad_input_is_refused_naming_the_value(call: Any, message: str) -> None:
    with pytest.raises(InvalidJobError, match=message):
        call()


def test_invalid_job_error_is_a_value_error_and_a_que_error() -> None:
    with pytest.raises(ValueError, match="priority"):
        enqueue("Job", priority=10**6)
    assert issubclass(InvalidJobError, que.QueError)


def test_a_refused_enqueue_leaves_the_session_as_it_was(session: Session) -> None:
    session.add(enqueue("Kept", 1))
    with pytest.raises(InvalidJobError):
        session.add(enqueue("Refused", math.nan))
    with pytest.raises(InvalidJobError):
        insert_job(session, "Refused", priority=99999)
    session.commit()
    assert [row["job_class"] for row in rows(session)] == ["Kept"]


def test_core_insert_refuses_before_sending(connection: Connection) -> None:
    with pytest.raises(InvalidJobError, match="run_at"):
        insert_job(connection, "Job", run_at=datetime.datetime(2030, 1, 1))
    # The transaction is still usable: nothing was sent, so nothing failed on the server.
    insert_job(connection, "Job")
    assert len(rows(connection)) == 1


def test_direct_model_construction_is_checked_at_flush(session: Session) -> None:
    session.add(QueJob(job_class="Direct", args=[{"x": math.inf}]))
    with pytest.raises(Exception, match=r"args\[0\]\['x'\] is inf"):
        session.flush()
    session.rollback()


def test_tuples_are_stored_as_arrays(session: Session) -> None:
    session.add(enqueue("Job", (1, 2), [3, (4,)]))
    session.flush()
    assert rows(session)[0]["args"] == "[[1,2],[3,[4]]]"


def test_json_dump_matches_the_stored_text_exactly(session: Session) -> None:
    args: list[Any] = [0.1, 1e300, -0.0, 2**70, '\x00\n\t"\\', {"": None}]
    session.add(enqueue("Exact", *args))
    session.flush()
    stored = rows(session)[0]["args"]
    assert stored == json.dumps(args, separators=(",", ":"), ensure_ascii=False)
    assert json.loads(stored) == args


def test_insert_many_writes_one_job_per_argument_list(connection: Connection) -> None:
    run_at = datetime.datetime(2035, 1, 1, tzinfo=UTC)
    count = insert_many(
        connection,
        "Reindex",
        ([page, {"lang": "é"}] for page in range(300)),
        queue="idx",
        priority=5,
        run_at=run_at,
    )
    assert count == 300
    stored = rows(connection)
    assert [row["args"] for row in stored] == [f'[{page},{{"lang":"é"}}]' for page in range(300)]
    assert {(r["job_class"], r["queue"], r["priority"], r["run_at"]) for r in stored} == {
        ("Reindex", "idx", 5, run_at)
    }


def test_insert_many_takes_the_database_defaults(connection: Connection) -> None:
    assert insert_many(connection, "Plain", [[], [1]]) == 2
    now = connection.execute(select(func.now())).scalar_one()
    assert [(r["queue"], r["priority"], r["run_at"], r["args"]) for r in rows(connection)] == [
        ("", 100, now, "[]"),
        ("", 100, now, "[1]"),
    ]


def test_insert_many_refuses_a_bad_argument_list_before_sending(connection: Connection) -> None:
    with pytest.raises(InvalidJobError, match=r"arguments\[2\]: args\[0\] is nan"):
        insert_many(connection, "Bad", [[1], [2], [math.nan]])
    with pytest.raises(InvalidJobError, match="priority 99999 is outside"):
        insert_many(connection, "Bad", [[1]], priority=99999)
    with pytest.raises(InvalidJobError, match="args must be a list"):
        insert_many(connection, "Bad", ["not a list"])
    assert insert_many(connection, "Nothing", []) == 0
    assert rows(connection) == []


def _runtime_imports(module: ast.Module) -> Iterator[str]:
    """The modules a module imports when it runs (``if TYPE_CHECKING:`` blocks left out)."""
    for node in ast.walk(module):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            node.body = []  # annotations only
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_enqueue_does_not_import_jobs_which_imports_it() -> None:
    """The field checks both need live in a module of their own, so the dependency runs one
    way: jobs imports enqueue, never the reverse (not even lazily, inside a function)."""
    package = Path(que.__file__).parent
    enqueue_imports = set(_runtime_imports(ast.parse((package / "_enqueue.py").read_text())))
    jobs_imports = set(_runtime_imports(ast.parse((package / "_jobs.py").read_text())))
    assert "._enqueue" in jobs_imports
    assert not enqueue_imports & {"._jobs", "sqlalchemy_que._jobs"}, enqueue_imports
    assert "._checks" in enqueue_imports & jobs_imports


# Refusals that must leave the caller's transaction intact -----------------------------------


def _self_containing_list() -> list[Any]:
    loop: list[Any] = [1]
    loop.append(loop)
    return loop


def _self_containing_dict() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["again"] = loop
    return loop


#: (job_class, args, queue, message): values the driver or server used to fail on, mid-COPY
#: or mid-flush, after the caller's transaction had been written to.
DRIVER_FAILURES: dict[str, tuple[str, list[Any], str | None, str]] = {
    "surrogate in a dict key": (
        "Job",
        [1, {"ok": 1, "bad\ud800": 2}],
        None,
        r"args\[1\] has the key 'bad\\ud800', which is not valid UTF-8 text \(lone surrogate\)",
    ),
    "surrogate in a nested key": (
        "Job",
        [[{"\udfff": None}]],
        None,
        r"args\[0\]\[0\] has the key '\\udfff', which is not valid UTF-8",
    ),
    "queue too long for the index": (
        "Job",
        [1],
        "q" * 3000,
        r"queue 'q{40}'\.\.\. is 3000 characters long; at most 500 are allowed",
    ),
    "job_class too long": (
        "J" * 501,
        [1],
        None,
        r"job_class 'J{40}'\.\.\. is 501 characters long; at most 500 are allowed",
    ),
    "self-containing list": (
        "Job",
        ["a", _self_containing_list()],
        None,
        r"args\[1\]\[1\] is args\[1\] itself \(a reference cycle\), which JSON cannot hold",
    ),
    "self-containing dict": (
        "Job",
        [_self_containing_dict()],
        None,
        r"args\[0\]\['again'\] is args\[0\] itself \(a reference cycle\)",
    ),
    "int too long to write": (
        "Job",
        [1, 10**5000],
        None,
        r"args\[1\] is an int of more than 4300 digits, which Python does not convert to text",
    ),
}

ENQUEUE_FORMS = ["enqueue", "insert_job", "insert_jobs", "insert_many"]


def enqueue_in(session: Session, form: str, job_class: str, args: list[Any], **fields: Any) -> None:
    """Enqueue one job in ``session`` by one of the four forms (the COPY forms with a good job
    before the bad one)."""
    if form == "enqueue":
        session.add(enqueue(job_class, *args, **fields))
    elif form == "insert_job":
        insert_job(session, job_class, *args, **fields)
    elif form == "insert_jobs":
        # Built directly, so that insert_jobs' own checks are tested; a QueJob has no run_in.
        job = (
            enqueue(job_class, *args, **fields)
            if "run_in" in fields
            else QueJob(job_class=job_class, args=args, **fields)
        )
        insert_jobs(session, [enqueue("Fine", 0), job])
    else:
        insert_many(session, job_class, [[0], args], **fields)


def committed_job_classes(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(
            connection.execute(text("SELECT job_class FROM que_jobs ORDER BY job_id")).scalars()
        )


@pytest.mark.parametrize("form", ENQUEUE_FORMS)
@pytest.mark.parametrize("case", list(DRIVER_FAILURES))
def test_values_the_driver_would_fail_on_are_refused_keeping_the_transaction(
    engine: Engine, form: str, case: str
) -> None:
    job_class, args, queue, message = DRIVER_FAILURES[case]
    with Session(engine) as session:
        insert_job(session, "SentBefore")  # already written in the transaction
        session.add(enqueue("PendingBefore"))  # waiting for the next flush
        with pytest.raises(InvalidJobError, match=message):
            enqueue_in(session, form, job_class, args, queue=queue)
        session.add(enqueue("AddedAfter"))
        session.commit()
    assert sorted(committed_job_classes(engine)) == ["AddedAfter", "PendingBefore", "SentBefore"]


def test_the_longest_queue_and_job_class_are_stored_even_in_four_byte_characters(
    connection: Connection,
) -> None:
    longest = "𝄞" * 500  # 2,000 bytes of UTF-8: still fits the primary key's index
    insert_job(connection, longest, queue=longest)
    insert_jobs(connection, [enqueue(longest, queue=longest)])
    insert_many(connection, longest, [[1]], queue=longest)
    stored = connection.execute(text("SELECT job_class, queue FROM que_jobs")).all()
    assert [tuple(row) for row in stored] == [(longest, longest)] * 3


def nested_args(levels: int, *, inner: Any = None) -> list[Any]:
    """Arguments whose JSON array nests ``levels`` deep, the args array being level 1, with
    ``inner`` at the bottom (lists, with a dict on every other level)."""
    value: Any = [] if inner is None else [inner]
    for level in range(levels - 2):
        value = {"level": value} if level % 2 else [value]
    return ["first", value]


def test_arguments_nested_100_levels_are_stored_as_given(connection: Connection) -> None:
    args = nested_args(100, inner=1)
    expected = json.dumps(args, separators=(",", ":"))
    assert expected.count("[") + expected.count("{") == 100
    insert_job(connection, "Deep", *args)
    insert_jobs(connection, [enqueue("Deep", *args)])
    insert_many(connection, "Deep", [args])
    stored = connection.execute(text("SELECT args::text FROM que_jobs")).scalars().all()
    assert stored == [expected] * 3


@pytest.mark.parametrize("form", ENQUEUE_FORMS)
@pytest.mark.parametrize("levels", [101, 150, 5000])
def test_arguments_nested_deeper_than_ruby_reads_are_refused(
    engine: Engine, form: str, levels: int
) -> None:
    """Ruby Que 0.14.3 parses args with JSON.parse (max_nesting 100) in its lock step, and a
    job it cannot parse stays locked by the Ruby worker for good."""
    message = (
        r"args\[1\] nests lists and dicts more than 100 levels deep \(the args array being "
        r"level 1\), which Ruby Que cannot read"
    )
    with Session(engine) as session:
        session.add(enqueue("PendingBefore"))
        with pytest.raises(InvalidJobError, match=message):
            enqueue_in(session, form, "Deep", nested_args(levels))
        session.commit()
    assert committed_job_classes(engine) == ["PendingBefore"]


# run_at: only what every client can read back ------------------------------------------------


def at(offset_hours: float) -> datetime.timezone:
    return datetime.timezone(datetime.timedelta(hours=offset_hours))


UNREADABLE_RUN_AT = {
    "datetime.min east of UTC": datetime.datetime.min.replace(tzinfo=at(3)),
    "datetime.min in UTC": datetime.datetime.min.replace(tzinfo=UTC),
    "datetime.max west of UTC": datetime.datetime.max.replace(tzinfo=at(-5)),
    "datetime.max in UTC": datetime.datetime.max.replace(tzinfo=UTC),
    "just before 1900 UTC": datetime.datetime(1900, 1, 1, 0, 59, 59, 999999, tzinfo=at(1)),
    "just after 9000 UTC": datetime.datetime(8999, 12, 31, 19, 0, 0, 1, tzinfo=at(-5)),
}


@pytest.mark.parametrize("form", ENQUEUE_FORMS)
@pytest.mark.parametrize("case", list(UNREADABLE_RUN_AT))
def test_a_run_at_out_of_the_readable_range_is_refused(
    engine: Engine, form: str, case: str
) -> None:
    """Such a row is first in line, and its run_at cannot be decoded into a datetime in some
    session time zone: the lock query would fail on it every time, stalling the queue."""
    run_at = UNREADABLE_RUN_AT[case]
    message = rf"run_at {re.escape(run_at.isoformat())} is outside 1900-01-01 \.\. 9000-01-01 UTC"
    with Session(engine) as session:
        session.add(enqueue("PendingBefore"))
        with pytest.raises(InvalidJobError, match=message):
            enqueue_in(session, form, "Job", [1], run_at=run_at)
        session.commit()
    assert committed_job_classes(engine) == ["PendingBefore"]


@pytest.mark.parametrize(
    "time_zone", ["UTC", "Etc/GMT+12", "Pacific/Kiritimati", "America/New_York", "-15:59"]
)
def test_the_ends_of_the_range_are_stored_and_read_back_in_any_time_zone(
    connection: Connection, time_zone: str
) -> None:
    earliest = datetime.datetime(1899, 12, 31, 14, tzinfo=at(-10))  # 1900-01-01T00:00Z
    latest = datetime.datetime(9000, 1, 1, 14, tzinfo=at(14))  # 9000-01-01T00:00Z
    insert_job(connection, "Earliest", run_at=earliest)
    insert_many(connection, "Latest", [[1]], run_at=latest)
    connection.execute(text("SELECT set_config('TimeZone', :zone, true)"), {"zone": time_zone})
    assert [(row["job_class"], row["run_at"]) for row in rows(connection)] == [
        ("Earliest", earliest),
        ("Latest", latest),
    ]


# run_in: a delay after the database's now() ------------------------------------------------


def database_now(bind: Connection | Session) -> datetime.datetime:
    now: datetime.datetime = bind.execute(select(func.now())).scalar_one()
    return now


@pytest.mark.parametrize("form", ENQUEUE_FORMS)
@pytest.mark.parametrize(
    "run_in",
    [
        datetime.timedelta(minutes=5, microseconds=7),
        datetime.timedelta(days=2, hours=3),  # whole days: elapsed, not calendar days
        90,
        0.25,
        0,
        datetime.timedelta(0),
    ],
)
def test_run_in_is_a_delay_after_the_databases_now(
    session: Session, form: str, run_in: datetime.timedelta | float
) -> None:
    # A session time zone whose daylight saving time starts tomorrow: its calendar's next two
    # days last 47 hours, and run_in is elapsed time, as a timedelta is.
    today = text("SELECT extract(doy FROM now() AT TIME ZONE 'UTC')::int")
    start = (
        session.execute(today).scalar_one() % 365
    )  # POSIX rules count days from 0: this is tomorrow
    zone = f"XST0XDT,{start}/0,{(start + 100) % 365}/0"
    session.execute(text("SELECT set_config('TimeZone', :zone, true)"), {"zone": zone})
    assert session.execute(text("SELECT now() + interval '2 days' - now()")).scalar() != (
        datetime.timedelta(days=2)
    )
    enqueue_in(session, form, "Later", [1], run_in=run_in)
    session.flush()
    delay = run_in if isinstance(run_in, datetime.timedelta) else datetime.timedelta(seconds=run_in)
    expected = database_now(session) + delay  # now(): the start of the caller's transaction
    assert {row["run_at"] for row in rows(session) if row["job_class"] == "Later"} == {expected}
    elapsed = session.execute(
        text("SELECT extract(epoch FROM run_at) - extract(epoch FROM now()) FROM que_jobs")
    ).scalars()
    assert delay.total_seconds() in {float(seconds) for seconds in elapsed}


def test_run_in_with_the_orm_fills_in_run_at_at_flush(session: Session) -> None:
    job = enqueue("Later", run_in=datetime.timedelta(hours=1))
    session.add(job)
    session.flush()
    assert job.run_at == database_now(session) + datetime.timedelta(hours=1)
    assert isinstance(job.job_id, int)


def test_run_in_mixes_with_other_jobs_in_one_bulk_insert(connection: Connection) -> None:
    run_at = datetime.datetime(2040, 1, 1, tzinfo=UTC)
    jobs = [
        enqueue("Now", 1),
        enqueue("Soon", 2, run_in=30),
        enqueue("Fixed", 3, run_at=run_at),
        enqueue("Sooner", 4, run_in=datetime.timedelta(seconds=10), queue="other"),
    ]
    assert insert_jobs(connection, jobs) == 4
    now = database_now(connection)
    assert [(row["job_class"], row["queue"], row["run_at"]) for row in rows(connection)] == [
        ("Now", "", now),
        ("Soon", "", now + datetime.timedelta(seconds=30)),
        ("Fixed", "", run_at),
        ("Sooner", "other", now + datetime.timedelta(seconds=10)),
    ]


@pytest.mark.parametrize(
    ("run_in", "message"),
    [
        (-1, r"run_in must not be negative, got -1"),
        (-0.5, r"run_in must not be negative, got -0.5"),
        (
            datetime.timedelta(microseconds=-1),
            r"run_in must not be negative, got datetime.timedelta\(days=-1, seconds=86399, "
            r"microseconds=999999\)",
        ),
        (math.nan, r"run_in must be a finite number of seconds, got nan"),
        (math.inf, r"run_in must be a finite number of seconds, got inf"),
        (-math.inf, r"run_in must be a finite number of seconds, got -inf"),
        (True, r"run_in must be a datetime.timedelta or a number of seconds, got True of type"),
        ("60", r"run_in must be a datetime.timedelta or a number of seconds, got '60' of type"),
        (10**20, r"run_in 100000000000000000000 is longer than 36525 days \(100 years\)"),
        (
            datetime.timedelta(days=36526),
            r"run_in datetime.timedelta\(days=36526\) is longer than 36525 days",
        ),
    ],
)
@pytest.mark.parametrize("form", ENQUEUE_FORMS)
def test_a_bad_run_in_is_refused_naming_it(
    engine: Engine, form: str, run_in: Any, message: str
) -> None:
    with Session(engine) as session:
        session.add(enqueue("PendingBefore"))
        with pytest.raises(InvalidJobError, match=message):
            enqueue_in(session, form, "Job", [1], run_in=run_in)
        session.commit()
    assert committed_job_classes(engine) == ["PendingBefore"]


@pytest.mark.parametrize("form", ENQUEUE_FORMS)
def test_run_at_and_run_in_together_are_refused(session: Session, form: str) -> None:
    run_at = datetime.datetime(2040, 1, 1, tzinfo=UTC)
    message = (
        r"give run_at or run_in, not both \(got run_at=datetime.datetime\(2040, 1, 1, 0, 0, "
        r"tzinfo=datetime.timezone.utc\) and run_in=60\)"
    )
    with pytest.raises(InvalidJobError, match=message):
        enqueue_in(session, form, "Job", [1], run_at=run_at, run_in=60)
    assert rows(session) == []


@pytest.fixture
def wakeups(database_url: str, engine: Engine) -> Iterator[Any]:
    """A raw connection listening for the default queue's wake-ups."""
    listener = psycopg.connect(
        make_url(database_url).set(drivername="postgresql").render_as_string(False),
        autocommit=True,
    )
    listener.execute(f'LISTEN "{channel_for("")}"')

    def next_due() -> float | None:
        for notification in listener.notifies(timeout=10, stop_after=1):
            return parse_payload(notification.payload)
        pytest.fail("no wake-up notification within 10 s")

    yield next_due
    listener.close()


@pytest.mark.parametrize("form", ENQUEUE_FORMS)
def test_the_wake_up_of_a_delayed_job_says_when_it_is_due(
    engine: Engine, wakeups: Any, form: str
) -> None:
    before = time.time()
    with Session(engine) as session:
        if form == "insert_jobs":  # alone: not beside a job due now, as enqueue_in puts it
            insert_jobs(session, [enqueue("Later", run_in=datetime.timedelta(minutes=10))])
        else:
            enqueue_in(session, form, "Later", [1], run_in=datetime.timedelta(minutes=10))
        session.commit()
    due = wakeups()
    assert due is not None
    assert before + 590 < due < time.time() + 610  # the database's clock, seen from here
