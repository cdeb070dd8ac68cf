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
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .database import BenchDatabase
from .drain import Drain
from .measure import Run

__all__ = ["PLAN", "Pair"]


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
