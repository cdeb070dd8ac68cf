"""The pytest plugin, in a sample project that installs the built wheel: its fixtures work
when the project opts in (``-p``, an ini line, or ``pytest_plugins`` in a conftest), and
nothing of it is active otherwise, although the wheel registers it as a ``pytest11`` entry
point."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from .test_migrations import build_wheel, venv_with_the_wheel

JOBS = """
from sqlalchemy import text
from sqlalchemy_que import JobContext, JobRegistry, insert_job

jobs = JobRegistry()


@jobs.job("Greet")
def greet(job: JobContext, name: str) -> None:
    job.connection.execute(text("INSERT INTO greetings (name) VALUES (:n)"), {"n": name})
    if name == "ada":
        insert_job(job.connection, "Greet", "ada's friend")
"""

CONFTEST = """
import pytest
from sample_jobs import jobs


@pytest.fixture
def que_handlers():
    return jobs
"""

TESTS = """
import pathlib

import pytest
from sqlalchemy import text

import sqlalchemy_que
from sqlalchemy_que import enqueue, insert_job
from sqlalchemy_que.testing import assert_enqueued, enqueued


def greetings(connection):
    return list(connection.execute(text("SELECT name FROM greetings ORDER BY name")).scalars())


def test_a_drain_on_the_rolled_back_connection(que_connection, que_drain):
    pathlib.Path("imported-from.txt").write_text(sqlalchemy_que.__file__)
    que_connection.execute(text("CREATE TABLE greetings (name text)"))
    insert_job(que_connection, "Greet", "ada")
    assert_enqueued(que_connection, "Greet", args=["ada"])
    report = que_drain()
    assert [job.args for job in report.completed] == [["ada"], ["ada's friend"]]
    assert greetings(que_connection) == ["ada", "ada's friend"]
    assert enqueued(que_connection) == []


def test_the_previous_tests_work_was_rolled_back(que_connection):
    assert que_connection.execute(text("SELECT to_regclass('greetings')")).scalar() is None
    assert enqueued(que_connection) == []


def test_a_session_and_a_drain_of_it(que_session, que_drain):
    que_session.execute(text("CREATE TABLE greetings (name text)"))
    que_session.add(enqueue("Greet", "bob"))
    que_session.commit()  # a savepoint of the test's transaction
    assert que_drain(que_session).worked == 1
    assert greetings(que_session.connection()) == ["bob"]


def test_the_migrated_engine(que_engine):
    with que_engine.connect() as connection:
        assert sqlalchemy_que.schema.schema_version(connection) == 3
"""

MISSING_HANDLERS = """
def test_handlers_not_given(que_drain):
    que_drain()
"""


def project(root: Path, *, ini: str = "", conftest_extra: str = "") -> Path:
    root.mkdir()
    (root / "pytest.ini").write_text("[pytest]\n" + ini, encoding="utf-8")
    (root / "sample_jobs.py").write_text(JOBS, encoding="utf-8")
    (root / "conftest.py").write_text(conftest_extra + CONFTEST, encoding="utf-8")
    (root / "test_sample.py").write_text(TESTS, encoding="utf-8")
    return root


def run_pytest(python: Path, root: Path, *args: str, url: str | None) -> str:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.pop("QUE_TEST_DATABASE_URL", None)
    if url is not None:
        env["QUE_TEST_DATABASE_URL"] = url
    env["PYTHONPATH"] = str(root)  # the sample's own modules, as a project's rootdir
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return f"exit {result.returncode}\n{result.stdout}{result.stderr}"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_plugin_from_the_built_wheel_in_a_sample_project(
    tmp_path: Path, empty_database_url: str
) -> None:
    wheel = build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(
            archive.read(name).decode()
            for name in archive.namelist()
            if name.endswith(".dist-info/entry_points.txt")
        )
    assert "[pytest11]\nsqlalchemy_que = sqlalchemy_que._pytest_entry" in entry_points
    python = venv_with_the_wheel(tmp_path / "venv", wheel)

    # -p, and the URL given on the command line.
    with_p = project(tmp_path / "with-p")
    output = run_pytest(
        python,
        with_p,
        "-p",
        "sqlalchemy_que.pytest_plugin",
        f"--que-database-url={empty_database_url}",
        url=None,
    )
    assert "exit 0" in output and "4 passed" in output, output
    imported = Path((with_p / "imported-from.txt").read_text(encoding="utf-8"))
    assert imported.is_relative_to(tmp_path / "venv"), imported  # the wheel's copy

    # Not opted in: the entry point adds options only, no fixture.
    plain = project(tmp_path / "plain")
    output = run_pytest(python, plain, url=empty_database_url)
    assert "exit 1" in output and "fixture 'que_connection' not found" in output, output
    assert "--que-database-url" in run_pytest(python, plain, "--help", url=None)

    # An ini line, the URL from the environment; and the fixture a project must override.
    with_ini = project(tmp_path / "with-ini", ini="que_plugin = true\n")
    (with_ini / "conftest.py").write_text("", encoding="utf-8")
    (with_ini / "test_sample.py").write_text(MISSING_HANDLERS, encoding="utf-8")
    output = run_pytest(python, with_ini, url=empty_database_url)
    assert "exit 1" in output and "define a que_handlers fixture" in output, output

    # pytest_plugins in the conftest, and no URL at all: a throwaway server for the session.
    with_conftest = project(
        tmp_path / "with-conftest",
        conftest_extra='pytest_plugins = ["sqlalchemy_que.pytest_plugin"]\n',
    )
    output = run_pytest(python, with_conftest, url=None)
    assert "exit 0" in output and "4 passed" in output, output
