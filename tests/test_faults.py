"""Workers under concurrency and faults (contract sections 3-5): many workers in threads and in
processes work every job exactly once; a worker killed mid-job, or whose connection is killed,
loses nothing and leaves no lock; jobs written by Ruby Que and que-go are worked with the right
arguments; a database outage makes a worker back off, not die; shutdown is bounded.

Worker processes are ``python -m tests.proc_worker`` (see that module); every one is waited
for with a timeout and killed in ``finally``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from sqlalchemy import Engine, create_engine, event, text

import sqlalchemy_que
from sqlalchemy_que import (
    JobContext,
    LockedJob,
    Worker,
    WorkerPool,
    enqueue,
    insert_jobs,
    job,
    locked_job,
    worker_states,
)

from .conftest import wait_for
from .helpers import add_job, database_outage, held_job_locks, job_rows, past

ROOT = Path(__file__).resolve().parent.parent

#: Upper bound for a worker process to start, work or die; they normally take well under 2 s.
PROCESS_TIMEOUT = 60.0


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def runs_table(engine: Engine) -> Iterator[str]:
    """A table recording each run of a job; ``job_id`` is its primary key, so a second run of
    the same job fails to record and leaves the job errored in ``que_jobs``."""
    name = f"que_fault_runs_{uuid.uuid4().hex[:10]}"
    with engine.begin() as connection:
        connection.execute(
            text(
                f"CREATE TABLE {name} (job_id bigint PRIMARY KEY, worker text NOT NULL, "
                "recorded_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
        )
    yield name
    with engine.begin() as connection:
        connection.execute(text(f"DROP TABLE IF EXISTS {name}"))


def recorded(engine: Engine, table: str) -> list[tuple[int, str]]:
    with engine.connect() as connection:
        rows = connection.execute(text(f"SELECT job_id, worker FROM {table} ORDER BY job_id"))
        return [(row.job_id, row.worker) for row in rows]


def autocommit_engine(database_url: str, *, size: int, name: str) -> Engine:
    """An engine whose every statement commits at once, for recording runs from handlers."""
    return create_engine(
        database_url,
        isolation_level="AUTOCOMMIT",
        pool_size=size,
        connect_args={"application_name": name},
    )


def record_run(recorder: Engine, table: str, job_id: int, worker: str) -> None:
    with recorder.connect() as connection:
        connection.execute(
            text(f"INSERT INTO {table} (job_id, worker) VALUES (:job_id, :worker)"),
            {"job_id": job_id, "worker": worker},
        )


def add_jobs(engine: Engine, job_class: str, count: int) -> list[int]:
    with engine.begin() as connection:
        insert_jobs(connection, [enqueue(job_class) for _ in range(count)])
        return list(
            connection.execute(
                text("SELECT job_id FROM que_jobs WHERE job_class = :c ORDER BY job_id"),
                {"c": job_class},
            ).scalars()
        )


def backend_pids(engine: Engine, application_name: str) -> set[int]:
    with engine.connect() as connection:
        return set(
            connection.execute(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                {"name": application_name},
            ).scalars()
        )


class Processes:
    """Worker processes started by one test: output to files, always killed and reaped."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[tuple[subprocess.Popen[bytes], IO[bytes], Path]] = []

    def spawn(self, *arguments: str, stdin: bool = False) -> subprocess.Popen[bytes]:
        log = self.folder / f"worker-{len(self.started)}.log"
        output = log.open("wb")
        paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.proc_worker", *arguments],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        self.started.append((process, output, log))
        return process

    def output(self, process: subprocess.Popen[bytes]) -> str:
        for started, output, log in self.started:
            if started is process:
                output.flush()
                return log.read_text(errors="replace")
        raise KeyError(process)

    def check_running(self) -> None:
        """Fail at once, with its output, if a process ended before it should have."""
        for process, _, _ in self.started:
            if process.poll() is not None:
                pytest.fail(
                    f"worker process exited early with {process.returncode}:\n"
                    f"{self.output(process)}"
                )

    def close(self) -> None:
        for process, output, _ in self.started:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            output.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.close()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (bound, then let go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, name=worker.name, daemon=True)
    thread.start()
    return thread


