"""One worker process of the multi-process drain (see :mod:`benchmarks.drain`).

Run as ``python -m benchmarks.drain_process --url URL --workers N [--options JSON]`` from the
repository root (``--options``: further WorkerPool keyword arguments, a JSON object).
It builds a burst WorkerPool of N threads, opens its connections, prints ``ready``, waits
for a line on stdin (the barrier), works until no job is ready, then prints one line of
JSON: how long it worked and the CPU seconds it used since its release, and exits at once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from sqlalchemy import create_engine

from sqlalchemy_que import WorkerPool

from .database import JOB_CLASS
from .drain import noop, open_connections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--options", type=json.loads, default={})
    args = parser.parse_args(argv)
    engine = create_engine(args.url, pool_size=args.workers + 2)
    open_connections(engine, args.workers)
    pool = WorkerPool(
        engine,
        {JOB_CLASS: noop},
        workers=args.workers,
        listen=False,
        check_schema=False,
        **args.options,
    )
    print("ready", flush=True)
    sys.stdin.readline()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    pool.start(burst=True)
    pool.join()
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    engine.dispose()
    print(json.dumps({"seconds": elapsed, "cpu_seconds": cpu}), flush=True)
    return 0


if __name__ == "__main__":
    status = main()
    # Everything is closed and reported: skip the interpreter's teardown (garbage-collecting
    # SQLAlchemy, Alembic...: 0.4 s on a slow machine), which is no part of working jobs.
    os._exit(status)
