"""Handlers for the ``sqlalchemy-que worker`` processes of ``tests/test_cli.py``, imported by the
command as ``tests.cli_handlers:registry`` (the repository root on ``PYTHONPATH``).

``CLI::Noop``
    Does nothing: the job is completed.

``CLI::Fail``
    Raises at once; with max_attempts=1 it is failed for good at its first run.

``CLI::Block`` ``(token, release_within)``
    Records ``(token, 'started')`` in :data:`EVENTS` on a connection of its own, committed at
    once, then waits for a ``(token, 'release')`` row that the test inserts. It returns when
    the row appears and raises :class:`TimeoutError` when none appears in ``release_within``
    seconds, so that a forgotten job never blocks a worker for ever.
"""

from __future__ import annotations

import time

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from sqlalchemy_que import JobContext, JobRegistry

#: The table the blocking handler and the test talk through; the test creates and drops it.
EVENTS = "cli_test_events"

CREATE_EVENTS = text(f"CREATE TABLE IF NOT EXISTS {EVENTS} (token text NOT NULL, event text)")
DROP_EVENTS = text(f"DROP TABLE IF EXISTS {EVENTS}")
RECORD_EVENT = text(f"INSERT INTO {EVENTS} (token, event) VALUES (:token, :event)")
HAS_EVENT = text(f"SELECT EXISTS (SELECT FROM {EVENTS} WHERE token = :token AND event = :event)")

registry = JobRegistry()


@registry.job("CLI::Noop")
def noop(job: JobContext, *args: object) -> None:
    """Complete at once."""


@registry.job("CLI::Block")
def block(job: JobContext, token: str, release_within: float) -> None:
    """Say "started", then wait (bounded) for the test to say "release"."""
    # A connection apart from the job's, in autocommit: the test sees "started" at once,
    # while the job's own transaction stays open.
    events = create_engine(
        job.connection.engine.url, poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        with events.connect() as connection:
            connection.execute(RECORD_EVENT, {"token": token, "event": "started"})
            deadline = time.monotonic() + release_within
            while not connection.execute(
                HAS_EVENT, {"token": token, "event": "release"}
            ).scalar_one():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job.job_id} was not released in {release_within}s")
                time.sleep(0.02)
    finally:
        events.dispose()


@registry.job("CLI::Fail", max_attempts=1)
def fail(job: JobContext, *args: object) -> None:
    """Fail for good at the first run."""
    raise ValueError("always fails")
