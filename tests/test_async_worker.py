"""The async worker (AsyncWorkerPool) on a real server: async handlers' writes commit with the
job's completion and vanish with its failure; retries, attempts, concurrency, exactly-once
between pools, cancellation by shutdown and by timeout, faults (SIGKILL, a terminated
backend), the CLI's choice of pool, and the refusal of async handlers by sync workers.

Each test drives its coroutine with ``asyncio.run`` (no plugin), on an AsyncEngine without a
pool so that no connection outlives the loop it was made on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, make_url, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from sqlalchemy_que import (
    AsyncJobContext,
    AsyncWorkerPool,
    FailJob,
    JobContext,
    JobRegistry,
    QueError,
    Worker,
    WorkerError,
    WorkerPool,
    cron,
    every,
    insert_job,
    job,
)

from .conftest import wait_for
from .helpers import add_job, held_job_locks, job_rows

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def async_engine(engine: Engine, database_url: str) -> Iterator[AsyncEngine]:
    url = make_url(database_url).set(drivername="postgresql+psycopg")
    async_engine = create_async_engine(url, poolclass=NullPool)
    yield async_engine
    asyncio.run(async_engine.dispose())


@pytest.fixture
def table(engine: Engine) -> Iterator[str]:
    """A table for handlers to write to: ``job_id`` its primary key."""
    name = f"que_async_{uuid.uuid4().hex[:10]}"
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {name} (job_id bigint PRIMARY KEY, worker text)"))
    yield name
    with engine.begin() as connection:
        connection.execute(text(f"DROP TABLE IF EXISTS {name}"))


def rows(engine: Engine, table: str) -> list[tuple[int, str]]:
    with engine.connect() as connection:
        result = connection.execute(text(f"SELECT job_id, worker FROM {table} ORDER BY job_id"))
        return [(row.job_id, row.worker) for row in result]


def failed_rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(
            connection.execute(text("SELECT job_id, error_count, reason FROM que_failed_jobs"))
        )


def crash_marks(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT job_id FROM que_job_runs")).scalars())


def run(make: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
    async def main() -> T:
        return await asyncio.wait_for(make(), timeout)

    return asyncio.run(main())


async def wait_until(condition: Callable[[], object], message: str, timeout: float = 10) -> None:
    """Poll a condition on the loop, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.01)


def burst(async_engine: AsyncEngine, registry: Any, **options: Any) -> AsyncWorkerPool:
    pool = AsyncWorkerPool(async_engine, registry, listen=False, wake_interval=0.05, **options)
    run(lambda: pool.run(burst=True))
    return pool


# -- a handler's writes and the job's outcome commit together ------------------------------


def test_an_async_handlers_write_commits_with_the_jobs_completion(
    engine: Engine, async_engine: AsyncEngine, table: str
) -> None:
    registry = JobRegistry()
    seen: list[tuple[type, type]] = []

    @registry.job("Write")
    async def write(job: AsyncJobContext, value: str) -> None:
        seen.append((type(job.session), type(job.connection)))
        await job.session.execute(
            text(f"INSERT INTO {table} VALUES (:id, :value)"), {"id": job.job_id, "value": value}
        )

    job_id = add_job(engine, "Write", "hello")
    pool = burst(async_engine, registry)
    assert pool.worked == 1 and pool.failed == 0
    assert rows(engine, table) == [(job_id, "hello")]
    assert job_rows(engine) == []
    assert crash_marks(engine) == []
    assert [(s.__name__, c.__name__) for s, c in seen] == [("AsyncSession", "AsyncConnection")]
    assert held_job_locks(engine) == []


