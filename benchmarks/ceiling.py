"""The ceiling: our per-job SQL, run by pgbench (PostgreSQL's own C client).

Two custom pgbench scripts are built from the library's named statements, so that they follow
the worker when its SQL changes:

* the **cycle** a worker runs per job: the lock statement (``_sql.LOCK_JOBS`` asked for one
  job, the queue written in as ``''``) captured with ``\\gset``; the re-check by full key;
  ``BEGIN``, the ``DELETE`` by full key, ``COMMIT``; and the unlock. The re-check is wrapped in
  ``count(*)`` because pgbench's ``\\gset`` needs exactly one row: a job another client
  deleted after our lock query's snapshot is skipped, as the worker skips it, and is not
  counted as a job.
* the **batched cycle** the batched worker core runs per batch of :data:`BATCH_SIZE` jobs:
  one statement locks up to that many ready jobs (:data:`BATCH_LOCK_SQL`, the same walk as
  the lock query, along the primary key with each visited row's lock tried once, skipping
  rows other sessions hold, until enough are locked), captured as arrays with ``\\gset``;
  ``BEGIN``, one ``DELETE`` of them all by full key, ``COMMIT``; and one statement that
  unlocks them all. This SQL is the suite's own (the library has no batched statement yet);
  before each run it is checked on the server to lock exactly the rows it returns, skipping
  a row another session holds (:func:`check_batch_lock`).
* the **insert** our enqueue does, one job per transaction.

pgbench runs with ``-n -M prepared -c C -j C -t T``. For the cycles, the table is refilled to
the drain's size before each client count and the clients share 90% of it (``T`` transactions
per client, of one job or of one batch each), so the lock query always finds jobs; jobs/s is
the number of rows deleted over pgbench's own duration (excluding connection set-up), which
is the transactions times the jobs each deleted.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from sqlalchemy_que import _sql

from .database import JOB_CLASS, BenchDatabase
from .measure import Run, take, take_end

__all__ = [
    "BATCH_CLIENTS",
    "BATCH_LOCK_SQL",
    "BATCH_SIZE",
    "CYCLE_CLIENTS",
    "INSERT_SQL",
    "PgbenchResult",
    "batch_script",
    "check_batch_lock",
    "cycle_script",
    "insert_script",
    "run_batch_cycle",
    "run_cycle",
    "run_insert",
]

#: The per-job cycle's statements in ``:name`` form (pgbench variables): the batched lock
#: statement asked for one job, and the statements about one job by its full key.
_LOCK_ONE = _sql.LOCK_JOBS.sql.decode().replace("$1", "''").replace("$2::int", "1")
_KEY = "queue = :queue AND priority = :priority AND run_at = :run_at_key AND job_id = :job_id"
RECHECK_SQL = f"SELECT 1 FROM que_jobs WHERE {_KEY}"
DELETE_SQL = f"DELETE FROM que_jobs WHERE {_KEY}"
UNLOCK_SQL = "SELECT pg_advisory_unlock(:job_id)"

#: The client counts of the per-job cycle.
CYCLE_CLIENTS = (1, 2, 4, 8)

#: The client counts of the batched cycle, and the jobs it locks per statement.
BATCH_CLIENTS = (1, 4)
BATCH_SIZE = 100

#: The prefix of the variables ``\gset`` captures from the locked row.
_PREFIX = "j_"

INSERT_SQL = (
    f"INSERT INTO que_jobs (job_class, args) VALUES ('{JOB_CLASS}', '[1]') RETURNING job_id"
)

#: The share of the refilled table the cycle's clients work, leaving the lock query a job to find.
_CYCLE_SHARE = 0.9

_BIND = re.compile(r"(?<![:\w]):(\w+)")


def _to_pgbench(sql: str) -> str:
    """Our ``:name`` bind parameters as pgbench variables of the captured row."""
    return _BIND.sub(lambda match: f":{_PREFIX}{match.group(1)}", sql.strip())


def cycle_script() -> str:
    """The pgbench script of one worker cycle (lock, re-check, delete, commit, unlock)."""
    lock = _LOCK_ONE.strip()
    if _BIND.search(lock) or "$" in lock:
        raise RuntimeError(f"the lock query has parameters left:\n{lock}")
    recheck = _to_pgbench(RECHECK_SQL)
    return "\n".join(
        [
            f"{lock} \\gset {_PREFIX}",
            f"SELECT count(*) AS {_PREFIX}found FROM ({recheck}) AS recheck \\gset",
            f"\\if :{_PREFIX}found",
            "BEGIN;",
            f"{_to_pgbench(DELETE_SQL)};",
            "COMMIT;",
            "\\endif",
            f"{_to_pgbench(UNLOCK_SQL)};",
            "",
        ]
    )


#: Lock up to :data:`BATCH_SIZE` ready jobs of the default queue in one statement and return
#: their keys as arrays (and their count). The recursive walk is the lock query's: each step
#: fetches the next ready row after the previous one along the primary key and tries its lock
#: once; PostgreSQL pulls the walk lazily, so it stops at the last lock the ``LIMIT`` needs.
BATCH_LOCK_SQL = f"""
WITH RECURSIVE candidates AS (
    SELECT (first_job).*, pg_try_advisory_lock((first_job).job_id) AS locked
    FROM (
        SELECT j AS first_job
        FROM que_jobs AS j
        WHERE j.queue = '' AND j.run_at <= now()
        ORDER BY j.priority, j.run_at, j.job_id
        LIMIT 1
    ) AS head
    UNION ALL (
        SELECT (next_job).*, pg_try_advisory_lock((next_job).job_id) AS locked
        FROM (
            SELECT (
                SELECT j
                FROM que_jobs AS j
                WHERE j.queue = '' AND j.run_at <= now()
                  AND (j.priority, j.run_at, j.job_id)
                      > (candidates.priority, candidates.run_at, candidates.job_id)
                ORDER BY j.priority, j.run_at, j.job_id
                LIMIT 1
            ) AS next_job
            FROM candidates
            WHERE candidates.job_id IS NOT NULL
            LIMIT 1
        ) AS step
    )
),
taken AS (
    SELECT priority, run_at, job_id, job_class, args, error_count
    FROM candidates
    WHERE locked
    LIMIT {BATCH_SIZE}
)
SELECT count(*) AS {_PREFIX}count,
       coalesce(array_agg(priority), '{{}}') AS {_PREFIX}priorities,
       coalesce(array_agg(run_at), '{{}}') AS {_PREFIX}run_ats,
       coalesce(array_agg(job_id), '{{}}') AS {_PREFIX}ids
