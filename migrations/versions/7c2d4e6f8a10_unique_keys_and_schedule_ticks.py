"""Tables of our own for unique jobs and periodic schedules; que_jobs is not touched.

Revision ID: 7c2d4e6f8a10
Revises: 5a1e0c3f9b21
Create Date: 2026-12-01

* ``sqlalchemy_que_unique_keys``: a unique key and the job that holds it;
* ``sqlalchemy_que_schedule_ticks``: each tick of each schedule, enqueued once.

Schedules themselves live in the application's code, not here: changing or removing one needs
no migration. The downgrade drops both tables (unique keys are then forgotten, and every
schedule starts afresh at its next tick).

Frozen: this file must not import the live model.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7c2d4e6f8a10"
down_revision: str | Sequence[str] | None = "5a1e0c3f9b21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sqlalchemy_que_unique_keys",
        sa.Column("unique_key", sa.Text(), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("run_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("unique_key", name="sqlalchemy_que_unique_keys_pkey"),
    )
    op.create_table(
        "sqlalchemy_que_schedule_ticks",
        sa.Column("schedule", sa.Text(), nullable=False),
        sa.Column("tick", sa.DateTime(timezone=True), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "enqueued_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.PrimaryKeyConstraint("schedule", "tick", name="sqlalchemy_que_schedule_ticks_pkey"),
    )


def downgrade() -> None:
    op.drop_table("sqlalchemy_que_schedule_ticks")
    op.drop_table("sqlalchemy_que_unique_keys")
