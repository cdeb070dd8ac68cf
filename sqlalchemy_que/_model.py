"""The ``que_jobs`` table, as Que 0.x (schema version 3) defines it.

:class:`QueJob` maps the table that Ruby Que 0.x and que-go share with this library. Its
columns, their order, defaults, primary key name, sequence name and table comment are part of a
cross-language contract, so the model is written out column by column rather than left to
conventions::

    from sqlalchemy_que import QueJob, enqueue

    with Session(engine) as session:
        session.add(enqueue("SendEmail", 42))
        session.commit()
        print(session.scalars(select(QueJob.job_class)).all())

The model lives on the library's own :data:`metadata`. An application with its own declarative
``Base`` and Alembic passes :func:`sqlalchemy_que.schema.include_object` to
``context.configure(include_object=...)``, so that autogenerate neither drops nor re-creates
the library's tables (``que_jobs``, our own ``que_failed_jobs`` and ``que_job_runs``, and the
version table); see ``docs/alembic.md``.
"""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ._json import CompactJSON

__all__ = [
    "FAILED_TABLE_NAME",
    "RUNS_TABLE_NAME",
    "SCHEMA_VERSION",
    "TABLE_NAME",
    "FailedJob",
    "QueJob",
    "metadata",
]

#: The Que 0.x schema version this library implements; stored as the table's comment.
SCHEMA_VERSION = 3

#: The table's name, shared with Ruby Que 0.x and que-go.
TABLE_NAME = "que_jobs"

#: Our own table of jobs failed for good (never read by Ruby Que or que-go).
FAILED_TABLE_NAME = "que_failed_jobs"

#: Our own table of crash marks: one row per job a worker of ours has started and not yet
#: recorded an outcome for.
RUNS_TABLE_NAME = "que_job_runs"

#: The metadata that holds :class:`QueJob`'s table and the library's own tables beside it
#: (failed jobs and crash marks here; unique keys and schedule ticks in
#: :mod:`sqlalchemy_que._tables`).
metadata = MetaData()


class _Base(DeclarativeBase):
    metadata = metadata


class QueJob(_Base):
    """One job in ``que_jobs``.

    Build instances with :func:`sqlalchemy_que.enqueue`, which validates every field; the
    constructor is still usable for the rare direct write. Unset fields take the database's
    defaults when the row is inserted: ``queue=''``, ``priority=100``, ``run_at=now()`` and
    ``args='[]'``.

    The primary key is ``(queue, priority, run_at, job_id)``, the order in which workers look
    for jobs. ``job_id`` comes from the sequence ``que_jobs_job_id_seq``.
    """

    __tablename__ = TABLE_NAME
    __table_args__ = (
        PrimaryKeyConstraint("queue", "priority", "run_at", "job_id", name="que_jobs_pkey"),
        {"comment": str(SCHEMA_VERSION)},
    )

    # Physical column order matters (Ruby's specs check ``SELECT *``): keep it as declared.
    priority: Mapped[int] = mapped_column(
        SmallInteger, nullable=False, server_default=text("100"), autoincrement=False
    )
    run_at: Mapped[datetime.datetime] = mapped_column(
        DateTime(timezone=True),  # timestamptz
        nullable=False,
        server_default=text("now()"),
    )
    job_id: Mapped[int] = mapped_column(BigInteger, nullable=False, autoincrement=True)
    job_class: Mapped[str] = mapped_column(Text, nullable=False)
    args: Mapped[list[Any]] = mapped_column(
        CompactJSON, nullable=False, server_default=text("'[]'::json")
    )
    error_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    queue: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("''"))

    def __repr__(self) -> str:
        return (
            f"<QueJob job_id={self.job_id!r} job_class={self.job_class!r} "
            f"queue={self.queue!r} priority={self.priority!r} run_at={self.run_at!r}>"
        )


class FailedJob(_Base):
    """A job failed for good: moved out of ``que_jobs``, in one transaction, after its last
    attempt (or a :class:`~sqlalchemy_que.FailJob`, a cancel, an unknown ``job_class`` at its
    last attempt). The columns of ``que_jobs``, then when and why it failed.

    Ruby Que and que-go never look at this table. :func:`sqlalchemy_que.admin.retry` moves a
    row back into ``que_jobs`` as a plain job, ``error_count`` 0.
    """

    __tablename__ = FAILED_TABLE_NAME
    __table_args__ = (Index("que_failed_jobs_failed_at", "failed_at"),)

    priority: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    run_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    job_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    job_class: Mapped[str] = mapped_column(Text, nullable=False)
    args: Mapped[list[Any]] = mapped_column(CompactJSON, nullable=False)
    error_count: Mapped[int] = mapped_column(Integer, nullable=False)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    queue: Mapped[str] = mapped_column(Text, nullable=False)
    #: When the job was failed for good.
    failed_at: Mapped[datetime.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("now()")
    )
    #: Why: ``error`` (attempts used up), ``crash``, ``timeout``, ``failed`` (FailJob),
    #: ``cancelled``.
    reason: Mapped[str] = mapped_column(Text, nullable=False)

    def __repr__(self) -> str:
        return (
            f"<FailedJob job_id={self.job_id!r} job_class={self.job_class!r} "
            f"queue={self.queue!r} reason={self.reason!r}>"
        )


class _JobRun(_Base):
    """A crash mark: written (batched with the lock's re-check) before a worker of ours runs
    a job's handler, deleted in the transaction that records the job's outcome. A mark found
    when a job is locked means that the run it records ended without an outcome: a crash."""

    __tablename__ = RUNS_TABLE_NAME

    job_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    started_at: Mapped[datetime.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("now()")
    )
    #: The backend pid of the worker session that started the run.
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
