"""Property tests: whatever plain JSON arguments, names and queues are enqueued come back
exactly, through the ORM, Core and bulk (COPY) forms, on a real PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from sqlalchemy_que import (
    InvalidJobError,
    JobContext,
    QueJob,
    enqueue,
    insert_job,
    insert_jobs,
    insert_many,
    job,
)

EXAMPLES = settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**256), max_value=2**256)  # well past 64 bits
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
argument_lists = st.lists(json_values, max_size=5)

#: Any text PostgreSQL's ``text`` can hold (surrogates are excluded by default).
#: Lone surrogates cannot be stored as text; enqueue refuses them (tested elsewhere).
_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
_STORABLE = st.characters(exclude_characters="\x00", exclude_categories=_SURROGATES)
stored_text = st.text(alphabet=_STORABLE)

#: Any text accepted as a job_class or queue: at most 500 characters.
name_text = st.text(alphabet=_STORABLE, max_size=500)

#: Text that cannot be encoded as UTF-8: it holds a lone surrogate.
broken_text = st.builds(
    lambda before, surrogate, after: before + surrogate + after,
    stored_text,
    st.integers(min_value=0xD800, max_value=0xDFFF).map(chr),
    stored_text,
)

out_of_range = st.integers(max_value=-32769) | st.integers(min_value=32768)


def handler(job: JobContext) -> None:
    pass


@contextlib.contextmanager
def rolled_back(bind: Connection | Session) -> Iterator[None]:
    """Run one example inside a savepoint of the test's transaction, then roll it back."""
    savepoint = bind.begin_nested()
    try:
        yield
    finally:
        savepoint.rollback()


def compact(args: list[Any]) -> str:
    return json.dumps(args, separators=(",", ":"), ensure_ascii=False)


def stored_args(bind: Connection | Session, job_id: int) -> str:
    value: str = bind.execute(
        text("SELECT args::text FROM que_jobs WHERE job_id = :job_id"), {"job_id": job_id}
    ).scalar_one()
    return value


def assert_round_trip(stored: str, args: list[Any]) -> None:
    assert stored == compact(args)
    assert json.loads(stored) == args


@EXAMPLES
@given(args=argument_lists)
def test_orm_enqueue_stores_any_json_arguments_exactly(session: Session, args: list[Any]) -> None:
    with rolled_back(session):
        job = enqueue("RoundTrip", *args)
        session.add(job)
        session.flush()
        assert_round_trip(stored_args(session, job.job_id), args)


@EXAMPLES
@given(args=argument_lists)
def test_core_insert_stores_any_json_arguments_exactly(
    connection: Connection, args: list[Any]
) -> None:
    with rolled_back(connection):
        job_id = insert_job(connection, "RoundTrip", *args)
        assert_round_trip(stored_args(connection, job_id), args)


@EXAMPLES
@given(jobs=st.lists(argument_lists, min_size=1, max_size=4))
def test_bulk_insert_stores_any_json_arguments_exactly(
    connection: Connection, jobs: list[list[Any]]
) -> None:
    with rolled_back(connection):
        assert insert_jobs(connection, [enqueue("RoundTrip", *args) for args in jobs]) == len(jobs)
        stored = (
            connection.execute(text("SELECT args::text FROM que_jobs ORDER BY job_id"))
            .scalars()
            .all()
        )
        assert len(stored) == len(jobs)
        for text_, args in zip(stored, jobs, strict=True):
            assert_round_trip(text_, args)


@EXAMPLES
@given(job_class=name_text.filter(bool), queue=name_text)
def test_job_class_and_queue_text_round_trips_exactly(
    connection: Connection, job_class: str, queue: str
) -> None:
    with rolled_back(connection):
        with Session(bind=connection, join_transaction_mode="create_savepoint") as session:
            session.add(enqueue(job_class, queue=queue))
            session.commit()  # releases the Session's own savepoint, keeping the row
        insert_job(connection, job_class, queue=queue)
        insert_jobs(connection, [enqueue(job_class, queue=queue)])
        stored = connection.execute(
            text("SELECT job_class, queue FROM que_jobs ORDER BY job_id")
        ).all()
        assert [tuple(row) for row in stored] == [(job_class, queue)] * 3


