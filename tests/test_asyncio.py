"""The async forms: enqueue on AsyncSession and AsyncConnection, admin reads, on a real server.

Each test drives its coroutine with ``asyncio.run`` (no plugin), on an AsyncEngine without a
pool so that no connection outlives the loop it was made on.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import subprocess
import sys
import textwrap
import types
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from sqlalchemy import Engine, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

import sqlalchemy_que.asyncio as que_async
from sqlalchemy_que import (
    FailJob,
    InvalidJobError,
    JobContext,
    JobRegistry,
    Worker,
    enqueue,
    insert_job,
    job,
)
from sqlalchemy_que._notify import channel_for

from .helpers import job_rows as _job_rows
from .helpers import notifications

T = TypeVar("T")
UTC = datetime.timezone.utc


def job_rows(engine: Engine) -> list[Any]:
    """The table's rows by job_id, attributes by column, ``args`` decoded."""
    return [
        types.SimpleNamespace(**{**row, "args": json.loads(row["args"])})
        for row in _job_rows(engine)
    ]


@job("AsyncTyped", queue="typed")
def typed_job(job: JobContext, user_id: int, template: str = "welcome") -> None:
    pass


@pytest.fixture
def async_engine(engine: Engine, database_url: str) -> Iterator[AsyncEngine]:
    """An AsyncEngine (psycopg's async driver) on the test database; ``engine`` empties the
    table first and checks no advisory lock is left after."""
    url = make_url(database_url).set(drivername="postgresql+psycopg")
    async_engine = create_async_engine(url, poolclass=NullPool)
    yield async_engine
    asyncio.run(async_engine.dispose())


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return asyncio.run(main())


@pytest.fixture
def listen(database_url: str) -> Iterator[Callable[[str], Callable[[], list[str]]]]:
    """LISTEN on a queue's channel; the returned function collects what arrived."""
    url = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    connection = psycopg.connect(url, autocommit=True)

    def on(queue: str) -> Callable[[], list[str]]:
        connection.execute(f'LISTEN "{channel_for(queue)}"')
        return lambda: notifications(connection, channel_for(queue))

    yield on
    connection.close()


def test_async_session_add_inserts_with_one_notify_per_transaction_and_queue(
    engine: Engine, async_engine: AsyncEngine, listen: Any
) -> None:
    received = listen("mail")

    async def main() -> None:
        async with AsyncSession(async_engine) as session:
            session.add(enqueue("SendEmail", 1, queue="mail"))
            session.add(enqueue("SendEmail", 2, queue="mail"))
            await session.flush()
            session.add(enqueue("SendEmail", 3, queue="mail"))
            await session.commit()

    run(main)
    assert [row.args for row in job_rows(engine)] == [[1], [2], [3]]
    payloads = received()
    assert len(payloads) == 1
    assert json.loads(payloads[0])["queue"] == "mail"


def test_a_rolled_back_async_session_leaves_no_job_and_no_notify(
    engine: Engine, async_engine: AsyncEngine, listen: Any
) -> None:
    received = listen("")

    async def main() -> None:
        async with AsyncSession(async_engine) as session:
            session.add(enqueue("SendEmail", 1))
            await session.flush()
            job_id = await que_async.insert_job(session, "SendEmail", 2)
            assert job_id > 0
            await session.rollback()

    run(main)
    assert job_rows(engine) == []
    assert received() == []


def test_insert_job_on_an_async_connection_returns_the_id_and_commits_with_it(
    engine: Engine, async_engine: AsyncEngine, listen: Any
) -> None:
    received = listen("q")
    run_at = datetime.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)

    async def main() -> list[int]:
        async with async_engine.begin() as connection:
            first = await que_async.insert_job(connection, "A", {"k": [1]}, queue="q")
            second = await que_async.insert_job(
                connection, "B", queue="q", priority=0, run_at=run_at
            )
            return [first, second]

    ids = run(main)
    rows = job_rows(engine)
    assert [row.job_id for row in rows] == ids
    assert (rows[0].job_class, rows[0].args, rows[0].priority) == ("A", [{"k": [1]}], 100)
    assert (rows[1].job_class, rows[1].priority, rows[1].run_at) == ("B", 0, run_at)
    assert len(received()) == 1  # the second job is due later than the first: no new wake-up


