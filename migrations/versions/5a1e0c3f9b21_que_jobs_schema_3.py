"""que_jobs at Que 0.x schema version 3; adopts a table Ruby Que or que-go already made.

Revision ID: 5a1e0c3f9b21
Revises:
Create Date: 2026-11-27

Online, the upgrade looks at what is there first:

* no ``que_jobs``: create it exactly as Que 0.14.3 leaves it (version 3), unless something
  already holds the name of its sequence, ``que_jobs_job_id_seq`` (a sequence left over from an
  earlier table, say): PostgreSQL would then name the new one ``que_jobs_job_id_seq1``, which
  Que's upgrade cannot find, so the upgrade refuses, naming it;
* ``que_jobs`` at version 3 (comment ``'3'``): adopt it as it is, touching no row;
* ``que_jobs`` at version 1 or 2 (no comment, or ``'2'``): bring it to 3 with Que's own steps;
* ``que_jobs`` of Que 1.x/2.x (comment ``'4'`` to ``'7'``): refuse, naming the version.

Offline (``--sql``) it can look at nothing, so it prints the ``CREATE TABLE``.

The downgrade drops the table, and refuses while it still holds jobs so that no committed job
is lost by a migration: delete them first (``sqlalchemy-que clear``).

Frozen: this file must not import the live model.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from sqlalchemy_que._errors import SchemaError, UnsupportedSchemaError

revision: str = "5a1e0c3f9b21"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("que",)
depends_on: str | Sequence[str] | None = None

CREATE_QUE_JOBS = """
CREATE TABLE que_jobs (
    priority    smallint    NOT NULL DEFAULT 100,
    run_at      timestamptz NOT NULL DEFAULT now(),
    job_id      bigserial   NOT NULL,
    job_class   text        NOT NULL,
    args        json        NOT NULL DEFAULT '[]'::json,
    error_count integer     NOT NULL DEFAULT 0,
    last_error  text,
    queue       text        NOT NULL DEFAULT '',
    CONSTRAINT que_jobs_pkey PRIMARY KEY (queue, priority, run_at, job_id)
)
"""

SET_VERSION_3 = "COMMENT ON TABLE que_jobs IS '3'"

# Que 0.x's own steps from versions 1 and 2 (facts of the shared schema, restated here).
QUE_STEP_TO_2 = "ALTER TABLE que_jobs ALTER COLUMN priority SET DEFAULT 100"
QUE_STEP_TO_3 = """
ALTER TABLE que_jobs
    DROP CONSTRAINT que_jobs_pkey,
    ALTER COLUMN priority TYPE smallint,
    ADD COLUMN queue text NOT NULL DEFAULT '',
    ADD CONSTRAINT que_jobs_pkey PRIMARY KEY (queue, priority, run_at, job_id)
"""

# What holds the name of the sequence that CREATE TABLE would make, in the schema it would
# make it in.
READ_SEQUENCE_NAME_HOLDER = """
SELECT c.relkind::text
FROM pg_class AS c
WHERE c.relname = 'que_jobs_job_id_seq' AND c.relnamespace = current_schema()::regnamespace
"""

RELATION_KINDS = {"S": "a sequence", "r": "a table", "v": "a view", "m": "a materialized view"}

READ_VERSION = """
SELECT obj_description(c.oid, 'pg_class')
FROM pg_class AS c
WHERE c.oid = to_regclass('que_jobs')
"""


def _installed_version(bind: sa.Connection) -> int | None:
    """The Que schema version of the existing ``que_jobs``, or None when there is none."""
    row = bind.execute(sa.text(READ_VERSION)).first()
    if row is None:
        return None
    comment = row[0]
    if comment is None:
        return 1  # Que's own rule: a table without a comment is version 1
    try:
        return int(comment)
    except ValueError:
        raise SchemaError(
            f"que_jobs exists with the table comment {comment!r}, which is not a Que schema "
            "version; this is not a table sqlalchemy-que can adopt"
        ) from None


def upgrade() -> None:
    if context.is_offline_mode():
        op.execute(CREATE_QUE_JOBS)
        op.execute(SET_VERSION_3)
        return
    bind = op.get_bind()
    version = _installed_version(bind)
    if version is None:
        holder = bind.execute(sa.text(READ_SEQUENCE_NAME_HOLDER)).scalar()
        if holder is not None:
            kind = RELATION_KINDS.get(holder, f"a relation (relkind {holder!r})")
            raise SchemaError(
                f"cannot create que_jobs: {kind} named que_jobs_job_id_seq already exists "
                "without that table, and Que's schema needs that name for the table's job_id "
                "sequence (PostgreSQL would name the new one que_jobs_job_id_seq1, which Que's "
                "upgrade cannot find). If it is left over from an earlier que_jobs and nothing "
                "uses it, drop it (DROP SEQUENCE que_jobs_job_id_seq); else rename it. Then "
                "migrate again"
            )
        op.execute(CREATE_QUE_JOBS)
    elif version == 3:
        return  # adopted as it is: no DDL, no row touched
    elif version == 1:
        op.execute(QUE_STEP_TO_2)
        op.execute(QUE_STEP_TO_3)
    elif version == 2:
        op.execute(QUE_STEP_TO_3)
    elif 4 <= version <= 7:
        raise UnsupportedSchemaError(
            f"que_jobs is at Que schema version {version} (Que 1.x/2.x), not version 3 "
            "(Que 0.x); sqlalchemy-que works Que 0.x tables only and will not change this one",
            version=version,
        )
    else:
        raise SchemaError(f"que_jobs is at unknown Que schema version {version}")
    op.execute(SET_VERSION_3)


def downgrade() -> None:
    if not context.is_offline_mode():
        bind = op.get_bind()
        # Lock first, so that no enqueue can commit a job between the count and the drop.
        bind.execute(sa.text("LOCK TABLE que_jobs IN ACCESS EXCLUSIVE MODE"))
        count = bind.execute(sa.text("SELECT count(*) FROM que_jobs")).scalar_one()
        if count:
            raise SchemaError(
                f"que_jobs still holds {count} job(s); refusing to drop them. Delete them "
                "first (sqlalchemy-que clear) if they are really to be thrown away"
            )
    op.execute("DROP TABLE que_jobs")
