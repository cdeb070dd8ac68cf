"""Instant wake-up, the sending side: a ``NOTIFY`` in the enqueuing transaction.

Every form of enqueue (the ORM, :func:`~sqlalchemy_que.insert_job`,
:func:`~sqlalchemy_que.insert_jobs`) sends ``pg_notify(channel, payload)`` on the caller's
connection, inside the caller's transaction. PostgreSQL delivers it only when that transaction
commits, and never for a rollback. One notification is sent per transaction and queue (another
only when a later job of the same transaction is due earlier), so a transaction of a thousand
jobs is one notification, not a thousand.

Each queue has its own channel, derived from a hash of the queue's name, so any name is safe
(long, quoted, any script) and a listener hears only the queues it works::

    >>> channel_for("")
    'sqlalchemy_que_e3b0c44298fc1c14'

The payload is JSON: ``{"queue": <name>, "run_at": <epoch seconds or null for now>}``.
Nothing is added to ``que_jobs`` (no trigger): jobs inserted by Ruby Que, que-go or raw SQL send
no notification and are found by polling.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any

from sqlalchemy import Connection, event, inspect, text

from ._model import QueJob

__all__ = [
    "CANCEL_CHANNEL",
    "CHANNEL_PREFIX",
    "channel_for",
    "notify_job",
    "parse_payload",
    "pending_wakeup",
]

CHANNEL_PREFIX = "sqlalchemy_que_"

#: The channel that carries cancel requests: the payload is the job's id.
CANCEL_CHANNEL = "sqlalchemy_que_cancel"

_NOTIFY = text("SELECT pg_notify(:channel, :payload)")

#: PostgreSQL refuses payloads of 8000 bytes or more; the queue name is left out past this.
_MAX_PAYLOAD = 7900

_STATE_KEY = "sqlalchemy_que.notified"


def channel_for(queue: str) -> str:
    """The notification channel of ``queue``: a fixed prefix and 16 hex digits of its
    SHA-256, well within PostgreSQL's 63-byte identifier limit."""
    digest = hashlib.sha256(queue.encode("utf-8")).hexdigest()[:16]
    return f"{CHANNEL_PREFIX}{digest}"


def _payload(queue: str, run_at: float | None) -> str:
    payload = json.dumps({"queue": queue, "run_at": run_at}, ensure_ascii=False)
    if len(payload.encode("utf-8")) > _MAX_PAYLOAD:
        payload = json.dumps({"queue": None, "run_at": run_at})
    return payload


def parse_payload(payload: str) -> float | None:
    """The ``run_at`` (epoch seconds) of a notification, None meaning "ready now"."""
    try:
        value = json.loads(payload).get("run_at")
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None


def _epoch(run_at: datetime.datetime | None) -> float | None:
    return None if run_at is None else run_at.timestamp()


def pending_wakeup(
    connection: Connection, queue: str, run_at: datetime.datetime | None
) -> tuple[str, str] | None:
    """The ``(channel, payload)`` to notify for a job of ``queue`` due at ``run_at`` (None:
    now), or None when this transaction already announced one as early. The caller must
    send it in this transaction; it is counted as sent."""
    if getattr(connection.connection.driver_connection, "autocommit", False):
        # Every statement is a transaction of its own (an AUTOCOMMIT Engine): each job's
        # wake-up goes with it, since no later one shares its commit.
        return channel_for(queue), _payload(queue, _epoch(run_at))
    # Begin now if the caller's Connection has not yet (commit-as-you-go autobegins only at
    # the first statement): the state below belongs to this very transaction, or to the
    # innermost savepoint, since a savepoint rolled back takes its notifications with it.
    transaction = (
        connection.get_nested_transaction() or connection.get_transaction() or connection.begin()
    )
    due = _epoch(run_at)
    state = connection.info.get(_STATE_KEY)
    if state is None or state[0] is not transaction:
        state = (transaction, {})
        connection.info[_STATE_KEY] = state
    sent: dict[str, float | None] = state[1]
    if queue in sent:
        previous = sent[queue]
        if previous is None or (due is not None and due >= previous):
            return None  # an earlier (or as early) wake-up is already on its way
    sent[queue] = due
    return channel_for(queue), _payload(queue, due)


def notify_job(connection: Connection, queue: str, run_at: datetime.datetime | None) -> None:
    """Send the wake-up for a job of ``queue`` due at ``run_at`` (None: now) in the
    connection's transaction, unless this transaction already announced one as early."""
    wakeup = pending_wakeup(connection, queue, run_at)
    if wakeup is not None:
        channel, payload = wakeup
        connection.execute(_NOTIFY, {"channel": channel, "payload": payload})


@event.listens_for(QueJob, "after_insert")
def _notify_after_orm_insert(mapper: Any, connection: Connection, target: QueJob) -> None:
    # Read the loaded state only: touching an unloaded attribute would emit a query mid-flush.
    state = inspect(target).dict
    notify_job(connection, state.get("queue", ""), state.get("run_at"))
