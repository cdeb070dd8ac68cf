"""Small helpers shared by the worker and locking tests."""

from __future__ import annotations

import datetime
import time
import uuid
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, make_url, text

from sqlalchemy_que import insert_job


def add_job(engine: Engine, job_class: str = "Job", *args: Any, **options: Any) -> int:
    """Insert and commit one job; return its job_id."""
    with engine.begin() as connection:
        return int(insert_job(connection, job_class, *args, **options))


def job_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        result = connection.execute(
            text(
                "SELECT priority, run_at, job_id, job_class, args::text AS args, error_count, "
                "last_error, queue, extract(epoch FROM run_at - now())::float AS run_in "
                "FROM que_jobs ORDER BY job_id"
            )
        )
        return [dict(row._mapping) for row in result]


def held_job_locks(engine: Engine) -> list[int]:
    """The job ids held as one-bigint advisory locks in this database, rebuilt as Que does."""
    with engine.connect() as connection:
        return list(
            connection.execute(
                text(
                    "SELECT (classid::bigint << 32) + objid::bigint FROM pg_locks "
                    "WHERE locktype = 'advisory' AND objsubid = 1 AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database()) "
                    "ORDER BY 1"
                )
            ).scalars()
        )


def database_outage(engine: Engine, database_url: str, *, down: bool) -> None:
    """Take the database of ``database_url`` down (it refuses new connections and its
    sessions are ended, as in an outage) or bring it back, through ``engine`` (connected to
    another database)."""
    database = make_url(database_url).database
    with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as connection:
        allow = "false" if down else "true"
        connection.execute(text(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {allow}'))
        if down:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": database},
            )


def past(seconds: float = 60) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)


def future(seconds: float = 3600) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)


def notifications(
    listener: psycopg.Connection[Any], channel: str, *, timeout: float = 30.0
) -> list[str]:
    """The payloads ``listener`` (LISTENing, in autocommit) got from every transaction
    committed before this call, and nothing else.

    No short wait is guessed: ``listener`` notifies a marker on ``channel`` itself, and
    PostgreSQL delivers notifications in the order their transactions committed, so every
    earlier one has arrived by the time the marker does (``timeout`` only bounds a hang).
    """
    marker = f"end of notifications {uuid.uuid4().hex}"
    # Collected by a handler: psycopg before 3.3 hands notifications that arrive while a
    # statement runs (the marker's own, say) to handlers only, never to notifies().
    received: list[str] = []

    def collect(notification: psycopg.Notify) -> None:
        if notification.channel == channel:
            received.append(notification.payload)

    listener.add_notify_handler(collect)
    try:
        listener.execute("SELECT pg_notify(%s, %s)", (channel, marker))
        deadline = time.monotonic() + timeout
        while marker not in received and (left := deadline - time.monotonic()) > 0:
            for _ in listener.notifies(timeout=min(left, 1.0)):  # reads; collect() keeps
                if marker in received:
                    break
    finally:
        listener.remove_notify_handler(collect)
    if marker in received:
        return received[: received.index(marker)]
    pytest.fail(f"the marker notified on {channel!r} did not arrive in {timeout}s")
