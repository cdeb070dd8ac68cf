"""Unique jobs: at most one job per key waiting or running, in a table of our own.

``insert_job(bind, job, *args, unique_key="invoice:42")`` writes the job only when no job
holding that key is still in ``que_jobs``; it returns None (and writes nothing) when one is.
Both steps are one statement in the caller's transaction:

1. claim the key in ``sqlalchemy_que_unique_keys`` (``INSERT ... ON CONFLICT DO UPDATE``),
   taking over a row whose job is gone from ``que_jobs``;
2. insert the job, with the ``job_id`` the claim drew from ``que_jobs_job_id_seq``, only if
   the claim succeeded.

**Release costs nothing.** A key is held exactly while its job's row is in ``que_jobs``; it
is never deleted when the job ends. Whatever removes the row (a worker's completion in any
language, a final failure that moves the job elsewhere, an operator's delete) releases the
key in the very transaction that removes the row, and a retry, which only updates the row,
keeps it. So the worker's completion path has no extra statement, and jobs without a unique
key cost nothing at all. The stale rows are overwritten at the key's next use.

**Finding the holder cheaply.** ``que_jobs`` has no index on ``job_id`` alone (its shape is
shared), so the row stores where the job sits in the primary key: queue, priority and the
``run_at`` it was enqueued with. A retry only moves ``run_at`` later, so the holder is found by
an index range scan from there; for a job that never failed that is one index probe.

**Races.** The primary key serialises concurrent claims of one key: a second enqueue waits
for the first one's transaction, then sees its outcome. The takeover of a stale row is a
compare-and-set on the ``job_id`` the statement's snapshot saw, so a takeover committed by
someone else meanwhile is never overwritten.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import TextClause, text

from ._checks import check_text
from ._tables import UNIQUE_KEYS

__all__ = ["check_unique_key", "unique_insert_statement"]

#: The longest unique key, in characters (it is a primary key: its index entry is limited).
MAX_UNIQUE_KEY_LENGTH = 500


def check_unique_key(value: object) -> str:
    """Return ``value`` if it can be a unique key: a non-empty str of at most 500 characters.

    :raises InvalidJobError: naming the value.
    """
    return check_text("unique_key", value, allow_empty=False, max_length=MAX_UNIQUE_KEY_LENGTH)


#: The run_at of the job and of its key's row, by how the caller gave it.
_RUN_AT = {
    "run_at": "CAST(:run_at AS timestamptz)",
    "run_in": "now() + CAST(:run_in AS bigint) * INTERVAL '1 microsecond'",
    None: "now()",
}


def unique_insert_statement(run_at: str | None, *, notify: bool) -> TextClause:
    """The claim-and-insert statement; ``run_at`` is ``"run_at"``, ``"run_in"`` or None (the
    database's ``now()``). Parameters: unique_key, job_class, args, queue, priority (both
    always given: the contract's defaults ``''`` and 100 when the caller gave none), the
    run_at or run_in, and channel and payload when ``notify``. Returns the new job_id, or
    no row when the key is held."""
    return _statement(run_at, notify)


def _build(run_at: str | None, notify: bool) -> TextClause:
    claim = f"""
WITH claim AS (
    INSERT INTO {UNIQUE_KEYS} AS u (unique_key, job_id, queue, priority, run_at)
    VALUES (CAST(:unique_key AS text), nextval('que_jobs_job_id_seq'),
            CAST(:queue AS text), CAST(:priority AS smallint), {_RUN_AT[run_at]})
    ON CONFLICT (unique_key) DO UPDATE
    SET job_id = EXCLUDED.job_id, queue = EXCLUDED.queue, priority = EXCLUDED.priority,
        run_at = EXCLUDED.run_at
    WHERE u.job_id = (
            SELECT seen.job_id FROM {UNIQUE_KEYS} AS seen
            WHERE seen.unique_key = CAST(:unique_key AS text))
      AND NOT EXISTS (
            SELECT FROM que_jobs AS j
            WHERE j.queue = u.queue AND j.priority = u.priority AND j.run_at >= u.run_at
              AND j.job_id = u.job_id)
    RETURNING u.job_id, u.queue, u.priority, u.run_at
), new_job AS (
    INSERT INTO que_jobs (job_id, queue, priority, run_at, job_class, args)
    SELECT claim.job_id, claim.queue, claim.priority, claim.run_at,
           CAST(:job_class AS text), CAST(:args AS json)
    FROM claim
    RETURNING job_id
)
"""
    if notify:
        return text(claim + "SELECT new_job.job_id, pg_notify(:channel, :payload) FROM new_job")
    return text(claim + "SELECT new_job.job_id FROM new_job")


_STATEMENTS: dict[tuple[str | None, bool], TextClause] = {}


def _statement(run_at: str | None, notify: bool) -> TextClause:
    # Built once per shape, so that SQLAlchemy's compiled cache serves every call.
    key = (run_at, notify)
    statement = _STATEMENTS.get(key)
    if statement is None:
        statement = _STATEMENTS[key] = _build(run_at, notify)
    return statement


def unique_parameters(values: dict[str, Any], unique_key: str) -> tuple[str | None, dict[str, Any]]:
    """The run_at form and the parameters of :func:`unique_insert_statement` for the column
    values of :func:`~sqlalchemy_que._enqueue.job_values` (run_in already in microseconds)."""
    form = "run_at" if "run_at" in values else "run_in" if "run_in" in values else None
    parameters = {
        "unique_key": unique_key,
        "job_class": values["job_class"],
        "args": values["args"],
        "queue": values.get("queue", ""),
        "priority": values.get("priority", 100),
    }
    if form is not None:
        parameters[form] = values[form]
    return form, parameters