def test_an_async_handlers_write_vanishes_with_its_failure_which_is_recorded(
    engine: Engine, async_engine: AsyncEngine, table: str
) -> None:
    registry = JobRegistry()

    @registry.job("Write", retry_delay=60)
    async def write(job: AsyncJobContext) -> None:
        await job.connection.execute(text(f"INSERT INTO {table} VALUES (:id, 'x')"), {"id": 1})
        raise RuntimeError("boom")

    job_id = add_job(engine, "Write")
    pool = burst(async_engine, registry)
    assert pool.failed == 1
    assert rows(engine, table) == []
    (row,) = job_rows(engine)
    assert row["job_id"] == job_id and row["error_count"] == 1
    assert row["last_error"].startswith("RuntimeError: boom\n")
    assert 50 < row["run_in"] <= 60
    assert crash_marks(engine) == []
    assert held_job_locks(engine) == []


def test_commit_on_the_jobs_connection_is_refused_and_fails_the_job(
    engine: Engine, async_engine: AsyncEngine, table: str
) -> None:
    registry = JobRegistry()
    errors: list[BaseException] = []

    @registry.job("Commit")
    async def commit(job: AsyncJobContext) -> None:
        await job.connection.execute(text(f"INSERT INTO {table} VALUES (1, 'x')"))
        await job.connection.commit()

    add_job(engine, "Commit")
    burst(async_engine, registry, on_error=lambda error, job: errors.append(error))
    assert isinstance(errors[0], QueError) and "commit() on job.connection" in str(errors[0])
    assert rows(engine, table) == []
    (row,) = job_rows(engine)
    assert row["error_count"] == 1


def test_the_sessions_rollback_undoes_only_the_handlers_own_changes(
    engine: Engine, async_engine: AsyncEngine, table: str
) -> None:
    registry = JobRegistry()

    @registry.job("Partial")
    async def partial(job: AsyncJobContext) -> None:
        await job.session.execute(text(f"INSERT INTO {table} VALUES (1, 'undone')"))
        await job.session.rollback()  # back to the session's savepoint
        await job.session.execute(text(f"INSERT INTO {table} VALUES (2, 'kept')"))

    add_job(engine, "Partial")
    pool = burst(async_engine, registry)
    assert pool.failed == 0
    assert rows(engine, table) == [(2, "kept")]
    assert job_rows(engine) == []


def test_a_handler_that_swallows_a_database_error_fails_the_job_with_its_work_rolled_back(
    engine: Engine, async_engine: AsyncEngine, table: str
) -> None:
    registry = JobRegistry()
    errors: list[BaseException] = []

    @registry.job("Swallow", retry_delay=60)
    async def swallow(job: AsyncJobContext) -> None:
        await job.connection.execute(text(f"INSERT INTO {table} VALUES (1, 'x')"))
        with contextlib.suppress(IntegrityError):  # the job's transaction is aborted now
            await job.connection.execute(text(f"INSERT INTO {table} VALUES (1, 'again')"))

    @registry.job("RollbackRefused", retry_delay=60)
    async def rollback_refused(job: AsyncJobContext) -> None:
        await job.connection.execute(text(f"INSERT INTO {table} VALUES (2, 'x')"))
        await job.connection.rollback()

    add_job(engine, "Swallow")
    add_job(engine, "RollbackRefused")
    burst(async_engine, registry, on_error=lambda error, job: errors.append(error))
    assert rows(engine, table) == []
    messages = sorted(str(error) for error in errors)
    assert "aborted by an error it caught" in messages[0], messages
    assert "rollback() on job.connection" in messages[1], messages
    assert [row["error_count"] for row in job_rows(engine)] == [1, 1]
    assert held_job_locks(engine) == []


