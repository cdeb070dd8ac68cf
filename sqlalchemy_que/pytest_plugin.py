"""A pytest plugin: a migrated PostgreSQL, a rolled-back connection per test, and drains.

Installed with the package but active only where a project opts in, with one of::

    pytest -p sqlalchemy_que.pytest_plugin
    # conftest.py (the top-level one)
    pytest_plugins = ["sqlalchemy_que.pytest_plugin"]
    # pytest.ini / pyproject.toml [tool.pytest.ini_options]
    que_plugin = true

Fixtures:

* ``que_database_url`` (session): ``--que-database-url``, else the ``que_database_url``
  ini value, else ``$QUE_TEST_DATABASE_URL``, else a throwaway PostgreSQL started for the
  session (:func:`sqlalchemy_que.testing.temporary_postgres`). Override it to use the
  application's own test database.
* ``que_engine`` (session): an Engine on it, with sqlalchemy-que's tables migrated.
* ``que_connection``: a Connection inside a transaction rolled back after the test.
* ``que_session``: a Session joined to ``que_connection`` (its ``commit()`` releases a
  savepoint; everything is rolled back after the test).
* ``que_handlers``: the handlers ``que_drain`` runs; override it in the conftest.
* ``que_drain``: ``que_drain(bind=None, *, handlers=None, **options)`` runs
  :func:`sqlalchemy_que.testing.drain` on ``bind`` (default ``que_connection``) with
  ``handlers`` (default the ``que_handlers`` fixture).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Protocol

import pytest
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.orm import Session

from ._drain import DatabaseBind, DrainReport, drain
from ._worker import Handlers
from .schema import migrate
from .testing import temporary_postgres

__all__ = [
    "Drain",
    "que_connection",
    "que_database_url",
    "que_drain",
    "que_engine",
    "que_handlers",
    "que_session",
]


class Drain(Protocol):
    """The ``que_drain`` fixture's callable."""

    def __call__(
        self, bind: DatabaseBind | None = None, *, handlers: Handlers | None = None, **options: Any
    ) -> DrainReport: ...


def _configured_url(config: pytest.Config) -> str | None:
    url = config.getoption("que_database_url", default=None)
    if not url:
        try:
            url = config.getini("que_database_url")
        except ValueError:  # the entry point's options are not loaded (plugin autoload off)
            url = None
    return str(url or os.environ.get("QUE_TEST_DATABASE_URL") or "") or None


@pytest.fixture(scope="session")
def que_database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of the PostgreSQL the tests use (see the module's documentation)."""
    url = _configured_url(request.config)
    if url is not None:
        yield url
        return
    with temporary_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def que_engine(que_database_url: str) -> Iterator[Engine]:
    """An Engine on ``que_database_url``, with sqlalchemy-que's tables migrated."""
    engine = create_engine(que_database_url)
    try:
        migrate(engine)
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def que_connection(que_engine: Engine) -> Iterator[Connection]:
    """A Connection in a transaction that is rolled back after the test."""
    with que_engine.connect() as connection:
        transaction = connection.begin()
        try:
            yield connection
        finally:
            if transaction.is_active:
                transaction.rollback()


@pytest.fixture
def que_session(que_connection: Connection) -> Iterator[Session]:
    """A Session joined to ``que_connection``'s transaction: its ``commit()`` releases a
    savepoint, and everything is rolled back after the test."""
    with Session(bind=que_connection, join_transaction_mode="create_savepoint") as session:
        yield session


@pytest.fixture
def que_handlers() -> Handlers:
    """The handlers ``que_drain`` runs by default: override this fixture."""
    pytest.fail(
        "que_drain needs handlers: define a que_handlers fixture in your conftest.py "
        "returning your JobRegistry (or pass que_drain(handlers=...))",
        pytrace=False,
    )


@pytest.fixture
def que_drain(request: pytest.FixtureRequest, que_connection: Connection) -> Drain:
    """Run the ready jobs on ``que_connection`` (or the given Connection or Session)."""

    def run(
        bind: DatabaseBind | None = None, *, handlers: Handlers | None = None, **options: Any
    ) -> DrainReport:
        chosen = handlers if handlers is not None else request.getfixturevalue("que_handlers")
        return drain(que_connection if bind is None else bind, chosen, **options)

    return run
