"""What one measurement is: wall time and CPU seconds of the client and of PostgreSQL.

A :class:`Snapshot` is taken before and after the timed work; their difference, with the
figure's own value (jobs/s, ms...), makes a :class:`Run`. A :class:`Figure` gathers the runs
of one thing measured and summarises them as median, min and max.

PostgreSQL's CPU is read from ``/proc`` (Linux, server on this machine): the user and system
time of every live process of the cluster (the postmaster and its children) plus what the
postmaster has collected from children that have exited (``cutime``/``cstime``), so that a
backend ending during the measurement is still counted.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

__all__ = ["Figure", "Run", "ServerCpu", "Snapshot", "take", "take_end"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or parentheses.
    return raw[raw.rindex(")") + 2 :].split()


class ServerCpu:
    """CPU seconds used so far by the PostgreSQL cluster whose postmaster is ``pid``."""

    # Indexes into the fields after the command name (field 3, state, is index 0).
    _STATE, _PPID, _UTIME, _STIME, _CUTIME, _CSTIME = 0, 1, 11, 12, 13, 14

    def __init__(self, pid: int) -> None:
        self.pid = pid

    @classmethod
    def from_data_directory(cls, data_directory: str) -> ServerCpu | None:
        """The cluster's meter, or None when its postmaster is not a process on this machine."""
        try:
            first_line = (Path(data_directory) / "postmaster.pid").read_text().split("\n")[0]
            pid = int(first_line)
        except (OSError, ValueError):
            return None
        meter = cls(pid)
        return meter if _stat_fields(pid) is not None else None

    def seconds(self) -> float:
        """The cluster's CPU seconds so far, once the reading has settled.

        A backend that has just exited can for a moment show in neither its own ``/proc``
        entry nor the postmaster's ``cutime`` (until the postmaster reaps it), so the
        reading is repeated until two readings 50 ms apart agree (for up to 2 s; a busy
        server's last reading is taken as it is).
        """
        previous = self._ticks()
        for _ in range(40):
            time.sleep(0.05)
            current = self._ticks()
            if current is not None and current == previous:
                break
            previous = current
        if current is None:
            raise RuntimeError(f"PostgreSQL (postmaster pid {self.pid}) kept a zombie child")
        return current / _CLOCK_TICKS

    def _ticks(self) -> int | None:
        postmaster = _stat_fields(self.pid)
        if postmaster is None:
            raise RuntimeError(f"the PostgreSQL postmaster (pid {self.pid}) is gone")
        ticks = sum(
            int(postmaster[i]) for i in (self._UTIME, self._STIME, self._CUTIME, self._CSTIME)
        )
        with os.scandir("/proc") as entries:  # closed on the early return too
            for entry in entries:
                if not entry.name.isdigit():
                    continue
                fields = _stat_fields(int(entry.name))
                if fields is None or int(fields[self._PPID]) != self.pid:
                    continue
                if fields[self._STATE] in ("Z", "X"):
                    return None
                ticks += int(fields[self._UTIME]) + int(fields[self._STIME])
        return ticks


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Clocks read at one moment: wall (perf_counter), this process's CPU, its reaped
    children's CPU, and the server's CPU (None when it cannot be read)."""

    wall: float
    cpu_self: float
    cpu_children: float
    cpu_server: float | None


def _rusage_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def take(server: ServerCpu | None) -> Snapshot:
    """Read every clock; the wall clock last, so that reading /proc is not timed at the start
    (and, taken again at the end, first)."""
    cpu_server = server.seconds() if server is not None else None
    cpu_self = _rusage_seconds(resource.RUSAGE_SELF)
    cpu_children = _rusage_seconds(resource.RUSAGE_CHILDREN)
    return Snapshot(time.perf_counter(), cpu_self, cpu_children, cpu_server)


def take_end(server: ServerCpu | None) -> Snapshot:
    """:func:`take` for the end of a measurement: the wall clock first."""
    wall = time.perf_counter()
    cpu_self = _rusage_seconds(resource.RUSAGE_SELF)
    cpu_children = _rusage_seconds(resource.RUSAGE_CHILDREN)
    cpu_server = server.seconds() if server is not None else None
    return Snapshot(wall, cpu_self, cpu_children, cpu_server)


@dataclasses.dataclass
class Run:
    """One run of one figure.

    :param value: what the figure measures (jobs/s, ms...).
    :param wall: the seconds the run's timed part took.
    :param cpu_client: CPU seconds of the client: this process, or the worker processes, or
        pgbench, whichever did the work.
    :param cpu_server: CPU seconds of PostgreSQL; None when it cannot be read.
    :param detail: anything else worth keeping in the JSON.
    """

    value: float
    wall: float
    cpu_client: float
    cpu_server: float | None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def between(
        cls,
        start: Snapshot,
        end: Snapshot,
        value: float,
        *,
        children: bool = False,
        detail: dict[str, Any] | None = None,
    ) -> Run:
        """A run timed from ``start`` to ``end``, the client being this process (or, with
        ``children``, the child processes reaped meanwhile)."""
        cpu_client = (
            end.cpu_children - start.cpu_children if children else end.cpu_self - start.cpu_self
        )
        cpu_server = (
            end.cpu_server - start.cpu_server
            if end.cpu_server is not None and start.cpu_server is not None
            else None
        )
        return cls(value, end.wall - start.wall, cpu_client, cpu_server, detail or {})


@dataclasses.dataclass
class Figure:
    """One thing measured, over several runs.

    :param key: a stable name (``drain.threads.4``), used in the JSON and for ceilings.
    :param label: the name printed in the table.
    :param unit: ``jobs/s``, ``ms``...
    :param ceiling: the key of the figure this one is compared with, if any.
    :param library: for a peer queue's figure, the peer library (``pgqueuer``...); None
        for ours and for the ceilings.
    """

    group: str
    key: str
    label: str
    unit: str
    ceiling: str | None = None
    library: str | None = None
    runs: list[Run] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(run.value for run in self.runs)

    @property
    def low(self) -> float:
        return min(run.value for run in self.runs)

    @property
    def high(self) -> float:
        return max(run.value for run in self.runs)

    def median_of(self, attribute: str) -> float | None:
        values = [getattr(run, attribute) for run in self.runs]
        present = [value for value in values if value is not None]
        return statistics.median(present) if present and len(present) == len(values) else None
