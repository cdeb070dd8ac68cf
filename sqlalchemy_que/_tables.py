"""The tables of our own beside ``que_jobs``: unique keys and schedule ticks.

``que_jobs`` is shared with Ruby Que and que-go and never changes shape; what unique jobs and
periodic jobs need to remember lives here, in tables no other client reads. Both are on
:data:`sqlalchemy_que.metadata` (so that the migrations' head matches the model) and are
created by our Alembic revision ``7c2d4e6f8a10``.

* ``sqlalchemy_que_unique_keys``: one row per unique key ever taken, naming the job that took
  it. The key is held while that job is still in ``que_jobs``; see
  :mod:`sqlalchemy_que._unique`.
* ``sqlalchemy_que_schedule_ticks``: one row per schedule and tick, written in the same
  transaction as the tick's job; its primary key is what makes a tick enqueued once however
  many pools run. ``job_id`` is NULL for a tick that was skipped (missed, or its unique key
  was held).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, SmallInteger, Table, Text, text

from ._model import metadata

__all__ = ["SCHEDULE_TICKS", "UNIQUE_KEYS", "schedule_ticks", "unique_keys"]

UNIQUE_KEYS = "sqlalchemy_que_unique_keys"
SCHEDULE_TICKS = "sqlalchemy_que_schedule_ticks"

unique_keys = Table(
    UNIQUE_KEYS,
    metadata,
    Column("unique_key", Text, primary_key=True),
    # Where the job that took the key is found in que_jobs's primary key (its run_at when
    # it was enqueued: a retry only moves it later).
    Column("job_id", BigInteger, nullable=False),
    Column("queue", Text, nullable=False),
    Column("priority", SmallInteger, nullable=False),
    Column("run_at", DateTime(timezone=True), nullable=False),
)

schedule_ticks = Table(
    SCHEDULE_TICKS,
    metadata,
    Column("schedule", Text, primary_key=True),
    Column("tick", DateTime(timezone=True), primary_key=True),
    Column("job_id", BigInteger, nullable=True),
    Column(
        "enqueued_at",
        DateTime(timezone=True),
        nullable=False,
        server_default=text("now()"),
    ),
)
