"""A worker process for the fault tests (``tests/test_faults.py``), run from the repository root
as ``python -m tests.proc_worker MODE --url URL --table TABLE [...]``.

Modes:

``burst``
    A :class:`~sqlalchemy_que.WorkerPool` in burst mode working ``Count`` jobs: each run
    inserts ``(job_id, worker)`` into ``TABLE`` (whose ``job_id`` is the primary key;
    ``worker`` is ``<pid>:<thread name>``) on a separate, autocommit connection, so that a
    second run of the same job raises and leaves it errored. The process touches
    ``--ready FILE``, then waits for a line on stdin before starting, so that several
    processes start working at the same moment.

``block``
    One :class:`~sqlalchemy_que.Worker` working ``Block`` jobs: the handler records
    ``(job_id, worker)`` in ``TABLE`` (committed at once), then blocks for ``--block-seconds``
    (the test kills the process long before) and raises if it was not killed.

The worker's own connections carry ``application_name`` ``--app-name`` (the recording
connections ``<app-name>-recorder``), so that the test can find their backends.
The process exits 0 when its workers ended normally, 3 when they did not end in time.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, text

from sqlalchemy_que import JobContext, Worker, WorkerPool

RECORD = "INSERT INTO {table} (job_id, worker) VALUES (:job_id, :worker)"


def _recorder(url: str, app_name: str, size: int) -> Engine:
    return create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        pool_size=size,
        connect_args={"application_name": f"{app_name}-recorder"},
    )


def _record(recorder: Engine, table: str, job_id: int) -> None:
    with recorder.connect() as connection:
        connection.execute(
            text(RECORD.format(table=table)),
            {"job_id": job_id, "worker": f"{os.getpid()}:{threading.current_thread().name}"},
        )


def _burst(args: argparse.Namespace) -> int:
    engine = create_engine(
        args.url,
        pool_size=args.workers,
        max_overflow=0,
        connect_args={"application_name": args.app_name},
    )
    recorder = _recorder(args.url, args.app_name, args.workers)

    def count(job: JobContext) -> None:
        _record(recorder, args.table, job.job_id)

    pool = WorkerPool(engine, {"Count": count}, workers=args.workers, wake_interval=0.05)
    with engine.connect() as connection:  # fail early, before the barrier, if unreachable
        connection.execute(text("SELECT 1"))
    Path(args.ready).touch()
    sys.stdin.readline()  # the barrier: every process starts when the test says so
    pool.start(burst=True)
    ended = pool.join(args.timeout)
    engine.dispose()
    recorder.dispose()
    return 0 if ended else 3


def _block(args: argparse.Namespace) -> int:
    engine = create_engine(
        args.url, pool_size=1, max_overflow=0, connect_args={"application_name": args.app_name}
    )
    recorder = _recorder(args.url, args.app_name, 1)
    never = threading.Event()

    def block(job: JobContext, *_args: object) -> None:
        _record(recorder, args.table, job.job_id)
        if not never.wait(args.block_seconds):
            raise TimeoutError(f"job {job.job_id} was not interrupted in {args.block_seconds}s")

    worker = Worker(engine, {"Block": block}, wake_interval=0.05, name="que-proc-worker")
    worker.run(burst=True)
    engine.dispose()
    recorder.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.proc_worker")
    parser.add_argument("mode", choices=["burst", "block"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--app-name", default="que-proc-worker")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--ready", help="burst: file to touch when ready to start")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--block-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    if not args.table.isidentifier():
        parser.error(f"--table must be a plain identifier, got {args.table!r}")
    logging.basicConfig(level=logging.WARNING, format="%(threadName)s %(levelname)s %(message)s")
    if args.mode == "burst":
        if not args.ready:
            parser.error("burst needs --ready")
        return _burst(args)
    return _block(args)


if __name__ == "__main__":
    sys.exit(main())
