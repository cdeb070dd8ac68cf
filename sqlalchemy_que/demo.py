"""The quick-start demo behind ``sqlalchemy-que demo``.

It enqueues a few hundred sample jobs across two queues (some scheduled a few seconds ahead,
some failing once and then succeeding on retry), works them with one worker pool per queue
while showing progress, and prints the final stats and throughput. Without a database URL it
runs on a throwaway PostgreSQL started from the local server binaries; with one, it uses queue
names of its own and removes whatever it left::

    from sqlalchemy_que.demo import run_demo
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

from sqlalchemy import Engine, create_engine, delete, select, text
from sqlalchemy.engine import URL

from . import schema
from ._pool import WorkerPool
from .enqueue import enqueue, insert_jobs
from .jobs import JobContext, JobRegistry
from .model import QueJob
from .stats import job_stats
from .testing import temporary_postgres

__all__ = ["DemoResult", "run_demo"]

#: Seconds before a failed demo job is retried (Que's default would be 4).
RETRY_DELAY = 1.0


@dataclass
class DemoResult:
    """What the demo did: jobs worked, failures retried, and how long it took."""

    jobs: int
    completed: int = 0
    failures: int = 0
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


def _remaining(engine: Engine, queues: tuple[str, str]) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                select(text("count(*)")).select_from(QueJob).where(QueJob.queue.in_(queues))
            ).scalar_one()
        )


@contextlib.contextmanager
def _database(url: URL | None, echo: Callable[[str], object]) -> Iterator[tuple[URL | str, bool]]:
    if url is not None:
        yield url, False
        return
    echo("starting a throwaway PostgreSQL from the local server binaries...")
    with temporary_postgres() as temporary:
        yield temporary, True
    echo("throwaway PostgreSQL stopped and removed")


def run_demo(
    url: URL | None,
    *,
    jobs: int = 300,
    workers: int = 4,
    echo: Callable[[str], object] = print,
    timeout: float = 120.0,
) -> DemoResult:
    """Run the demo; return what it did.

    :param url: the database to use; None starts a throwaway PostgreSQL.
    :param jobs: how many sample jobs to enqueue.
    :param workers: worker threads per queue.
    :param echo: where progress lines go.
    :param timeout: give up (and clean up) after this many seconds.
    """
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
        engine = create_engine(database, pool_size=2 * workers + 2, pool_pre_ping=True)
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
            remaining, shown = jobs, (-1, -1)
            while remaining and time.perf_counter() < deadline:
                time.sleep(0.2)
                remaining = _remaining(engine, queues)
                if (result.completed, result.failures) == shown:
                    continue  # print progress only when it moves
                shown = (result.completed, result.failures)
                echo(
                    f"  {time.perf_counter() - started:5.1f}s  done {result.completed:4d}/{jobs}"
                    f"  still queued {remaining:4d}  failed once (to be retried) {result.failures}"
                )
            result.elapsed = time.perf_counter() - started
            for pool in pools:
                pool.shutdown(timeout=10)
            pools = []
            for row in job_stats(engine):
                if row.queue in queues:
                    echo(f"  left over: {row}")
            echo(
                f"done: {result.completed} jobs in {result.elapsed:.2f}s "
                f"({result.throughput:.0f} jobs/s, including {result.failures} retries after "
                f"{RETRY_DELAY:g}s and jobs scheduled 2-4s ahead); per queue: {result.by_queue}"
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
