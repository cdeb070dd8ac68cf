"""The ceiling: our per-job SQL, run by pgbench (PostgreSQL's own C client).

Two custom pgbench scripts are built from the library's named statements, so that they follow
the worker when its SQL changes:

* the **cycle** a worker runs per job: the lock query (``locking.LOCK_NEXT_JOB``, with the
  queue written in as ``''``) captured with ``\\gset``; the re-check by full key
  (``locking.RECHECK_JOB``); ``BEGIN``, the ``DELETE`` by full key (``worker.DELETE_JOB``),
  ``COMMIT``; and the unlock (``locking.UNLOCK_JOB``). The re-check is wrapped in
  ``count(*)`` because pgbench's ``\\gset`` needs exactly one row: a job another client
  deleted after our lock query's snapshot is skipped, as the worker skips it, and is not
  counted as a job.
* the **insert** our enqueue does, one job per transaction.

pgbench runs with ``-n -M prepared -c C -j C -t T``. For the cycle, the table is refilled to
the drain's size before each client count and the clients share 90% of it (``T`` per client),
so the lock query always finds a job; jobs/s is the number of rows deleted over pgbench's own
duration (excluding connection set-up).
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
    "INSERT_SQL",
    "PgbenchResult",
    "cycle_script",
    "insert_script",
    "run_cycle",
    "run_insert",
]

#: The per-job cycle's statements in ``:name`` form (pgbench variables): the batched lock
#: statement asked for one job, and the statements about one job by its full key.
_LOCK_ONE = _sql.LOCK_JOBS.sql.decode().replace("$1", "''").replace("$2::int", "1")
_LOCK_ONE = _LOCK_ONE.replace("(found).run_at::text", "(found).run_at::text AS run_at_key")
_KEY = "queue = :queue AND priority = :priority AND run_at = :run_at_key AND job_id = :job_id"
RECHECK_SQL = f"SELECT 1 FROM que_jobs WHERE {_KEY}"
DELETE_SQL = f"DELETE FROM que_jobs WHERE {_KEY}"
UNLOCK_SQL = "SELECT pg_advisory_unlock(:job_id)"

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