def test_retries_until_max_attempts_then_the_job_is_failed_for_good(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    registry = JobRegistry()
    attempts: list[int] = []

    @registry.job("Flaky", retry_delay=0, max_attempts=3)
    async def flaky(job: AsyncJobContext) -> None:
        attempts.append(job.attempt)
        raise ValueError(f"attempt {job.attempt}")

    job_id = add_job(engine, "Flaky")
    pool = AsyncWorkerPool(async_engine, registry, listen=False, wake_interval=0.05)

    async def three_runs() -> None:
        for _ in range(3):
            await pool.run(burst=True)

    run(three_runs)
    assert attempts == [1, 2, 3]
    assert job_rows(engine) == []
    assert [(r.job_id, r.error_count, r.reason) for r in failed_rows(engine)] == [
        (job_id, 3, "error")
    ]


def test_fail_job_fails_for_good_at_once(engine: Engine, async_engine: AsyncEngine) -> None:
    registry = JobRegistry()

    @registry.job("Refuse")
    async def refuse(job: AsyncJobContext) -> None:
        raise FailJob("no")

    add_job(engine, "Refuse")
    burst(async_engine, registry)
    assert [(r.error_count, r.reason) for r in failed_rows(engine)] == [(1, "failed")]


def test_a_plain_def_handler_runs_in_the_async_pool_with_a_sync_session(
    engine: Engine, async_engine: AsyncEngine, table: str
) -> None:
    registry = JobRegistry()

    @registry.job("Sync")
    def sync(job: JobContext) -> None:
        job.session.execute(text(f"INSERT INTO {table} VALUES (:id, 'sync')"), {"id": job.job_id})

    @registry.job("SyncFails", retry_delay=60)
    def sync_fails(job: JobContext) -> None:
        job.session.execute(text(f"INSERT INTO {table} VALUES (:id, 'no')"), {"id": job.job_id})
        raise RuntimeError("sync boom")

    ok = add_job(engine, "Sync")
    add_job(engine, "SyncFails")
    burst(async_engine, registry)
    assert rows(engine, table) == [(ok, "sync")]
    ((remaining),) = job_rows(engine)
    assert remaining["job_class"] == "SyncFails" and remaining["error_count"] == 1


# -- concurrency and exactly once ----------------------------------------------------------


def test_jobs_run_concurrently_up_to_concurrency(engine: Engine, async_engine: AsyncEngine) -> None:
    registry = JobRegistry()
    started: list[int] = []
    together = asyncio.Event()

    @registry.job("Wait")
    async def wait(job: AsyncJobContext) -> None:
        started.append(job.job_id)
        if len(started) == 5:
            together.set()
        await asyncio.wait_for(together.wait(), 10)  # each waits for all 5 to have started

    for _ in range(5):
        add_job(engine, "Wait")
    pool = burst(async_engine, registry, concurrency=5)
    assert pool.failed == 0 and len(started) == 5
    assert job_rows(engine) == []


def test_two_pools_on_one_queue_work_every_job_exactly_once(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    registry = JobRegistry()
    runs: dict[int, int] = {}

    @registry.job("Count")
    async def count(job: AsyncJobContext) -> None:
        runs[job.job_id] = runs.get(job.job_id, 0) + 1
        await asyncio.sleep(0)  # let the other tasks run in between
        await job.connection.execute(text("SELECT 1"))

    with engine.begin() as connection:
        ids = [insert_job(connection, "Count") for _ in range(300)]
    pools = [
        AsyncWorkerPool(async_engine, registry, concurrency=4, listen=False, batch_size=5)
        for _ in range(2)
    ]

    async def both() -> None:
        await asyncio.gather(*(pool.run(burst=True) for pool in pools))

    run(both, timeout=60)
    assert runs == {job_id: 1 for job_id in ids}
    assert sum(pool.worked for pool in pools) == 300
    assert job_rows(engine) == [] and crash_marks(engine) == []


def test_a_sync_pool_and_an_async_pool_on_one_queue_work_every_job_exactly_once(
    engine: Engine, async_engine: AsyncEngine, table: str
) -> None:
    registry = JobRegistry()

    @registry.job("Both")
    def both(job: JobContext) -> None:
        # The job_id is the table's primary key: a second run would raise and stay queued.
        job.session.execute(
            text(f"INSERT INTO {table} VALUES (:id, :by)"),
            {"id": job.job_id, "by": "async" if job.connection.dialect.is_async else "sync"},
        )

    with engine.begin() as connection:
        ids = [insert_job(connection, "Both") for _ in range(300)]
    sync_pool = WorkerPool(engine, registry, workers=3, listen=False, batch_size=5)
    async_pool = AsyncWorkerPool(async_engine, registry, concurrency=3, listen=False, batch_size=5)
    sync_pool.start(burst=True)
    try:
        run(lambda: async_pool.run(burst=True), timeout=60)
    finally:
        assert sync_pool.join(60)
    recorded = rows(engine, table)
    assert [job_id for job_id, _ in recorded] == ids
    assert job_rows(engine) == [] and sync_pool.failed == async_pool.failed == 0
    assert {by for _, by in recorded} <= {"sync", "async"}


# -- cancellation: shutdown and timeouts ---------------------------------------------------


def test_shutdown_past_its_timeout_cancels_the_job_and_releases_it_untouched(
    engine: Engine, async_engine: AsyncEngine, table: str
) -> None:
    registry = JobRegistry()
    started = asyncio.Event()

    @registry.job("Forever")
    async def forever(job: AsyncJobContext) -> None:
        await job.session.execute(text(f"INSERT INTO {table} VALUES (1, 'x')"))
        started.set()
        await asyncio.Event().wait()

    job_id = add_job(engine, "Forever")
    (before,) = job_rows(engine)

    async def main() -> list[Any]:
        pool = AsyncWorkerPool(async_engine, registry, listen=False, wake_interval=0.05)
        await pool.start()
        await asyncio.wait_for(started.wait(), 10)
        assert held_job_locks(engine) == [job_id]
        cancelled = await pool.stop(timeout=0.05)
        assert pool.failed == 0
        return cancelled

    cancelled = run(main)
    assert [job.job_id for job in cancelled] == [job_id]
    (after,) = job_rows(engine)
    assert after["error_count"] == 0 and after["last_error"] is None
    assert after["run_at"] == before["run_at"]
    assert rows(engine, table) == []
    assert crash_marks(engine) == []
    assert held_job_locks(engine) == []


def test_shutdown_lets_a_running_job_finish_within_its_timeout(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    registry = JobRegistry()
    started, proceed = asyncio.Event(), asyncio.Event()

    @registry.job("Slow")
    async def slow(job: AsyncJobContext) -> None:
        started.set()
        await proceed.wait()

    add_job(engine, "Slow")

    async def main() -> list[Any]:
        pool = AsyncWorkerPool(async_engine, registry, listen=False, wake_interval=0.05)
        await pool.start()
        await asyncio.wait_for(started.wait(), 10)
        stopping = asyncio.ensure_future(pool.stop(timeout=10))
        await asyncio.sleep(0)
        proceed.set()
        return await stopping

    assert run(main) == []
    assert job_rows(engine) == []


def test_a_timeout_cancels_the_handler_for_real_and_records_the_overrun(
    engine: Engine, async_engine: AsyncEngine, table: str
) -> None:
    registry = JobRegistry()
    finished: list[bool] = []

    @registry.job("Slow", timeout=0.2, retry_delay=60)
    async def slow(job: AsyncJobContext) -> None:
        await job.session.execute(text(f"INSERT INTO {table} VALUES (1, 'x')"))
        await asyncio.Event().wait()
        finished.append(True)

    @registry.job("SlowQuery", timeout=0.2, retry_delay=60)
    async def slow_query(job: AsyncJobContext) -> None:
        await job.connection.execute(text("SELECT pg_sleep(30)"))

    add_job(engine, "Slow")
    add_job(engine, "SlowQuery")
    started = time.monotonic()
    pool = burst(async_engine, registry)
    assert time.monotonic() - started < 10
    assert pool.failed == 2 and finished == []
    assert rows(engine, table) == []
    for row in job_rows(engine):
        assert row["error_count"] == 1
        assert row["last_error"].startswith("sqlalchemy_que.JobTimeoutError: "), row
    assert held_job_locks(engine) == [] and crash_marks(engine) == []


# -- faults --------------------------------------------------------------------------------


def test_a_terminated_backend_under_an_async_job_loses_nothing(
    engine: Engine, database_url: str, table: str
) -> None:
    url = make_url(database_url).set(drivername="postgresql+psycopg")
    registry = JobRegistry()
    calls: list[int] = []
    started, terminated = asyncio.Event(), asyncio.Event()

    @registry.job("Flaky", retry_delay=0)
    async def flaky(job: AsyncJobContext) -> None:
        calls.append(job.error_count)
        if len(calls) == 1:
            started.set()
            await asyncio.wait_for(terminated.wait(), 10)
        insert = text(f"INSERT INTO {table} VALUES (:id, 'x')")
        await job.session.execute(insert, {"id": job.job_id})

    job_id = add_job(engine, "Flaky")

    async def main() -> None:
        worker_engine = create_async_engine(url, poolclass=NullPool)
        pool = AsyncWorkerPool(worker_engine, registry, concurrency=1, wake_interval=0.05)
        await pool.start()
        try:
            await asyncio.wait_for(started.wait(), 10)
            with engine.connect() as admin:
                pid = admin.execute(
                    text("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = :id"),
                    {"id": job_id},
                ).scalar_one()
                admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            terminated.set()
            await wait_until(lambda: not job_rows(engine), "the job to be worked again", 15)
        finally:
            terminated.set()
            await pool.stop(timeout=5)
            await worker_engine.dispose()

    run(main, timeout=60)
    assert len(calls) in (2, 3)  # a second run, after (maybe) counting the lost one as a crash
    assert rows(engine, table) == [(job_id, "x")]  # the write of one run only
    assert held_job_locks(engine) == [] and crash_marks(engine) == []


def test_an_async_pool_process_killed_mid_job_leaves_the_job_intact_and_unlocked(
    engine: Engine, async_engine: AsyncEngine, database_url: str, table: str, tmp_path: Path
) -> None:
    job_id = add_job(engine, "Block", table)
    (before,) = job_rows(engine)
    app_name = f"que-async-block-{uuid.uuid4().hex[:8]}"
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.async_handlers",
            "block",
            "--url",
            database_url,
            "--app-name",
            app_name,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def started() -> bool:
            if process.poll() is not None:
                pytest.fail((tmp_path / "worker.log").read_text())
            return rows(engine, table) == [(job_id, "started")]

        wait_for(started, timeout=60, message="the job to start in the worker process")
        assert held_job_locks(engine) == [job_id]
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()
    wait_for(lambda: held_job_locks(engine) == [], message="the dead worker's lock to go")
    (after,) = job_rows(engine)
    assert (after["error_count"], after["last_error"]) == (0, None)
    assert after["run_at"] == before["run_at"]
    assert rows(engine, table) == [(job_id, "started")]  # its in-transaction write rolled back
    assert crash_marks(engine) == [job_id]

    registry = JobRegistry()
    worked: list[int] = []

    @registry.job("Block", retry_delay=0)
    async def block(job: AsyncJobContext, table: str) -> None:
        worked.append(job.error_count)

    burst(async_engine, registry)  # the crash counts as an attempt, then the job runs
    assert worked == [1]
    assert job_rows(engine) == [] and crash_marks(engine) == []


# -- the CLI, the sync workers' refusal, types ---------------------------------------------


def test_the_cli_runs_async_handlers_in_the_async_pool(
    engine: Engine, database_url: str, table: str
) -> None:
    job_id = add_job(engine, "AsyncRecord", table)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sqlalchemy_que",
            "worker",
            "tests.async_handlers:registry",
            "--burst",
            "--no-listen",
            "--workers",
            "2",
            "--database-url",
            database_url,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows(engine, table) == [(job_id, "task")]
    assert job_rows(engine) == []
    assert "worker tasks" in result.stderr, result.stderr


def test_sigterm_stops_the_async_cli_and_cancels_a_job_past_the_shutdown_timeout(
    engine: Engine, database_url: str, table: str
) -> None:
    job_id = add_job(engine, "AsyncBlock", table)
    (before,) = job_rows(engine)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sqlalchemy_que",
            "worker",
            "tests.async_handlers:registry",
            "--shutdown-timeout",
            "0.2",
            "--wake-interval",
            "0.05",
            "--database-url",
            database_url,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: process.poll() is None and rows(engine, table) == [(job_id, "started")],
            timeout=60,
            message="the job to start in the CLI's async pool",
        )
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 3, output
    assert f"stopped with 1 job(s) still running: {job_id}" in output.decode(), output
    (after,) = job_rows(engine)
    assert (after["error_count"], after["run_at"]) == (0, before["run_at"])
    assert rows(engine, table) == [(job_id, "started")]  # the job's own write rolled back
    assert held_job_locks(engine) == [] and crash_marks(engine) == []


def test_sync_workers_refuse_async_handlers_naming_them(engine: Engine) -> None:
    registry = JobRegistry()

    @registry.job("Async")
    async def handler(job: AsyncJobContext) -> None:
        pass

    with pytest.raises(WorkerError, match=r"the handlers of 'Async' are async def: run them with"):
        Worker(engine, registry)
    with pytest.raises(WorkerError, match=r"'Async' are async def"):
        WorkerPool(engine, registry)


def test_bad_settings_are_refused_naming_the_value(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    with pytest.raises(WorkerError, match="needs an AsyncEngine"):
        AsyncWorkerPool(engine, {})  # type: ignore[arg-type]
    with pytest.raises(WorkerError, match=r"concurrency must be a whole number >= 1, got 0"):
        AsyncWorkerPool(async_engine, {}, concurrency=0)
    with pytest.raises(WorkerError, match=r"wake_interval must be a positive number.*-1"):
        AsyncWorkerPool(async_engine, {}, wake_interval=-1)


def test_an_async_definition_calls_and_types_like_a_sync_one() -> None:
    @job("Typed")
    async def typed(job: AsyncJobContext, user_id: int) -> None:
        pass

    assert typed.enqueue(42).args == [42]


TYPED_MODULE = """\
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy_que import AsyncJobContext, job


@job("SendEmail", queue="mail")
async def send_email(job: AsyncJobContext, user_id: int, template: str = "welcome") -> None:
    await job.session.commit()
    connection: AsyncConnection = job.connection


async def enqueue(connection: AsyncConnection) -> None:
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_type_checkers_see_the_async_job_arguments(tmp_path: Path) -> None:
    good = "    send_email.enqueue(42)\n    await send_email.insert_async(connection, 42, 'x')\n"
    bad = "    send_email.enqueue('nope')\n    await send_email.insert_async(connection, t=1)\n"
    (tmp_path / "good.py").write_text(TYPED_MODULE + good)
    (tmp_path / "bad.py").write_text(TYPED_MODULE + bad)
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
    assert not [line for line in lines if line.startswith("good.py")], result.stdout
    errors = [line for line in lines if line.startswith("bad.py") and ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["12", "13"], result.stdout
    assert '"str"' in errors[0] and '"int"' in errors[0], errors[0]


# -- schedules -------------------------------------------------------------------------------


def test_two_async_pools_enqueue_each_tick_of_a_schedule_exactly_once(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    name = f"AsyncTick{uuid.uuid4().hex[:8]}"
    worked: list[int] = []
    registry = JobRegistry()

    @registry.job(name, schedule=cron("* * * * * *"))
    async def tick(job: AsyncJobContext) -> None:
        worked.append(job.job_id)

    def recorded() -> list[tuple[datetime.datetime, int]]:
        with engine.connect() as connection:
            result = connection.execute(
                text(
                    "SELECT tick, job_id FROM sqlalchemy_que_schedule_ticks "
                    "WHERE schedule = :name ORDER BY tick"
                ),
                {"name": name},
            )
            return [(row.tick, row.job_id) for row in result]

    async def main() -> list[AsyncWorkerPool]:
        pools = [AsyncWorkerPool(async_engine, registry, concurrency=2) for _ in range(2)]
        for pool in pools:
            await pool.start()
        try:
            await wait_until(lambda: len(recorded()) >= 4, "4 ticks", timeout=20)
            await wait_until(lambda: len(worked) >= len(recorded()), "the ticks worked")
        finally:
            for pool in pools:
                await pool.stop(10)
        return pools

    pools = run(main, timeout=60)
    ticks = recorded()
    times = [when for when, _ in ticks]
    assert all(b - a == datetime.timedelta(seconds=1) for a, b in itertools.pairwise(times))
    ids = [job_id for _, job_id in ticks]
    assert len(set(ids)) == len(ids)
    assert sorted(set(worked)) == sorted(worked)  # none worked twice
    assert set(ids) <= set(worked) | {job_id for job_id, *_ in job_rows(engine)}
    assert all(pool.scheduler is None for pool in pools)  # stopped with the pool
    assert not [t for t in threading.enumerate() if t.name == "que-scheduler" and t.is_alive()]


def test_an_async_pool_with_run_schedules_false_enqueues_no_tick(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    registry = JobRegistry()

    @registry.job(f"AsyncNoTick{uuid.uuid4().hex[:8]}", schedule=every(1))
    async def never(job: AsyncJobContext) -> None:
        raise AssertionError("no tick should be enqueued")

    async def main() -> AsyncWorkerPool:
        pool = AsyncWorkerPool(async_engine, registry, run_schedules=False)
        async with pool:
            assert pool.scheduler is None
        return pool

    run(main)
    assert job_rows(engine) == []


def test_the_worker_sends_nothing_while_its_cancel_request_is_on_its_way(
    engine: Engine, async_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's statement_timeout and its asyncio timeout fire together, so the worker may
    ask the server to cancel a statement that has already ended. A request still on its way
    would land on the worker's next statement (recording the overrun); the worker waits for
    it to be delivered first. Here delivering it takes 0.3 s."""
    from sqlalchemy_que._async_session import AsyncLockedSession
    from sqlalchemy_que._async_worker import AsyncWorker

    real_cancel = AsyncWorker._cancel_statement
    events: list[str] = []

    async def slow_cancel(raw: Any) -> None:
        await asyncio.sleep(0.3)  # a slow path to the server: the delay under test
        await real_cancel(raw)
        events.append("cancel delivered")

    real_record = AsyncLockedSession.record_error

    async def record_error(self: AsyncLockedSession, *args: Any, **kwargs: Any) -> Any:
        events.append("record_error")
        return await real_record(self, *args, **kwargs)

    monkeypatch.setattr(AsyncWorker, "_cancel_statement", staticmethod(slow_cancel))
    monkeypatch.setattr(AsyncLockedSession, "record_error", record_error)
    registry = JobRegistry()

    @registry.job("SlowQuery", timeout=0.2, retry_delay=60)
    async def slow_query(job: AsyncJobContext) -> None:
        await job.connection.execute(text("SELECT pg_sleep(30)"))

    add_job(engine, "SlowQuery")
    pool = burst(async_engine, registry)
    assert pool.failed == 1
    assert events == ["cancel delivered", "record_error"]
    [row] = job_rows(engine)
    assert row["last_error"].startswith("sqlalchemy_que.JobTimeoutError: job "), row
    assert held_job_locks(engine) == []