@EXAMPLES
@given(value=broken_text, field=st.sampled_from(["job_class", "queue"]))
def test_text_with_a_lone_surrogate_is_refused_before_anything_is_sent(
    connection: Connection, value: str, field: str
) -> None:
    message = rf"{field} {re.escape(repr(value))} is not valid UTF-8 text \(lone surrogate\)"
    fields = {"job_class": "Job", "queue": "q", field: value}
    with pytest.raises(InvalidJobError, match=message):
        enqueue(fields["job_class"], queue=fields["queue"])
    with pytest.raises(InvalidJobError, match=message):
        insert_job(connection, fields["job_class"], queue=fields["queue"])
    built_directly = QueJob(job_class=fields["job_class"], queue=fields["queue"], args=[])
    with pytest.raises(InvalidJobError, match=rf"jobs\[1\]: {message}"):
        insert_jobs(connection, [enqueue("Good"), built_directly])
    # Nothing reached the server: the transaction is still usable and the table empty.
    assert connection.execute(text("SELECT count(*) FROM que_jobs")).scalar_one() == 0


@EXAMPLES
@given(key=broken_text, depth=st.integers(min_value=0, max_value=3), position=st.integers(0, 2))
def test_a_lone_surrogate_in_a_dict_key_is_refused_in_every_form(
    connection: Connection, key: str, depth: int, position: int
) -> None:
    value: Any = {key: 1}
    path = f"args[{position}]"
    for _ in range(depth):
        value = [value]
        path += "[0]"
    args = [*range(position), value]
    message = rf"{re.escape(path)} has the key {re.escape(repr(key))}, which is not valid UTF-8"
    with pytest.raises(InvalidJobError, match=message):
        enqueue("Job", *args)
    with pytest.raises(InvalidJobError, match=message):
        insert_job(connection, "Job", *args)
    with pytest.raises(InvalidJobError, match=rf"jobs\[1\]: {message}"):
        insert_jobs(connection, [enqueue("Good"), QueJob(job_class="Job", args=args)])
    with pytest.raises(InvalidJobError, match=rf"arguments\[1\]: {message}"):
        insert_many(connection, "Job", [[], args])
    # Nothing reached the server: the transaction is still usable and the table empty.
    assert connection.execute(text("SELECT count(*) FROM que_jobs")).scalar_one() == 0


@EXAMPLES
@given(value=st.text(min_size=501, max_size=3000), field=st.sampled_from(["job_class", "queue"]))
def test_a_job_class_or_queue_over_500_characters_is_refused_naming_it(
    connection: Connection, value: str, field: str
) -> None:
    message = rf"{field} {re.escape(repr(value[:40]))}\.\.\. is {len(value)} characters long"
    fields = {"job_class": "Job", "queue": "q", field: value}
    with pytest.raises(InvalidJobError, match=message):
        enqueue(fields["job_class"], queue=fields["queue"])
    with pytest.raises(InvalidJobError, match=message):
        insert_job(connection, fields["job_class"], queue=fields["queue"])
    with pytest.raises(InvalidJobError, match=message):
        insert_many(connection, fields["job_class"], [[1]], queue=fields["queue"])
    assert connection.execute(text("SELECT count(*) FROM que_jobs")).scalar_one() == 0


@EXAMPLES
@given(priority=st.integers(min_value=-32768, max_value=32767))
def test_any_smallint_priority_is_stored(connection: Connection, priority: int) -> None:
    with rolled_back(connection):
        job_id = insert_job(connection, "Prioritised", priority=priority)
        stored = connection.execute(
            text("SELECT priority FROM que_jobs WHERE job_id = :job_id"), {"job_id": job_id}
        ).scalar_one()
        assert stored == priority


@EXAMPLES
@given(priority=out_of_range)
def test_any_priority_outside_smallint_is_refused_naming_it(
    connection: Connection, priority: int
) -> None:
    message = rf"priority {priority} is outside the smallint range -32768\.\.32767"
    with pytest.raises(InvalidJobError, match=message):
        enqueue("Prioritised", priority=priority)
    with pytest.raises(InvalidJobError, match=message):
        insert_job(connection, "Prioritised", priority=priority)
    with pytest.raises(InvalidJobError, match=message):
        job("Prioritised", priority=priority)(handler)
    # Refused before anything was sent: the transaction is intact and the table empty.
    assert connection.execute(text("SELECT count(*) FROM que_jobs")).scalar_one() == 0