def test_insert_job_on_an_async_connection_is_rolled_back_with_it(
    engine: Engine, async_engine: AsyncEngine, listen: Any
) -> None:
    received = listen("")

    async def main() -> None:
        async with async_engine.connect() as connection:
            await que_async.insert_job(connection, "A")
            await que_async.insert_many(connection, "B", [[1], [2]])
            await connection.rollback()

    run(main)
    assert job_rows(engine) == []
    assert received() == []


def test_bulk_forms_copy_on_the_async_driver(
    engine: Engine, async_engine: AsyncEngine, listen: Any
) -> None:
    received = listen("bulk")

    async def main() -> tuple[int, int]:
        async with async_engine.begin() as connection:
            many = await que_async.insert_many(
                connection, "Reindex", ([page] for page in range(3)), queue="bulk"
            )
            jobs = await que_async.insert_jobs(
                connection,
                [enqueue("One", queue="bulk"), enqueue("Two", queue="bulk", run_in=60)],
            )
            return many, jobs

    assert run(main) == (3, 2)
    rows = job_rows(engine)
    assert sorted(row.job_class for row in rows) == ["One", "Reindex", "Reindex", "Reindex", "Two"]
    assert sorted(row.args for row in rows if row.job_class == "Reindex") == [[0], [1], [2]]
    assert len(received()) == 1


