"""What a unique enqueue costs against a plain one (docs/scheduling.md quotes its output).

::

    python -m benchmarks.unique                      # on a throwaway local server
    python -m benchmarks.unique --database-url URL --jobs 5000 --backlog 100000

Each form enqueues ``--jobs`` jobs, one per transaction (``insert_job`` then ``COMMIT``), on
one warmed-up connection, with ``--backlog`` other jobs waiting in the same queue and
priority (the held-key probe scans the primary key from the holder's ``run_at``), three
rounds each; the median round's time per job is printed:

* ``plain``: ``insert_job(connection, JOB)``;
* ``unique, new key``: a key never used before (the claim inserts a row);
* ``unique, key held``: the key's job is waiting: nothing inserted, None returned;
* ``unique, key free again``: the key's previous job is gone: its row is taken over.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from sqlalchemy import Connection, Engine, create_engine, text

import sqlalchemy_que
from sqlalchemy_que import insert_job, insert_many
from sqlalchemy_que.testing import temporary_postgres

JOB = "Bench::Unique"


def _reset(engine: Engine, backlog: int, prepare: Callable[[Connection], None] | None) -> None:
    """Empty both tables, take the form's keys, then add the backlog after them (so that a
    held key's job comes first in its queue, and a free key's probe scans the backlog)."""
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM que_jobs"))
        connection.execute(text("DELETE FROM sqlalchemy_que_unique_keys"))
        if prepare is not None:
            prepare(connection)
    with engine.begin() as connection:
        if backlog:
            insert_many(connection, JOB, ([n] for n in range(backlog)))
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("VACUUM ANALYZE que_jobs, sqlalchemy_que_unique_keys")
        )


def _round(
    engine: Engine, jobs: int, backlog: int, prepare: Callable[[Connection], None] | None,
    body: Callable[[Connection, int], object],
) -> float:  # fmt: skip
    _reset(engine, backlog, prepare)
    with engine.connect() as connection:
        for index in range(20):  # warm up: statements compiled and prepared
            body(connection, -1 - index)
            connection.rollback()
        started = time.perf_counter()
        for index in range(jobs):
            body(connection, index)
            connection.commit()
        return (time.perf_counter() - started) / jobs


def measure(engine: Engine, jobs: int, backlog: int) -> dict[str, float]:
    def plain(connection: Connection, index: int) -> object:
        return insert_job(connection, JOB, index)

    def new_key(connection: Connection, index: int) -> object:
        return insert_job(connection, JOB, index, unique_key=f"key:{index}")

    def held(connection: Connection, index: int) -> object:
        assert insert_job(connection, JOB, index, unique_key="held") is None or index < 0
        return None

    def hold(connection: Connection) -> None:
        insert_job(connection, JOB, unique_key="held")

    def stale(connection: Connection) -> None:
        for index in range(jobs):
            insert_job(connection, JOB, index, unique_key=f"stale:{index}")
        connection.execute(
            text(
                "DELETE FROM que_jobs "
                "WHERE job_id IN (SELECT job_id FROM sqlalchemy_que_unique_keys)"
            )
        )

    def free_again(connection: Connection, index: int) -> object:
        return insert_job(connection, JOB, index, unique_key=f"stale:{max(index, 0)}")

    forms: dict[
        str, tuple[Callable[[Connection], None] | None, Callable[[Connection, int], object]]
    ]
    forms = {
        "plain": (None, plain),
        "unique, new key": (None, new_key),
        "unique, key held": (hold, held),
        "unique, key free again": (stale, free_again),
    }
    return {
        name: statistics.median(_round(engine, jobs, backlog, prepare, body) for _ in range(3))
        for name, (prepare, body) in forms.items()
    }


def _report(engine: Engine, jobs: int, backlog: int) -> None:
    sqlalchemy_que.migrate(engine)
    with engine.connect() as connection:
        version = connection.execute(text("SHOW server_version")).scalar_one()
        fsync = connection.execute(text("SHOW fsync")).scalar_one()
        commit = connection.execute(text("SHOW synchronous_commit")).scalar_one()
    results = measure(engine, jobs, backlog)
    print(
        f"PostgreSQL {version} (fsync={fsync}, synchronous_commit={commit}); {jobs} jobs per "
        f"round, one per transaction, {backlog} jobs waiting; median of 3 rounds"
    )
    base = results["plain"]
    for name, seconds in results.items():
        print(f"  {name:<24} {seconds * 1e6:8.1f} us/job  {seconds / base:5.2f}x plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="default: a throwaway local server")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--backlog", type=int, default=10000)
    options = parser.parse_args()
    if options.database_url:
        engine = create_engine(options.database_url)
        try:
            _report(engine, options.jobs, options.backlog)
        finally:
            engine.dispose()
        return
    with temporary_postgres() as url:
        engine = create_engine(url)
        try:
            _report(engine, options.jobs, options.backlog)
        finally:
            engine.dispose()


if __name__ == "__main__":
    main()
