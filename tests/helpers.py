"""Small helpers shared by the worker and locking tests."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text

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
    listener.execute("SELECT pg_notify(%s, %s)", (channel, marker))
    payloads: list[str] = []
    for notification in listener.notifies(timeout=timeout):
        if notification.payload == marker:
            return payloads
        payloads.append(notification.payload)
    pytest.fail(f"the marker notified on {channel!r} did not arrive in {timeout}s")
