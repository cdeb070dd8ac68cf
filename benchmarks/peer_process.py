"""One process of a peer queue's drain (see :mod:`benchmarks.peers`), through its own API.

Run from the repository root, with the database given by the libpq environment variables
(``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGDATABASE``...) and the peer's schema by
``PGQUEUER_SCHEMA`` (pgqueuer) or ``PGOPTIONS=-c search_path=...`` (procrastinate)::

    python -m benchmarks.peer_process pgqueuer enqueue --jobs N
    python -m benchmarks.peer_process pgqueuer work --managers M --batch-size K
    python -m benchmarks.peer_process procrastinate install
    python -m benchmarks.peer_process procrastinate enqueue --jobs N
    python -m benchmarks.peer_process procrastinate work --concurrency C

``enqueue`` adds N no-op jobs in one bulk call (pgqueuer's ``Queries.enqueue`` with lists,
procrastinate's ``batch_defer_async``). ``work`` connects, prints ``ready``, waits for a line
on stdin (the barrier of :mod:`benchmarks.barrier`), works until the queue is empty (pgqueuer:
M ``PgQueuer`` managers, one asyncpg connection each, ``run(batch_size=K,
mode=QueueExecutionMode.drain)``; procrastinate: ``App.run_worker_async(concurrency=C,
wait=False)``), then prints one line of JSON (seconds worked, CPU seconds since the release)
and exits at once. pgqueuer's (schema) install is its own ``pgq install`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

__all__ = ["ENTRYPOINT", "main"]

#: The pgqueuer entrypoint and the procrastinate task name of every peer job.
ENTRYPOINT = "bench_noop"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _released(work: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    """Announce readiness, wait for the release, run ``work`` and measure it."""
    print("ready", flush=True)
    sys.stdin.readline()  # blocks the loop on purpose: nothing else is due before the release
    cpu = _cpu_seconds()
    started = time.perf_counter()
    await work()
    return {"seconds": time.perf_counter() - started, "cpu_seconds": _cpu_seconds() - cpu}


# -- pgqueuer ----------------------------------------------------------------------------


async def _pgqueuer_enqueue(jobs: int) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    connection = await asyncpg.connect()
    try:
        await Queries(AsyncpgDriver(connection)).enqueue(
            [ENTRYPOINT] * jobs, [None] * jobs, [0] * jobs
        )
    finally:
        await connection.close()


async def _pgqueuer_work(managers: int, batch_size: int) -> dict[str, Any]:
    import asyncpg
    from pgqueuer import Job, PgQueuer
    from pgqueuer.types import QueueExecutionMode

    async def noop(job: Job) -> None:
        """Nothing, as our handler."""

    connections = [await asyncpg.connect() for _ in range(managers)]
    queuers = []
    for connection in connections:
        queuer = PgQueuer.from_asyncpg_connection(connection)
        queuer.entrypoint(ENTRYPOINT)(noop)
        queuers.append(queuer)

    async def work() -> None:
        await asyncio.gather(
            *(
                queuer.run(batch_size=batch_size, mode=QueueExecutionMode.drain)
                for queuer in queuers
            )
        )

    report = await _released(work)
    for connection in connections:
        await connection.close()
    return report


# -- procrastinate -----------------------------------------------------------------------


def _procrastinate_app(pool_size: int) -> Any:
    import procrastinate

    # The connector's pool reads the libpq environment (PGOPTIONS sets the schema).
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(min_size=pool_size, max_size=pool_size)
    )

    async def noop() -> None:
        """Nothing, as our handler (asynchronous, as concurrency needs)."""

    app.task(name=ENTRYPOINT)(noop)
    return app


async def _procrastinate_install() -> None:
    app = _procrastinate_app(1)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def _procrastinate_enqueue(jobs: int) -> None:
    app = _procrastinate_app(1)
    async with app.open_async():
        await app.tasks[ENTRYPOINT].batch_defer_async(*({} for _ in range(jobs)))


async def _procrastinate_work(concurrency: int) -> dict[str, Any]:
    # One connection per job running at once, one for the listener, one for the rest.
    app = _procrastinate_app(concurrency + 2)
    async with app.open_async():

        async def work() -> None:
            await app.run_worker_async(concurrency=concurrency, wait=False)

        return await _released(work)


# -- command line ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer_process")
    libraries = parser.add_subparsers(dest="library", required=True)
    for library in ("pgqueuer", "procrastinate"):
        actions = libraries.add_parser(library).add_subparsers(dest="action", required=True)
        if library == "procrastinate":
            actions.add_parser("install")
        actions.add_parser("enqueue").add_argument("--jobs", type=int, required=True)
        work = actions.add_parser("work")
        if library == "pgqueuer":
            work.add_argument("--managers", type=int, default=1)
            work.add_argument("--batch-size", type=int, required=True)
        else:
            work.add_argument("--concurrency", type=int, required=True)
    return parser


def _run(coroutine: Coroutine[Any, Any, Any], *, uvloop: bool = False) -> Any:
    """Run on the event loop the library's own command uses (``pgq`` runs on uvloop when it
    is installed; procrastinate's ``App.run_worker`` on asyncio's)."""
    if uvloop:
        try:
            import uvloop as uvloop_module
        except ImportError:
            pass
        else:
            return uvloop_module.run(coroutine)
    return asyncio.run(coroutine)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    report: dict[str, Any] | None = None
    if args.library == "pgqueuer":
        if args.action == "enqueue":
            _run(_pgqueuer_enqueue(args.jobs), uvloop=True)
        else:
            report = _run(_pgqueuer_work(args.managers, args.batch_size), uvloop=True)
    elif args.action == "install":
        _run(_procrastinate_install())
    elif args.action == "enqueue":
        _run(_procrastinate_enqueue(args.jobs))
    else:
        report = _run(_procrastinate_work(args.concurrency))
    if report is not None:
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    # Through the module's own name, not __main__, where procrastinate warns an App should
    # not live (its tasks would be registered under "__main__").
    from benchmarks.peer_process import main as module_main

    status = module_main()
    # As benchmarks.drain_process: skip the interpreter's teardown, no part of working jobs.
    sys.stdout.flush()
    os._exit(status)