# -- 1. many workers, every job exactly once -----------------------------------------------


def test_four_worker_threads_work_every_job_exactly_once(
    engine: Engine, database_url: str, runs_table: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sqlalchemy_que")
    total = 300
    ids = add_jobs(engine, "Count", total)
    assert len(ids) == total
    recorder = autocommit_engine(database_url, size=4, name="que-fault-recorder")
    errors: list[BaseException] = []

    def count(job: JobContext) -> None:
        record_run(recorder, runs_table, job.job_id, threading.current_thread().name)

    assert engine.pool.size() >= 4  # type: ignore[attr-defined]
    pool = WorkerPool(
        engine,
        {"Count": count},
        workers=4,
        wake_interval=0.05,
        on_error=lambda error, _job: errors.append(error),
    )
    try:
        pool.start()
        wait_for(
            lambda: len(recorded(engine, runs_table)) >= total and not job_rows(engine),
            timeout=30,
            message=f"{total} jobs to be worked",
        )
        assert pool.shutdown(timeout=5) == []
        assert not pool.is_alive()
    finally:
        pool.shutdown(timeout=5)
        recorder.dispose()
    runs = recorded(engine, runs_table)
    assert [job_id for job_id, _ in runs] == ids
    assert len({worker for _, worker in runs}) >= 2, "the jobs were not shared between threads"
    assert job_rows(engine) == []
    assert errors == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert held_job_locks(engine) == []


@pytest.mark.slow
def test_three_worker_processes_work_every_job_exactly_once(
    engine: Engine, database_url: str, runs_table: str, processes: Processes, tmp_path: Path
) -> None:
    total = 300
    ids = add_jobs(engine, "Count", total)
    ready = [tmp_path / f"ready-{index}" for index in range(3)]
    started = [
        processes.spawn(
            "burst",
            "--url",
            database_url,
            "--table",
            runs_table,
            "--workers",
            "4",
            "--ready",
            str(flag),
            "--timeout",
            str(PROCESS_TIMEOUT),
            "--app-name",
            f"que-fault-burst-{index}",
            stdin=True,
        )
        for index, flag in enumerate(ready)
    ]

    def all_ready() -> bool:
        processes.check_running()
        return all(flag.exists() for flag in ready)

    wait_for(all_ready, timeout=PROCESS_TIMEOUT, message="the worker processes to be ready")
    for process in started:  # the barrier: all start working at once
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.flush()
    for process in started:
        returncode = process.wait(timeout=PROCESS_TIMEOUT)
        output = processes.output(process)
        assert returncode == 0, output
        assert "ERROR" not in output and "WARNING" not in output, output
    runs = recorded(engine, runs_table)
    assert [job_id for job_id, _ in runs] == ids
    pids = {worker.split(":")[0] for _, worker in runs}
    assert len(pids) >= 2, "the jobs were not shared between processes"
    assert job_rows(engine) == []
    assert held_job_locks(engine) == []


# -- 2. a worker process killed in the middle of a job --------------------------------------


@pytest.mark.slow
def test_a_worker_process_killed_mid_job_leaves_the_job_intact_and_unlocked(
    engine: Engine, database_url: str, runs_table: str, processes: Processes
) -> None:
    job_id = add_job(engine, "Block", "payload", run_at=past(5))
    (before,) = job_rows(engine)
    app_name = f"que-fault-block-{uuid.uuid4().hex[:8]}"
    process = processes.spawn(
        "block",
        "--url",
        database_url,
        "--table",
        runs_table,
        "--app-name",
        app_name,
        "--block-seconds",
        str(PROCESS_TIMEOUT),
    )

    def started() -> bool:
        processes.check_running()
        return bool(recorded(engine, runs_table))

    wait_for(started, timeout=PROCESS_TIMEOUT, message="the job to start in the worker process")
    assert [job for job, _ in recorded(engine, runs_table)] == [job_id]
    (state,) = worker_states(engine)
    worker_backends = backend_pids(engine, app_name)
    assert state.job_id == job_id
    assert state.pg_backend_pid in worker_backends
    assert held_job_locks(engine) == [job_id]

    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL
    wait_for(lambda: held_job_locks(engine) == [], message="the dead worker's lock to go")
    wait_for(lambda: not backend_pids(engine, app_name), message="the dead worker's backend to end")
    assert worker_states(engine) == []
    (after,) = job_rows(engine)
    assert after["error_count"] == 0
    assert after["last_error"] is None
    assert after["run_at"] == before["run_at"]
    assert (after["job_id"], after["job_class"], after["args"]) == (job_id, "Block", '["payload"]')

    worked: list[tuple[int, str]] = []

    def block(job: JobContext, payload: str) -> None:
        worked.append((job.job_id, payload))

    # The next worker finds the crash mark: the lost run counts as a failed attempt, with
    # Que's retry delay, instead of being run again at once.
    assert Worker(engine, {"Block": block}).work_one() is True
    assert worked == []
    (crashed,) = job_rows(engine)
    assert crashed["error_count"] == 1 and 0 < crashed["run_in"] <= 4
    assert crashed["last_error"].startswith("sqlalchemy_que.JobCrashedError: ")
    with engine.begin() as connection:
        connection.execute(text("UPDATE que_jobs SET run_at = now()"))
    assert Worker(engine, {"Block": block}).work_one() is True
    assert worked == [(job_id, "payload")]
    assert job_rows(engine) == []
    assert held_job_locks(engine) == []


# -- 3. the worker's connection killed under a running job ----------------------------------


def test_a_terminated_connection_under_a_job_loses_nothing_and_the_worker_survives(
    engine: Engine, database_url: str
) -> None:
    job_id = add_job(engine, "Flaky", 7)
    worker_engine = create_engine(database_url, pool_size=2, pool_pre_ping=True)
    started = threading.Event()
    terminated = threading.Event()
    calls: list[tuple[int, int, str | None]] = []

    @job("Flaky", retry_delay=0)
    def flaky(job: JobContext, value: int) -> None:
        calls.append((value, job.error_count, job.last_error))
        if len(calls) == 1:
            started.set()
            if not terminated.wait(10):
                raise TimeoutError("the test did not terminate the backend")
            job.session.execute(text("SELECT 1"))  # the backend is gone: this raises

    worker = Worker(worker_engine, [flaky], wake_interval=0.05, name="que-terminated")
    thread = run_in_thread(worker)
    try:
        assert started.wait(10)
        (state,) = worker_states(engine)
        assert state.job_id == job_id
        with engine.connect() as admin:
            first_run = admin.execute(
                text("SELECT started_at::text FROM que_job_runs WHERE job_id = :id"),
                {"id": job_id},
            ).scalar_one()
            assert admin.execute(
                text("SELECT pg_terminate_backend(:pid)"), {"pid": state.pg_backend_pid}
            ).scalar_one()
        wait_for(lambda: held_job_locks(engine) == [], message="the killed session's lock to go")
        terminated.set()
        wait_for(lambda: not job_rows(engine), timeout=15, message="the job to be worked again")
        assert thread.is_alive()
    finally:
        terminated.set()
        worker.stop()
        thread.join(5)
        worker_engine.dispose()
    assert not thread.is_alive()
    # The worker writes nothing about a job once its session (and lock) is gone. The crash
    # mark of the first run, committed before its handler started, stays: the next lock
    # counts that run as a failed attempt (retry_delay=0: due at once), and the run after
    # it works the job, told of the crash.
    assert calls == [
        (7, 0, None),
        (
            7,
            1,
            f"sqlalchemy_que.JobCrashedError: job {job_id} Flaky: its earlier run (started at "
            f"{first_run} by backend pid {state.pg_backend_pid}) ended without an outcome; its "
            "worker process died (killed, out of memory, os._exit) or lost its connection",
        ),
    ]
    assert held_job_locks(engine) == []


# -- 3b. a lock lost with its session, or left on a pooled one (both fail today) -----------


def test_a_worker_that_lost_its_session_does_not_touch_a_job_another_worker_now_holds(
    engine: Engine, database_url: str
) -> None:
    """The lock dies with the session. Once it is gone another worker may lock and work the
    job; the worker that lost it must then leave the row alone: a statement about a job is
    only valid on the session that holds its lock (contract section 3).

    Fails today: after the disconnect, ``Worker._fail`` rolls the invalidated Connection
    back, and SQLAlchemy then silently reconnects for the error ``UPDATE``, which runs on a
    new session without the lock, moves ``run_at`` under the other worker, whose completing
    ``DELETE`` by full key then matches nothing: the job runs a second time later.
    """
    job_id = add_job(engine, "Lost", run_at=past(5))
    (before,) = job_rows(engine)
    worker_engine = create_engine(database_url, pool_size=2, pool_pre_ping=True)
    started = threading.Event()
    terminated = threading.Event()
    reported = threading.Event()

    def lost(job: JobContext) -> None:
        started.set()
        if not terminated.wait(10):
            raise TimeoutError("the test did not terminate the backend")
        job.session.execute(text("SELECT 1"))  # the backend is gone: this raises

    worker = Worker(
        worker_engine,
        {"Lost": lost},
        wake_interval=0.05,
        name="que-lost-session",
        on_error=lambda _error, _job: reported.set(),
    )
    thread = run_in_thread(worker)
    try:
        assert started.wait(10)
        (state,) = worker_states(engine)
        with engine.connect() as admin:
            assert admin.execute(
                text("SELECT pg_terminate_backend(:pid)"), {"pid": state.pg_backend_pid}
            ).scalar_one()
        wait_for(lambda: held_job_locks(engine) == [], message="the killed session's lock to go")
        with locked_job(engine) as taken:  # another worker takes the now unlocked job
            assert taken is not None and taken.job.job_id == job_id
            terminated.set()
            assert reported.wait(10), "the first worker did not finish failing the job"
            (row,) = job_rows(engine)
            assert (row["error_count"], row["run_at"], row["last_error"]) == (
                0,
                before["run_at"],
                None,
            ), "the row was changed by a worker that no longer held its lock"
            assert taken.complete(), "the other worker's completion matched nothing"
    finally:
        terminated.set()
        worker.stop()
        thread.join(5)
        worker_engine.dispose()
    assert not thread.is_alive()
    assert job_rows(engine) == []


@pytest.mark.parametrize("run_at", ["-infinity", "0001-01-01 00:00+14"])
def test_a_ready_row_the_driver_cannot_read_is_failed_by_its_key_and_stalls_nothing(
    engine: Engine, database_url: str, run_at: str
) -> None:
    """A row whose ``run_at`` no Python datetime holds (``-infinity`` written by Ruby or SQL;
    year 1 in a zone east of UTC) is first in line. It must not stall the queue nor leave a
    lock on a pooled connection: it is failed by its exact key with a clear ``last_error``,
    which reschedules it from now, and the jobs behind it are worked."""
    with engine.begin() as connection:
        poison = connection.execute(
            text(
                "INSERT INTO que_jobs (job_class, run_at) "
                "VALUES ('Poison', CAST(:run_at AS timestamptz)) RETURNING job_id"
            ),
            {"run_at": run_at},
        ).scalar_one()
    fine = add_job(engine, "Fine")
    worked: list[int] = []

    def record(job: JobContext) -> None:
        worked.append(job.job_id)

    worker_engine = create_engine(database_url, pool_size=1, max_overflow=0)
    try:
        worker = Worker(worker_engine, {"Poison": record, "Fine": record})
        assert worker.run(burst=True) == 2
        assert worked == [fine], "the unreadable job was run, or the one behind it was not"
        (row,) = job_rows(engine)
        assert row["job_id"] == poison and row["error_count"] == 1
        assert "cannot be represented" in row["last_error"].split("\n")[0]
        assert 0 < row["run_in"] < 10, "the failed job was not rescheduled from now"
        with worker_engine.connect() as pooled:
            mine = pooled.execute(
                text(
                    "SELECT count(*) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
                )
            ).scalar_one()
        assert mine == 0, f"job {poison}'s lock went back to the pool with the connection"
    finally:
        worker_engine.dispose()


# -- 4. jobs written by Ruby Que 0.14.3 and que-go -------------------------------------------


def _received(handler_calls: list[tuple[Any, ...]]) -> list[list[tuple[type, Any]]]:
    """Each call's arguments with their exact types (so that 1 != True != 1.0)."""

    def typed(value: Any) -> Any:
        if isinstance(value, list):
            return (list, [typed(item) for item in value])
        if isinstance(value, dict):
            return (dict, {key: typed(item) for key, item in value.items()})
        return (type(value), value)

    return [[typed(arg) for arg in call] for call in handler_calls]


RUBY_ARGS = (
    '[1,"two",{"nested":{"a":[true,false,null]},"unicode":"héllo ☃"},3.25,null,true,'
    '{"trailing":"hash"}]'
)
RUBY_EXPECTED: list[Any] = [
    1,
    "two",
    {"nested": {"a": [True, False, None]}, "unicode": "héllo ☃"},
    3.25,
    None,
    True,
    {"trailing": "hash"},
]

# Que 0.14.3's insert_job statement, with its positional parameters as named binds.
RUBY_INSERT = text(
    "INSERT INTO que_jobs (queue, priority, run_at, job_class, args) VALUES "
    "(CAST(coalesce(:queue, '') AS text), CAST(coalesce(:priority, 100) AS smallint), "
    "CAST(coalesce(:run_at, now()) AS timestamptz), CAST(:job_class AS text), "
    "CAST(coalesce(:args, '[]') AS json)) RETURNING job_id"
)

# que-go's insert: typed parameters, NULL for "use the default".
GO_INSERT = text(
    "INSERT INTO que_jobs (queue, priority, run_at, job_class, args) VALUES "
    "(coalesce(CAST(:q AS text), CAST('' AS text)), "
    "coalesce(CAST(:p AS smallint), CAST(100 AS smallint)), "
    "coalesce(CAST(:r AS timestamptz), CAST(now() AS timestamptz)), "
    "CAST(:c AS text), coalesce(CAST(:a AS json), CAST('[]' AS json))) RETURNING job_id"
)


def test_jobs_written_by_ruby_que_are_worked_with_the_exact_arguments(engine: Engine) -> None:
    with engine.begin() as connection:
        literal = connection.execute(
            text(
                "INSERT INTO que_jobs (queue, priority, run_at, job_class, args) "
                f"VALUES ('', 100, now(), 'RubyJob', '{RUBY_ARGS}') RETURNING job_id"
            )
        ).scalar_one()
        bound = connection.execute(
            RUBY_INSERT,
            {
                "queue": None,
                "priority": None,
                "run_at": None,
                "job_class": "RubyJob",
                "args": RUBY_ARGS,
            },
        ).scalar_one()
        bare = connection.execute(
            RUBY_INSERT,
            {
                "queue": None,
                "priority": None,
                "run_at": None,
                "job_class": "Ruby::Bare",
                "args": None,
            },
        ).scalar_one()
        # Ruby's JSON escapes nothing but quotes, backslashes and control characters.
        escaped = connection.execute(
            RUBY_INSERT,
            {
                "queue": "ruby",
                "priority": 5,
                "run_at": past(1),
                "job_class": "RubyJob",
                "args": '["line\\nbreak \\"quoted\\" back\\\\slash",-0.5,1e+20,-12345678901234]',
            },
        ).scalar_one()
    calls: list[tuple[Any, ...]] = []
    ids: list[int] = []

    def ruby_job(job: JobContext, *args: Any) -> None:
        ids.append(job.job_id)
        calls.append(args)

    def bare_job(job: JobContext, *args: Any) -> None:
        ids.append(job.job_id)
        calls.append(args)

    handlers = {"RubyJob": ruby_job, "Ruby::Bare": bare_job}
    default_worker = Worker(engine, handlers)
    while default_worker.work_one():
        pass
    assert Worker(engine, handlers, queue="ruby").work_one() is True
    assert ids == [literal, bound, bare, escaped]
    assert _received(calls) == _received(
        [
            tuple(RUBY_EXPECTED),
            tuple(RUBY_EXPECTED),
            (),
            ('line\nbreak "quoted" back\\slash', -0.5, 1e20, -12345678901234),
        ]
    )
    assert job_rows(engine) == []


def test_jobs_written_by_que_go_are_worked_with_the_exact_arguments(engine: Engine) -> None:
    with engine.begin() as connection:
        defaults = connection.execute(
            GO_INSERT, {"q": None, "p": None, "r": None, "c": "GoDefaults", "a": None}
        ).scalar_one()
        (row,) = connection.execute(
            text("SELECT queue, priority, args::text AS args FROM que_jobs WHERE job_id = :id"),
            {"id": defaults},
        )
        assert (row.queue, row.priority, row.args) == ("", 100, "[]")
        # Go's encoding/json escapes <, > and & and writes non-ASCII as UTF-8.
        full = connection.execute(
            GO_INSERT,
            {
                "q": "go",
                "p": 7,
                "r": past(2),
                "c": "GoJob",
                "a": '[{"html":"\\u003cb\\u003e \\u0026 ünï"},[1,2.5,"x"],9007199254740993,false]',
            },
        ).scalar_one()
    calls: list[tuple[str, int, tuple[Any, ...]]] = []

    def handler(job: JobContext, *args: Any) -> None:
        calls.append((job.job_class, job.job_id, args))

    handlers = {"GoDefaults": handler, "GoJob": handler}
    assert Worker(engine, handlers).work_one() is True
    assert Worker(engine, handlers, queue="go").work_one() is True
    assert [(name, job_id) for name, job_id, _ in calls] == [
        ("GoDefaults", defaults),
        ("GoJob", full),
    ]
    assert _received([args for _, _, args in calls]) == _received(
        [(), ({"html": "<b> & ünï"}, [1, 2.5, "x"], 9007199254740993, False)]
    )
    assert job_rows(engine) == []


# -- 5. a database outage ------------------------------------------------------------------


def test_a_database_outage_makes_the_worker_back_off_and_never_die(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sqlalchemy_que.worker")
    port = free_port()
    unreachable = create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
        connect_args={"connect_timeout": 2},
    )
    worker = Worker(unreachable, {}, wake_interval=0.05, name="que-outage")

    def database_errors() -> list[logging.LogRecord]:
        return [
            record
            for record in list(caplog.records)
            if record.name == "sqlalchemy_que.worker" and "database error" in record.getMessage()
        ]

    thread = run_in_thread(worker)
    try:
        wait_for(lambda: len(database_errors()) >= 4, timeout=10, message="4 database errors")
        assert thread.is_alive()
    finally:
        worker.stop()
        # Stopping is what ends the thread (how promptly a sleeping worker stops is
        # test_stopping_a_pool_of_sleeping_workers_returns_promptly's).
        thread.join(30)
        unreachable.dispose()
    assert not thread.is_alive()
    records = database_errors()
    assert [getattr(record, "backoff", None) for record in records[:4]] == [0.1, 0.2, 0.4, 0.8]
    assert all(record.levelno == logging.WARNING for record in records)
    assert all(getattr(record, "queue", None) == "" for record in records)


def test_the_worker_resumes_when_the_database_comes_back_and_backs_off_afresh(
    engine: Engine, empty_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage of a real database: it stops taking connections and its sessions are ended,
    then it comes back. The worker, which never died, works the next job, and its backoff
    starts again from 0.1 s at the next outage."""
    caplog.set_level(logging.WARNING, logger="sqlalchemy_que.worker")
    worker_engine = create_engine(empty_database_url, pool_size=1, max_overflow=0)
    sqlalchemy_que.migrate(worker_engine)
    worked: list[int] = []

    def backoffs() -> list[float]:
        return [
            float(getattr(record, "backoff", -1))
            for record in list(caplog.records)
            if "database error" in record.getMessage()
        ]

    worker = Worker(
        worker_engine,
        {"Job": lambda job: worked.append(job.job_id)},
        wake_interval=0.05,
        name="que-outage-recovery",
    )
    thread = run_in_thread(worker)
    try:
        first = add_job(worker_engine, "Job")
        wait_for(lambda: worked == [first], message="the first job to be worked")
        database_outage(engine, empty_database_url, down=True)
        wait_for(lambda: len(backoffs()) >= 3, message="3 database errors during the outage")
        assert backoffs()[:3] == [0.1, 0.2, 0.4]
        database_outage(engine, empty_database_url, down=False)
        second = add_job(worker_engine, "Job")
        wait_for(lambda: worked == [first, second], message="a job worked after the outage")
        # The handler ran; the recovery is complete once the job's deletion has committed
        # and the worker sleeps between polls (its batch ended, which resets the backoff).
        wait_for(
            lambda: job_rows(worker_engine) == [] and worker.sleeping,
            message="the second job's completion and the worker idle",
        )
        assert thread.is_alive()
        during_first_outage = len(backoffs())
        database_outage(engine, empty_database_url, down=True)
        wait_for(lambda: len(backoffs()) > during_first_outage, message="the next outage")
        assert backoffs()[during_first_outage] == 0.1  # the backoff was reset by the recovery
        assert thread.is_alive()
    finally:
        database_outage(engine, empty_database_url, down=False)
        worker.stop()
        thread.join(5)
        worker_engine.dispose()
    assert not thread.is_alive()


# -- 6. shutdown -----------------------------------------------------------------------------


def test_shutdown_with_a_slow_job_returns_in_time_and_the_job_still_completes(
    engine: Engine, database_url: str
) -> None:
    job_id = add_job(engine, "Slow", "x")
    pool_engine = create_engine(database_url, pool_size=2, max_overflow=0)
    started = threading.Event()
    release = threading.Event()
    finished: list[int] = []

    def slow(job: JobContext, value: str) -> None:
        started.set()
        if not release.wait(15):
            raise TimeoutError("the test did not release the slow job")
        finished.append(job.job_id)

    pool = WorkerPool(pool_engine, {"Slow": slow}, workers=2, wake_interval=0.05)
    try:
        pool.start()
        assert started.wait(10)
        began = time.monotonic()
        still_running = pool.shutdown(timeout=0.5)
        took = time.monotonic() - began
        # It waits the 0.5 s it was given, and not for the job, which holds on for 15 s
        # (the upper bound is generous on purpose, for a loaded machine).
        assert 0.45 <= took < 10, took
        assert [type(item) for item in still_running] == [LockedJob]
        assert [item.job_id for item in still_running] == [job_id]
        assert still_running[0].job_class == "Slow"
        (row,) = job_rows(engine)
        assert (row["job_id"], row["error_count"], row["last_error"]) == (job_id, 0, None)
        assert held_job_locks(engine) == [job_id]
        assert pool.is_alive()
        release.set()
        assert pool.join(5) is True
    finally:
        release.set()
        pool.shutdown(timeout=5)
        pool_engine.dispose()
    assert finished == [job_id]
    assert job_rows(engine) == []
    assert held_job_locks(engine) == []


def test_stopping_a_pool_of_sleeping_workers_returns_promptly(
    engine: Engine, database_url: str
) -> None:
    pool_engine = create_engine(database_url, pool_size=2, max_overflow=0)
    checkins: list[float] = []
    event.listen(pool_engine, "checkin", lambda *_: checkins.append(time.monotonic()))
    pool = WorkerPool(pool_engine, {}, workers=2, wake_interval=60)
    try:
        pool.start()
        # The schema check, then one empty look per worker, and one more by the worker the
        # listener wakes once it listens; each then sleeps for 60 s.
        assert pool.listener is not None and pool.listener.connected.wait(10)
        wait_for(lambda: len(checkins) >= 4, message="both workers to find nothing")
        wait_for(lambda: all(w.sleeping for w in pool.workers), message="both asleep")
        looked = len(checkins)
        assert pool.is_alive()
        # The workers sleep for 60 s: only a wake-up ends them within the 30 s given (a
        # bound generous on purpose, for a loaded machine).
        assert pool.shutdown(timeout=30) == []
        assert not pool.is_alive()
        assert len(checkins) == looked  # nobody looked for a job again on the way out
    finally:
        pool.shutdown(timeout=5)
        pool_engine.dispose()
    assert held_job_locks(engine) == []
