"""Our own tables for failed jobs and crash marks; que_jobs is not touched.

Revision ID: b7d41c2e8f05
Revises: 7c2d4e6f8a10
Create Date: 2026-12-01

* ``que_failed_jobs``: jobs failed for good, moved out of ``que_jobs`` in one transaction
  (the columns of ``que_jobs``, then ``failed_at`` and ``reason``), keyed by ``job_id``;
* ``que_job_runs``: one crash mark per job a worker of ours has started and not finished.

Ruby Que and que-go never read either table, and nothing about ``que_jobs`` changes.
The downgrade refuses while ``que_failed_jobs`` holds jobs (retry or purge them first), so
that no job is lost by a migration; crash marks are only bookkeeping and go with their table.

Frozen: this file must not import the live model.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from sqlalchemy_que._errors import SchemaError

revision: str = "b7d41c2e8f05"
down_revision: str | Sequence[str] | None = "7c2d4e6f8a10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CREATE_FAILED_JOBS = """
CREATE TABLE que_failed_jobs (
    priority    smallint    NOT NULL,
    run_at      timestamptz NOT NULL,
    job_id      bigint      NOT NULL,
    job_class   text        NOT NULL,
    args        json        NOT NULL,
    error_count integer     NOT NULL,
    last_error  text,
    queue       text        NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    reason      text        NOT NULL,
    CONSTRAINT que_failed_jobs_pkey PRIMARY KEY (job_id)
)
"""

CREATE_FAILED_AT_INDEX = "CREATE INDEX que_failed_jobs_failed_at ON que_failed_jobs (failed_at)"

CREATE_JOB_RUNS = """
CREATE TABLE que_job_runs (
    job_id     bigint      NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    pid        integer     NOT NULL,
    CONSTRAINT que_job_runs_pkey PRIMARY KEY (job_id)
)
"""


def upgrade() -> None:
    op.execute(CREATE_FAILED_JOBS)
    op.execute(CREATE_FAILED_AT_INDEX)
    op.execute(CREATE_JOB_RUNS)


def downgrade() -> None:
    if not context.is_offline_mode():
        bind = op.get_bind()
        bind.execute(sa.text("LOCK TABLE que_failed_jobs IN ACCESS EXCLUSIVE MODE"))
        count = bind.execute(sa.text("SELECT count(*) FROM que_failed_jobs")).scalar_one()
        if count:
            raise SchemaError(
                f"que_failed_jobs still holds {count} failed job(s); refusing to drop them. "
                "Retry them (sqlalchemy-que retry) or purge them (sqlalchemy-que "
                "purge-failed --older-than 0) first"
            )
    op.execute("DROP TABLE que_job_runs")
    op.execute("DROP TABLE que_failed_jobs")