FROM taken
""".strip()

#: Delete the locked jobs by full key, in one statement.
BATCH_DELETE_SQL = (
    "DELETE FROM que_jobs AS j "
    f"USING unnest(:{_PREFIX}priorities::smallint[], :{_PREFIX}run_ats::timestamptz[], "
    f":{_PREFIX}ids::bigint[]) AS k(priority, run_at, job_id) "
    "WHERE j.queue = '' AND j.priority = k.priority AND j.run_at = k.run_at "
    "AND j.job_id = k.job_id"
)

#: Unlock every job the lock statement took (also those another client deleted meanwhile).
BATCH_UNLOCK_SQL = (
    f"SELECT count(pg_advisory_unlock(id)) FROM unnest(:{_PREFIX}ids::bigint[]) AS id"
)


def batch_script() -> str:
    """The pgbench script of one batched cycle (lock up to :data:`BATCH_SIZE`, delete them,
    commit, unlock them)."""
    return "\n".join(
        [
            f"{BATCH_LOCK_SQL} \\gset",
            f"\\if :{_PREFIX}count",
            "BEGIN;",
            f"{BATCH_DELETE_SQL};",
            "COMMIT;",
            "\\endif",
            f"{BATCH_UNLOCK_SQL};",
            "",
        ]
    )


def check_batch_lock(database: BenchDatabase) -> dict[str, int]:
    """Prove :data:`BATCH_LOCK_SQL` honest on this server, on a table of ready jobs: with the
    second job in line held by another session, one run returns :data:`BATCH_SIZE` jobs, not
    the held one, and leaves exactly as many advisory locks on its session as it returned.
    Everything is unlocked again; no row is changed.

    :raises RuntimeError: when any of that does not hold.
    """
    # The lock is taken outside the subquery: in its select list, rows skipped by OFFSET
    # would be locked too.
    holder_sql = (
        "SELECT pg_try_advisory_lock(job_id), job_id FROM ("
        "SELECT job_id FROM que_jobs WHERE queue = '' "
        "ORDER BY priority, run_at, job_id OFFSET 1 LIMIT 1) AS second"
    )
    count_locks = (
        "SELECT count(*) FROM pg_locks "
        "WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted"
    )
    engine = database.engine(pool_size=2)
    try:
        with engine.connect() as holder, engine.connect() as walker:
            holder = holder.execution_options(isolation_level="AUTOCOMMIT")
            walker = walker.execution_options(isolation_level="AUTOCOMMIT")
            got, held = holder.exec_driver_sql(holder_sql).one()
            if not got:
                raise RuntimeError(f"could not take the lock of job {held} to check the walk")
            try:
                row = walker.exec_driver_sql(BATCH_LOCK_SQL).one()
                count, ids = int(row[0]), list(row[3])
                locks = int(walker.exec_driver_sql(count_locks).scalar_one())
                walker.exec_driver_sql("SELECT pg_advisory_unlock_all()")
            finally:
                holder.exec_driver_sql("SELECT pg_advisory_unlock_all()")
    finally:
        engine.dispose()
    problems = []
    if count != BATCH_SIZE or len(ids) != count:
        problems.append(f"it returned {count} jobs ({len(ids)} ids), not {BATCH_SIZE}")
    if held in ids:
        problems.append(f"it returned job {held}, which another session held")
    if locks != count:
        problems.append(f"its session held {locks} advisory locks for {count} jobs returned")
    if problems:
        raise RuntimeError("the batched lock statement is not honest: " + "; ".join(problems))
    return {"returned": count, "advisory_locks_held": locks, "skipped_held_job": held}


def insert_script(*, explicit: bool = False) -> str:
    """The pgbench script of one enqueue (one single-row INSERT per transaction); with
    ``explicit``, inside ``BEGIN``/``COMMIT``, the shape (and round trips) of an application
    transaction."""
    if explicit:
        return f"BEGIN;\n{INSERT_SQL};\nCOMMIT;\n"
    return f"{INSERT_SQL};\n"


class PgbenchResult:
    """What pgbench reported: transactions processed and failed, and tps without the
    connection set-up, from which its duration follows."""

    def __init__(self, output: str) -> None:
        self.output = output
        processed = re.search(r"number of transactions actually processed: (\d+)", output)
        tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", output)
        failed = re.search(r"number of failed transactions: (\d+)", output)
        if processed is None or tps is None:
            raise RuntimeError(f"could not read pgbench's output:\n{output}")
        self.processed = int(processed.group(1))
        self.tps = float(tps.group(1))
        self.failed = int(failed.group(1)) if failed else 0

    @property
    def duration(self) -> float:
        return self.processed / self.tps


def _pgbench(database: BenchDatabase, script: str, clients: int, transactions: int) -> str:
    with tempfile.TemporaryDirectory(prefix="que-bench-") as folder:
        path = Path(folder) / "script.sql"
        path.write_text(script)
        argv = [
            str(database.bindir / "pgbench"),
            "-n",
            "-M",
            "prepared",
            "-f",
            str(path),
            "-c",
            str(clients),
            "-j",
            str(clients),
            "-t",
            str(transactions),
        ]
        result = subprocess.run(
            argv, capture_output=True, text=True, env=database.libpq_environment(), check=False
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"pgbench failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


def run_cycle(database: BenchDatabase, *, clients: int, jobs: int) -> Run:
    """One pgbench run of the worker cycle at ``clients`` clients on ``jobs`` fresh jobs."""
    database.refill(jobs)
    per_client = int(jobs * _CYCLE_SHARE) // clients
    start = take(database.server_cpu)
    output = _pgbench(database, cycle_script(), clients, per_client)
    end = take_end(database.server_cpu)
    result = PgbenchResult(output)
    deleted = jobs - database.count()
    return Run.between(
        start,
        end,
        deleted / result.duration,
        children=True,
        detail={
            "clients": clients,
            "transactions": result.processed,
            "failed": result.failed,
            "jobs_deleted": deleted,
            "skipped_vanished": result.processed - deleted,
            "pgbench_seconds": result.duration,
            "tps": result.tps,
        },
    )


def run_batch_cycle(database: BenchDatabase, *, clients: int, jobs: int) -> Run:
    """One pgbench run of the batched cycle at ``clients`` clients on ``jobs`` fresh jobs
    (checked first with :func:`check_batch_lock`)."""
    database.refill(jobs)
    check = check_batch_lock(database)
    per_client = int(jobs * _CYCLE_SHARE) // (clients * BATCH_SIZE)
    if per_client < 1:
        raise RuntimeError(
            f"{jobs} jobs are too few for {clients} clients of {BATCH_SIZE}-job batches"
        )
    start = take(database.server_cpu)
    output = _pgbench(database, batch_script(), clients, per_client)
    end = take_end(database.server_cpu)
    result = PgbenchResult(output)
    deleted = jobs - database.count()
    return Run.between(
        start,
        end,
        deleted / result.duration,
        children=True,
        detail={
            "clients": clients,
            "batch_size": BATCH_SIZE,
            "transactions": result.processed,
            "failed": result.failed,
            "transactions_x_batch": result.processed * BATCH_SIZE,
            "jobs_deleted": deleted,
            "pgbench_seconds": result.duration,
            "tps": result.tps,
            "lock_check": check,
        },
    )


def run_insert(database: BenchDatabase, *, transactions: int, explicit: bool = False) -> Run:
    """One pgbench run of the single-row insert at one client (see :func:`insert_script`)."""
    database.truncate()
    start = take(database.server_cpu)
    output = _pgbench(database, insert_script(explicit=explicit), 1, transactions)
    end = take_end(database.server_cpu)
    result = PgbenchResult(output)
    inserted = database.count()
    if inserted != result.processed:
        raise RuntimeError(f"pgbench inserted {inserted} jobs, not {result.processed}")
    return Run.between(
        start,
        end,
        result.tps,
        children=True,
        detail={"transactions": result.processed, "pgbench_seconds": result.duration},
    )
