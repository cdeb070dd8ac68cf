"""A worker process for ``tests/test_failures.py``, run from the repository root as
``python -m tests.crash_worker URL``: one :class:`~sqlalchemy_que.Worker` in burst mode on
queue ``crash``, whose ``Crash`` handler records its run in ``crash_runs`` (committed at once,
on a connection of its own) and then ends the process with ``os._exit(137)``, as an
out-of-memory kill would. Retry delays grow (1.5 s x n², well above the spread of a
process start on a loaded machine) and ``max_attempts`` is 3.
"""

from __future__ import annotations

import os
import sys

from sqlalchemy import create_engine, text

from sqlalchemy_que import JobContext, JobRegistry, Worker

RUNS = "crash_runs"
CREATE_RUNS = text(f"CREATE TABLE IF NOT EXISTS {RUNS} (job_id bigint, ran_at timestamptz)")
DROP_RUNS = text(f"DROP TABLE IF EXISTS {RUNS}")
READ_RUNS = text(f"SELECT ran_at FROM {RUNS} ORDER BY ran_at")

registry = JobRegistry()


def main(url: str) -> None:
    recorder = create_engine(url, isolation_level="AUTOCOMMIT")

    @registry.job("Crash", max_attempts=3, retry_delay=lambda n: 1.5 * n * n)
    def crash(job: JobContext) -> None:
        with recorder.connect() as connection:
            connection.execute(
                text(f"INSERT INTO {RUNS} VALUES (:job_id, clock_timestamp())"),
                {"job_id": job.job_id},
            )
        os._exit(137)

    engine = create_engine(url)
    Worker(engine, registry, queue="crash").run(burst=True)


if __name__ == "__main__":
    main(sys.argv[1])
