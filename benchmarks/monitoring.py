"""The cost of monitoring: a drain with Prometheus metrics on against the same drain with them off.

One run of a :class:`Pair` is two drains of the same number of pre-enqueued no-op jobs, back to
back, by the same :func:`benchmarks.drain.run_threads`: one plain, one with metrics installed
(in a registry of their own) and scraped every second while it drains. Which of the two goes
first alternates from run to run, so that neither side is favoured by the order (a warm cache,
a neighbour's load ramping up on the shared machine). The run's value is the metrics-on
drain's jobs/s as a percentage of the plain drain's; the figure is the median of the pairs,
each pair taken a few seconds apart, which a machine's drift over minutes hardly touches.
Each side's jobs/s and client CPU per job are kept in the run's detail, and a second figure
gives the client CPU per job that metrics add, in microseconds.

On a shared machine a drain's jobs/s and CPU swing by more than what metrics cost, so
:func:`code_path_cost` also times the worker's own per-job path for hooks on no-op jobs
without a database (its ``_run`` with a handler-and-completion step that does nothing, and
the metrics' count of each batch of 100): the CPU microseconds per job that metrics add.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any

from sqlalchemy import create_engine

from sqlalchemy_que import install_metrics
from sqlalchemy_que._hooks import TalliedRun, tally
from sqlalchemy_que._session import LockedJob, LockedSession
from sqlalchemy_que._worker import Worker

from .database import JOB_CLASS, BenchDatabase
from .drain import Drain
from .measure import Run

__all__ = ["PLAN", "Pair", "code_path_cost"]


@dataclasses.dataclass(frozen=True)
class Pair:
    """A drain measured with metrics off and on.

    :param drain: the drain, with metrics off (``metrics=False``).
    :param scale: the share of the group's job count this pair drains (per-job completion
        is ten times slower than batched: a smaller share keeps its runs as short).
    """

    drain: Drain
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.drain.metrics or self.drain.processes:
            raise ValueError(f"a pair's drain runs threads with metrics off, got {self.drain!r}")

    @property
    def key(self) -> str:
        return "monitoring" + self.drain.key[len("drain") :]

    @property
    def label(self) -> str:
        return f"metrics on vs off: {self.drain.label}"

    def measure(self, database: BenchDatabase, jobs: int, *, index: int) -> Run:
        """Run ``index`` of the pair: both drains, the plain one first for even indexes."""
        jobs = max(1, round(jobs * self.scale))
        plain = self.drain
        metered = dataclasses.replace(plain, metrics=True)
        order = (plain, metered) if index % 2 == 0 else (metered, plain)
        runs = {entry.metrics: entry.measure(database, jobs) for entry in order}
        off, on = runs[False], runs[True]
        cpu_server = (
            off.cpu_server + on.cpu_server
            if off.cpu_server is not None and on.cpu_server is not None
            else None
        )
        return Run(
            100.0 * on.value / off.value,
            off.wall + on.wall,
            off.cpu_client + on.cpu_client,
            cpu_server,
            detail={
                "jobs": jobs,
                "first": "on" if order[0].metrics else "off",
                "off": _side(off, jobs),
                "on": _side(on, jobs),
                "added_cpu_us_per_job": 1e6 * (on.cpu_client - off.cpu_client) / jobs,
            },
        )


def _side(run: Run, jobs: int) -> dict[str, Any]:
    return {
        "jobs_per_s": run.value,
        "wall": run.wall,
        "client_cpu_us_per_job": 1e6 * run.cpu_client / jobs,
        "left_behind": run.detail["left_behind"],
    }


#: The pairs measured: batched completion of no-op jobs, where a job costs the least and
#: monitoring the most in proportion, and the default per-job completion.
PLAN: tuple[Pair, ...] = (
    Pair(Drain(workers=4, completion="batch")),
    Pair(Drain(workers=1, completion="batch")),
    Pair(Drain(workers=4), scale=0.2),
)


class _NoOpWorker(Worker):
    """A worker whose jobs' handler and completion do nothing, to time what is around them."""

    def _run_job(
        self, session: LockedSession, job: LockedJob, buffered: list[LockedJob]
    ) -> tuple[Exception, float | None] | None:
        return None


def code_path_cost(*, batches: int = 300, repeats: int = 7) -> Run:
    """CPU microseconds per job that metrics add to the worker's path around a job: batches
    of 100 no-op jobs (``run_at`` in UTC) through ``Worker._run`` and the metrics' count,
    with metrics installed and without, in turns; the fastest of ``repeats`` each."""
    from prometheus_client import CollectorRegistry

    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/never-connected")
    worker = _NoOpWorker(engine, {JOB_CLASS: lambda job: None}, completion="batch")
    due = datetime.datetime.now(datetime.timezone.utc)
    jobs = [LockedJob("", 100, due, n, JOB_CLASS, "[]", 0, None) for n in range(100)]
    session: Any = None  # never used: the no-op _run_job does not touch it

    def per_job() -> float:
        started = time.thread_time()
        for _ in range(batches):
            tallied: list[TalliedRun] = []
            for job in jobs:
                worker._run(session, job, [], tallied)
            if tallied:
                tally(tallied)
        return 1e6 * (time.thread_time() - started) / (batches * len(jobs))

    timings: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for metrics in (False, True):
            installed = install_metrics(None, registry=CollectorRegistry()) if metrics else None
            try:
                timings[metrics].append(per_job())
            finally:
                if installed is not None:
                    installed.close()
    engine.dispose()
    off, on = min(timings[False]), min(timings[True])
    return Run(
        on - off,
        0.0,
        (sum(timings[False]) + sum(timings[True])) * batches * len(jobs) / 1e6,
        None,
        detail={"off_us_per_job": off, "on_us_per_job": on, "jobs": batches * len(jobs)},
    )