def test_a_bad_job_is_refused_naming_the_value_before_anything_is_sent(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    async def main() -> None:
        async with async_engine.begin() as connection:
            await que_async.insert_job(connection, "Good")
            with pytest.raises(InvalidJobError, match="priority 40000 is outside"):
                await que_async.insert_job(connection, "Bad", priority=40000)
            with pytest.raises(InvalidJobError, match=r"jobs\[1\]"):
                await que_async.insert_jobs(connection, [enqueue("A"), "B"])  # type: ignore[list-item]
            with pytest.raises(InvalidJobError, match=r"arguments\[1\]"):
                await que_async.insert_many(connection, "A", [[1], [object()]])
            # The transaction is still usable: nothing was sent for the refused jobs.
            await que_async.insert_job(connection, "AlsoGood")

    run(main)
    assert [row.job_class for row in job_rows(engine)] == ["Good", "AlsoGood"]


def test_a_sync_bind_is_refused_with_the_sync_functions_name(engine: Engine) -> None:
    async def main() -> None:
        with (
            engine.connect() as connection,
            pytest.raises(InvalidJobError, match=r"use sqlalchemy_que.insert_job\(\)"),
        ):
            await que_async.insert_job(connection, "A")  # type: ignore[arg-type]

    run(main)


def test_a_definitions_insert_async_binds_its_arguments_and_defaults(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    async def main() -> int:
        async with AsyncSession(async_engine) as session:
            job_id = await typed_job.insert_async(session, 42, template="reset")
            with pytest.raises(InvalidJobError, match="do not fit"):
                await typed_job.insert_async(session, 1, 2, 3)  # type: ignore[call-arg, arg-type]
            await session.commit()
            return job_id

    job_id = run(main)
    [row] = job_rows(engine)
    assert (row.job_id, row.job_class, row.queue, row.args) == (
        job_id,
        "AsyncTyped",
        "typed",
        [42, "reset"],
    )


def test_admin_reads_and_clear_are_awaitable(engine: Engine, async_engine: AsyncEngine) -> None:
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO que_jobs (job_class, queue) VALUES ('A', 'x')"))
        connection.execute(text("INSERT INTO que_jobs (job_class, queue) VALUES ('A', 'x')"))
        job_id = connection.execute(
            text("INSERT INTO que_jobs (job_class) VALUES ('B') RETURNING job_id")
        ).scalar_one()

    async def main() -> tuple[Any, ...]:
        async with async_engine.connect() as holder:
            await holder.execute(text("SELECT pg_advisory_lock(:id)"), {"id": job_id})
            stats = await que_async.job_stats(async_engine)
            states = await que_async.worker_states(async_engine)
            await holder.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": job_id})
        async with async_engine.connect() as connection:
            in_rolled_back = await que_async.clear(connection)
            await connection.rollback()
        cleared = await que_async.clear(async_engine)
        return stats, states, in_rolled_back, cleared

    stats, states, in_rolled_back, cleared = run(main)
    assert [(s.queue, s.job_class, s.count, s.count_working) for s in stats] == [
        ("x", "A", 2, 0),
        ("", "B", 1, 1),
    ]
    assert [s.job_id for s in states] == [job_id]
    assert (in_rolled_back, cleared) == (3, 3)
    assert job_rows(engine) == []


def test_the_sync_api_never_loads_the_async_module() -> None:
    code = (
        "import sys, sqlalchemy_que, sqlalchemy_que._jobs, sqlalchemy_que._enqueue;"
        "print('sqlalchemy_que.asyncio' in sys.modules, 'sqlalchemy.ext.asyncio' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_type_checkers_see_the_async_insert_arguments(tmp_path: Path) -> None:
    header = textwrap.dedent(
        """
        from sqlalchemy.ext.asyncio import AsyncConnection

        from sqlalchemy_que import JobContext, job


        @job("SendEmail", queue="mail")
        def send_email(job: JobContext, user_id: int, template: str = "welcome") -> None:
            pass


        async def use(connection: AsyncConnection) -> None:
        """
    )
    (tmp_path / "good.py").write_text(
        header + "    job_id: int = await send_email.insert_async(connection, 42, template='x')\n"
    )
    (tmp_path / "bad.py").write_text(
        header + "    await send_email.insert_async(connection, 'not-an-int')\n"
    )
    result = subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--strict", "--no-error-summary"),
            *("--show-error-codes", "--cache-dir", str(tmp_path / ".mypy_cache")),
            *("good.py", "bad.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert [line for line in lines if line.startswith("bad.py")] and all(
        line.startswith("bad.py") for line in lines
    ), result.stdout + result.stderr
    [error] = lines
    assert '"str"' in error and '"int"' in error and error.endswith("[arg-type]"), error


def test_a_rolled_back_savepoint_of_an_async_session_does_not_silence_later_wakeups(
    engine: Engine, async_engine: AsyncEngine, listen: Any
) -> None:
    received = listen("")

    async def main() -> None:
        async with AsyncSession(async_engine) as session:
            savepoint = await session.begin_nested()
            session.add(enqueue("Dropped"))
            await session.flush()
            await savepoint.rollback()  # takes its job and its wake-up with it
            session.add(enqueue("Kept"))
            await session.commit()

    run(main)
    assert [row.job_class for row in job_rows(engine)] == ["Kept"]
    assert len(received()) == 1


def test_failed_job_operations_are_awaitable(engine: Engine, async_engine: AsyncEngine) -> None:
    registry = JobRegistry()

    @registry.job("Doomed")
    def doomed(job: JobContext) -> None:
        raise FailJob("no such card")

    with engine.begin() as connection:
        failing = insert_job(connection, "Doomed")
        waiting = insert_job(connection, "Waiting", queue="later", run_in=3600)
        held = insert_job(connection, "Held")
    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:id)"), {"id": held})
        assert Worker(engine, registry).work_one()  # Held is skipped: Doomed is failed
        with pytest.raises(TypeError, match=r"sqlalchemy_que\.admin\.retry\(\)"):
            run(lambda: que_async.retry(engine, [failing]))  # type: ignore[arg-type]

        async def main() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            seen["failed"] = await que_async.list_jobs(async_engine, failed=True)
            seen["job"] = await que_async.get_job(async_engine, failing)
            seen["counts"] = await que_async.counts(async_engine)
            seen["delete_held"] = await que_async.delete(async_engine, [held])
            async with async_engine.connect() as connection:  # rolled back: nothing cleared
                seen["cleared_then_rolled_back"] = await que_async.clear_jobs(
                    connection, queue="later"
                )
                await connection.rollback()
            seen["retry"] = await que_async.retry(async_engine, [failing])
            seen["cancel"] = await que_async.cancel(async_engine, waiting)
            seen["purged"] = await que_async.purge_failed(async_engine, older_than=0)
            return seen

        seen = run(main)
        holder.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": held})
        holder.commit()

    assert [(info.job_id, info.reason) for info in seen["failed"]] == [(failing, "failed")]
    assert seen["job"].state == "failed" and "no such card" in seen["job"].last_error
    assert (seen["counts"].failed, seen["counts"].working) == (1, 1)
    assert seen["delete_held"].done == [] and list(seen["delete_held"].locked) == [held]
    assert seen["cleared_then_rolled_back"].deleted == 1
    assert seen["retry"].done == [failing]
    assert seen["cancel"] == "cancelled"
    assert seen["purged"] == 1  # the cancelled job, moved to que_failed_jobs
    assert sorted(row.job_id for row in job_rows(engine)) == sorted([failing, held])
