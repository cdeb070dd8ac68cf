"""Throughput for the dashboard's chart, sampled from PostgreSQL's table statistics.

Que 0.x keeps no record of completed jobs: a job is done when its row is deleted. The
statistics collector counts the rows inserted into and deleted from ``que_jobs``
(``pg_stat_user_tables.n_tup_ins`` and ``n_tup_del``), across every client of the database
(Ruby's and Go's workers too). The dashboard reads those two counters at most every
``sample_seconds`` while someone looks at it, and keeps the last ``history_seconds`` of
samples in memory; the chart shows the rates between consecutive samples. Deleted rows are
completions, jobs failed for good (moved to ``que_failed_jobs``) and deletes by hand alike;
a retry is an update and is not counted. Backends report their counters about once a second,
so the newest point may lag by that much.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import threading
import time
from collections.abc import Callable

__all__ = ["Sampler"]

Counters = tuple[datetime.datetime, int, int]


class Sampler:
    """Samples of (time, rows inserted, rows deleted), one at most every ``sample_seconds``."""

    def __init__(self, *, sample_seconds: float, history_seconds: float) -> None:
        self.sample_seconds = sample_seconds
        self._samples: collections.deque[Counters] = collections.deque(
            maxlen=max(2, int(history_seconds / sample_seconds) + 1)
        )
        self._taken_at = -float("inf")
        self._lock = threading.Lock()

    def sample(self, read: Callable[[], Counters | None]) -> None:
        """Take a sample with ``read`` unless one was taken less than ``sample_seconds`` ago."""
        with self._lock:
            now = time.monotonic()
            if now - self._taken_at < self.sample_seconds:
                return
            self._taken_at = now
            counters = read()
            if counters is None:
                return
            if self._samples and (
                counters[1] < self._samples[-1][1] or counters[2] < self._samples[-1][2]
            ):
                self._samples.clear()  # the statistics were reset: start again
            self._samples.append(counters)

    def rates(self) -> dict[str, list[tuple[float, float]]]:
        """Rows inserted and deleted per second between consecutive samples, as
        (unix time in ms, rate) points."""
        with self._lock:
            samples = list(self._samples)
        enqueued: list[tuple[float, float]] = []
        done: list[tuple[float, float]] = []
        for (t0, ins0, del0), (t1, ins1, del1) in itertools.pairwise(samples):
            seconds = (t1 - t0).total_seconds()
            if seconds <= 0:
                continue
            x = t1.timestamp() * 1000
            enqueued.append((x, (ins1 - ins0) / seconds))
            done.append((x, (del1 - del0) / seconds))
        return {"enqueued": enqueued, "done": done}
