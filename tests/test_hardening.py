"""Issue 10's hardening items: rows written by que-go, URLs, imports from the project folder,
connect timeouts and prompt shutdown, the JSON output of ``stats`` and of the worker's log."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text

from sqlalchemy_que import JobContext, Worker, WorkerError, WorkerPool

from .conftest import wait_for
from .helpers import add_job, job_rows
from .test_cli import CLI, assert_one_line_error, background_worker, cli_env, run_cli
from .test_faults import GO_INSERT


def test_non_array_args_written_by_que_go_are_one_argument(engine: Engine) -> None:
    # que-go's Enqueue stores args as given: an object, a string or a number is one value.
    values = {"object": '{"user_id": 7, "tags": ["a"]}', "string": '"hello"', "number": "42"}
    with engine.begin() as connection:
        for name, value in values.items():
            connection.execute(
                GO_INSERT, {"q": None, "p": None, "r": None, "c": f"Go::{name}", "a": value}
            )
    calls: dict[str, tuple[Any, ...]] = {}

    def handler(job: JobContext, *args: Any) -> None:
        calls[job.job_class] = args
        assert job.args == list(args)

    worker = Worker(engine, {f"Go::{name}": handler for name in values})
    while worker.work_one():
        pass
    assert calls == {
        "Go::object": ({"user_id": 7, "tags": ["a"]},),
        "Go::string": ("hello",),
        "Go::number": (42,),
    }
    assert job_rows(engine) == []  # all done, none retried


def test_a_worker_on_an_engine_without_psycopg_is_refused_before_connecting() -> None:
    # sqlite's driver ships with Python, and no connection is made by create_engine: the
    # refusal comes from Worker() itself, naming the driver.
    engine = create_engine("sqlite://")
    connects: list[object] = []
    event.listen(engine, "connect", lambda *args: connects.append(args))
    with pytest.raises(WorkerError, match=r"'pysqlite'.*postgresql\+psycopg://"):
        Worker(engine, {"Job": lambda job: None})
    assert connects == []


def test_run_demo_accepts_a_plain_postgresql_url(engine: Engine, database_url: str) -> None:
    from sqlalchemy_que._demo import run_demo

    from .test_cli import plain_url

    result = run_demo(plain_url(database_url), jobs=6, workers=1, echo=lambda line: None)
    assert result.completed == 6
    assert job_rows(engine) == []


def test_worker_imports_the_project_from_the_current_directory(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "jobs.py").write_text(
        textwrap.dedent(
            """
            from sqlalchemy_que import JobRegistry

            registry = JobRegistry()

            @registry.job("MyApp::Hello")
            def hello(job, name):
                pass
            """
        )
    )
    add_job(engine, "MyApp::Hello", "world")
    env = cli_env()
    del env["PYTHONPATH"]  # only the current directory may make myapp importable
    result = subprocess.run(
        [str(CLI), "worker", "myapp.jobs:registry", "--burst", "--database-url", database_url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert job_rows(engine) == []


@contextlib.contextmanager
def silent_server() -> Iterator[tuple[socket.socket, str]]:
    """A TCP port on 127.0.0.1 that accepts connections and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        yield listener, f"postgresql://postgres@127.0.0.1:{port}/postgres"


def test_stats_against_a_silent_server_fails_within_the_default_timeout() -> None:
    with silent_server() as (_, url):
        started = time.monotonic()
        result = run_cli("stats", "--database-url", url, timeout=40)
        elapsed = time.monotonic() - started
    assert_one_line_error(result, "database error", "timeout")
    # The default connect_timeout is 10 s; the rest is a generous allowance for start-up on a
    # loaded machine (without a timeout it hangs for minutes).
    assert elapsed < 35, elapsed


def test_connect_timeout_in_the_url_overrides_the_default() -> None:
    with silent_server() as (listener, url):
        process = subprocess.Popen(
            [str(CLI), "check", "--database-url", url + "?connect_timeout=1"],
            env=cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            listener.settimeout(60)
            accepted, _ = listener.accept()  # started up (however long that took): connecting
            with accepted:
                started = time.monotonic()
                stdout, stderr = process.communicate(timeout=40)
                elapsed = time.monotonic() - started
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert_one_line_error(result, "database error", "timeout")
    # From the connect on: 1 s, where the default would take 10 s (the rest is a generous
    # allowance for a loaded machine; the process's start-up is not counted).
    assert elapsed < 9, elapsed


def test_sigterm_stops_a_worker_waiting_for_a_silent_server(tmp_path: Path) -> None:
    # A minute of connect timeout: only a prompt shutdown ends the worker in time.
    with (
        silent_server() as (listener, url),
        background_worker(tmp_path, "--database-url", url + "?connect_timeout=60") as worker,
    ):
        listener.settimeout(30)
        accepted, _ = listener.accept()  # the worker is connecting now
        with accepted:
            worker.send(signal.SIGTERM)
            started = time.monotonic()
            status = worker.wait(timeout=45)
            elapsed = time.monotonic() - started
    assert status == 0, worker.stderr
    assert elapsed < 30, elapsed  # a 60 s connect would not be over; 30 s allows for load


def test_pool_shutdown_does_not_wait_for_workers_still_connecting() -> None:
    with silent_server() as (listener, url):
        engine = create_engine(
            url.replace("postgresql://", "postgresql+psycopg://") + "?connect_timeout=60"
        )
        pool = WorkerPool(
            engine, {"Job": lambda job: None}, workers=2, check_schema=False, listen=True
        )
        pool.start()
        listener.settimeout(30)
        connections = [listener.accept()[0] for _ in range(3)]  # two workers, one listener
        try:
            wait_for(
                lambda: all(worker.connecting for worker in pool.workers),
                message="both workers to be connecting",
            )
            started = time.monotonic()
            assert pool.shutdown() == []
            # The connects have 60 s to go: 30 s is generous on purpose, for a loaded machine.
            assert time.monotonic() - started < 30
        finally:
            for connection in connections:
                connection.close()  # the waiting connects fail now, and the threads end
            wait_for(lambda: not pool.is_alive(), message="the worker threads to end")
            engine.dispose()


def test_stats_watch_json_prints_one_object_a_line(engine: Engine, database_url: str) -> None:
    add_job(engine, "CLI::Noop", queue="watch-json")
    process = subprocess.Popen(
        [str(CLI), "stats", "--watch", "0.1", "--json", "--database-url", database_url],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(2)]
    finally:
        process.kill()
        process.communicate(timeout=10)
    for line in lines:
        document = json.loads(line)
        assert [row["queue"] for row in document["job_stats"]] == ["watch-json"]
        assert " " not in line.strip() or '"' in line  # compact separators
        assert ", " not in line and ": " not in line


def test_the_json_log_of_a_failed_job_has_its_new_error_count(
    engine: Engine, database_url: str
) -> None:
    job_id = add_job(engine, "CLI::Unknown")
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE que_jobs SET error_count = 2 WHERE job_id = :id"), {"id": job_id}
        )
    result = run_cli(
        "worker",
        "tests.cli_handlers:registry",
        "--burst",
        "--log-format",
        "json",
        "--database-url",
        database_url,
    )
    assert result.returncode == 4, result.stderr  # --burst with a failed job
    (entry,) = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if line.startswith("{") and json.loads(line).get("outcome") == "error"
    ]
    assert "(error 3)" in entry["message"]
    assert entry["error_count"] == 3
    (row,) = job_rows(engine)
    assert row["error_count"] == 3
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM que_jobs"))
