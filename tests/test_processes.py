"""``sqlalchemy-que worker --processes N``: one parent supervising N worker processes.

The parent forwards SIGTERM to its children, restarts a child that dies, and exits with the
documented statuses; the children share the queue without ever working a job twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from sqlalchemy_que import enqueue, insert_jobs

from .conftest import wait_for
from .helpers import held_job_locks, job_rows
from .test_cli import CLI, REPO, cli_env

pytestmark = pytest.mark.slow

TIMEOUT = 60.0


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux's /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(child) for child in path.read_text().split()]
    except FileNotFoundError:
        return []


@pytest.fixture
def parent(engine: Engine, database_url: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [
            str(CLI),
            "worker",
            "tests.cli_handlers:registry",
            "--processes",
            "2",
            "--workers",
            "2",
            "--wake-interval",
            "0.2",
        ],
        cwd=REPO,
        env=cli_env({"DATABASE_URL": database_url}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            for child in children_of(process.pid):
                os.kill(child, signal.SIGKILL)
            process.kill()
        process.communicate(timeout=TIMEOUT)


def test_a_burst_over_processes_works_every_job_once_and_exits_zero(
    engine: Engine, database_url: str
) -> None:
    with engine.begin() as connection:
        insert_jobs(connection, [enqueue("CLI::Noop", n) for n in range(300)])
    result = subprocess.run(
        [
            str(CLI),
            "worker",
            "tests.cli_handlers:registry",
            "--processes",
            "2",
            "--workers",
            "2",
            "--burst",
        ],
        cwd=REPO,
        env=cli_env({"DATABASE_URL": database_url}),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert job_rows(engine) == []
    assert held_job_locks(engine) == []


def test_a_killed_child_is_restarted_and_sigterm_stops_them_all(
    engine: Engine, parent: subprocess.Popen[str]
) -> None:
    wait_for(lambda: len(children_of(parent.pid)) == 2, timeout=TIMEOUT, message="two children")
    first, second = children_of(parent.pid)
    os.kill(first, signal.SIGKILL)
    wait_for(
        lambda: len(children_of(parent.pid)) == 2 and first not in children_of(parent.pid),
        timeout=TIMEOUT,
        message="the killed child to be replaced",
    )
    assert second in children_of(parent.pid)
    # The replacement works jobs too: enough that both processes must take part.
    with engine.begin() as connection:
        insert_jobs(connection, [enqueue("CLI::Noop", n) for n in range(200)])
    wait_for(lambda: job_rows(engine) == [], timeout=TIMEOUT, message="the queue to drain")
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(TIMEOUT) == 0
    _, stderr = parent.communicate(timeout=TIMEOUT)
    assert "exited with status -9; restarting it" in stderr
    assert children_of(parent.pid) == []
    assert held_job_locks(engine) == []


def test_processes_refuse_a_bad_setting_once_in_the_parent(database_url: str) -> None:
    result = subprocess.run(
        [str(CLI), "worker", "no.such.module:registry", "--processes", "3"],
        cwd=REPO,
        env=cli_env({"DATABASE_URL": database_url}),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.count("cannot import 'no.such.module'") == 1


def test_the_module_runs_as_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_que", "worker", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0 and "--processes" in result.stdout
