"""Declaring periodic jobs: a cron expression in a time zone, or a plain interval.

A :class:`Schedule` says when a job is enqueued and with which arguments; it is declared on a
job definition or in a registry, and every :class:`~sqlalchemy_que.WorkerPool` whose
registry holds it takes part in enqueueing its ticks (each exactly once, see
:mod:`sqlalchemy_que._scheduler`)::

    from sqlalchemy_que import JobRegistry, cron, every

    jobs = JobRegistry()

    @jobs.job("NightlyReport", schedule=cron("30 2 * * *", timezone="Europe/Paris"))
    def nightly_report(job): ...

    jobs.schedule("Ping", every(30), args=["hello"])   # a job_class handled anywhere

Cron expressions are parsed and evaluated by `cronsim <https://pypi.org/project/cronsim/>`_,
which matches Debian's cron, DST transitions included: a job due in the hour a spring
transition skips runs right after it; a job at a fixed time in the hour an autumn transition
repeats runs once; jobs that run every hour or more often run on their usual wall-clock
marks (so "every hour" runs once in the skipped hour's place, and twice in the repeated
hour). An optional sixth field, first, gives seconds (``"*/10 * * * * *"``). Intervals are
elapsed time, unaffected by DST: their ticks fall on whole multiples of the interval since
1970-01-01 UTC, so that every pool computes the same ticks.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Sequence
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ._checks import JobDefaults, check_job_class, check_priority, check_queue, check_text
from ._errors import InvalidJobError
from ._json import dump_args

__all__ = ["Missed", "Schedule", "cron", "every"]

#: What to do with the ticks that passed while no pool ran (more than ``grace`` late):
#: ``"skip"`` drops them; ``"latest"`` enqueues the latest of them, once.
Missed = Literal["skip", "latest"]

_UTC = datetime.timezone.utc
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=_UTC)
_ONE_MICROSECOND = datetime.timedelta(microseconds=1)

#: How late a tick may be enqueued and still count as on time, by default.
DEFAULT_GRACE = datetime.timedelta(seconds=60)


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """When to enqueue a job, and with what. Made by :func:`cron` or :func:`every`.

    A schedule is known by its ``name`` (default: its job's name), which keys its ticks in
    the database: renaming it starts it afresh; changing its timing keeps its history (the
    next tick is computed from the last one enqueued). Nothing about it is stored but its
    ticks, so changing or removing one needs no migration.
    """

    cron: str | None = None
    every: datetime.timedelta | None = None
    timezone: str = "UTC"
    args: tuple[Any, ...] = ()
    missed: Missed = "skip"
    grace: datetime.timedelta = DEFAULT_GRACE
    name: str | None = None
    queue: str | None = None
    priority: int | None = None
    unique_key: str | None = None
    job: str | JobDefaults | None = None

    def __post_init__(self) -> None:
        label = f"schedule {self.name!r}" if self.name else "a schedule"
        if (self.cron is None) == (self.every is None):
            raise InvalidJobError(f"{label} needs a cron expression or an interval (one of them)")
        if self.cron is not None:
            if not isinstance(self.cron, str):
                raise InvalidJobError(f"{label}: cron must be a str, got {self.cron!r}")
            try:
                next(CronSim(self.cron, datetime.datetime(2000, 1, 1, tzinfo=self.zone)))
            except CronSimError as error:
                raise InvalidJobError(
                    f"{label}: bad cron expression {self.cron!r}: {error}"
                ) from None
            except StopIteration:
                raise InvalidJobError(
                    f"{label}: the cron expression {self.cron!r} never matches"
                ) from None
        if self.every is not None and (
            not isinstance(self.every, datetime.timedelta) or self.every < _ONE_MICROSECOND * 1000
        ):
            raise InvalidJobError(
                f"{label}: the interval must be at least a millisecond, got {self.every!r}"
            )
        if self.missed not in ("skip", "latest"):
            raise InvalidJobError(
                f"{label}: missed must be 'skip' or 'latest', got {self.missed!r}"
            )
        if not isinstance(self.grace, datetime.timedelta) or self.grace < datetime.timedelta(0):
            raise InvalidJobError(f"{label}: grace must be a timedelta >= 0, got {self.grace!r}")
        if self.name is not None:
            check_text("a schedule's name", self.name, allow_empty=False)
        if self.queue is not None:
            check_queue(self.queue)
        if self.priority is not None:
            check_priority(self.priority)
        if self.unique_key is not None:
            check_text("unique_key", self.unique_key, allow_empty=False)
        if isinstance(self.job, str):
            check_job_class(self.job)
        dump_args(self.args)  # refuse arguments no job could carry, now rather than per tick

    @property
    def zone(self) -> datetime.tzinfo:
        """The time zone the cron expression is read in."""
        if self.timezone == "UTC":
            return _UTC
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise InvalidJobError(
                f"unknown time zone {self.timezone!r} (an IANA name such as 'Europe/Paris')"
            ) from None

    @property
    def job_class(self) -> str:
        """The ``job_class`` its ticks enqueue."""
        if self.job is None:
            raise InvalidJobError("this schedule is not attached to a job yet")
        return self.job if isinstance(self.job, str) else self.job.name

    @property
    def key(self) -> str:
        """The name its ticks are recorded under."""
        return self.name if self.name is not None else self.job_class

    def describe(self) -> str:
        """The timing, as the ``schedules`` command shows it."""
        if self.cron is not None:
            return f"cron {self.cron!r} ({self.timezone})"
        assert self.every is not None
        return f"every {self.every.total_seconds():g}s"

    def bound(self, job: str | JobDefaults) -> Schedule:
        """A copy attached to ``job`` (a job_class or a definition)."""
        if self.job is not None and self.job is not job:
            raise InvalidJobError(f"schedule {self.key!r} is already attached to {self.job!r}")
        return dataclasses.replace(self, job=job)

    # -- ticks ---------------------------------------------------------------------------

    def next_after(self, moment: datetime.datetime) -> datetime.datetime:
        """The first tick strictly after ``moment`` (UTC)."""
        if self.every is not None:
            step = _micros(self.every)
            count = _micros(moment - _EPOCH) // step + 1
            return _EPOCH + datetime.timedelta(microseconds=count * step)
        assert self.cron is not None
        return next(CronSim(self.cron, moment.astimezone(self.zone))).astimezone(_UTC)

    def latest_at_or_before(self, moment: datetime.datetime) -> datetime.datetime | None:
        """The last tick at or before ``moment`` (UTC), None if there is none in 50 years."""
        if self.every is not None:
            step = _micros(self.every)
            count = _micros(moment - _EPOCH) // step
            return _EPOCH + datetime.timedelta(microseconds=count * step)
        assert self.cron is not None
        try:
            found = next(
                CronSim(self.cron, (moment + _ONE_MICROSECOND).astimezone(self.zone), reverse=True)
            )
        except StopIteration:
            return None
        return found.astimezone(_UTC)

    def due(
        self, since: datetime.datetime, now: datetime.datetime
    ) -> tuple[list[datetime.datetime], datetime.datetime | None]:
        """The ticks after ``since`` and at or before ``now``: those to enqueue (on time, or
        the latest missed one with ``missed="latest"`` when none is on time), and the latest
        tick skipped for being missed (None when none was)."""
        early = now - self.grace - _ONE_MICROSECOND  # the ticks up to here are missed
        missed = self.latest_at_or_before(early)
        if missed is not None and missed <= since:
            missed = None
        on_time: list[datetime.datetime] = []
        tick = self.next_after(max(since, early))
        while tick <= now:
            on_time.append(tick)
            tick = self.next_after(tick)
        if on_time or missed is None:
            return on_time, None  # the missed ticks, if any, are covered by the on-time ones
        if self.missed == "latest":
            return [missed], None
        return [], missed


def _micros(delta: datetime.timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _seconds(value: object, what: str) -> datetime.timedelta:
    if isinstance(value, datetime.timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidJobError(f"{what} must be a timedelta or a number of seconds, got {value!r}")
    return datetime.timedelta(seconds=value)


def cron(
    expression: str,
    *,
    timezone: str = "UTC",
    args: Sequence[Any] = (),
    missed: Missed = "skip",
    grace: datetime.timedelta | float = DEFAULT_GRACE,
    name: str | None = None,
    queue: str | None = None,
    priority: int | None = None,
    unique_key: str | None = None,
) -> Schedule:
    """A schedule from a cron expression.

    :param expression: five fields (minute hour day-of-month month day-of-week), or six with
        seconds first; names (``MON``, ``JAN``), ranges, steps, ``L`` and ``MON#2`` work.
    :param timezone: the IANA time zone the expression is read in; default ``"UTC"``.
    :param args: the job's positional arguments at every tick; default none.
    :param missed: ``"skip"`` (default) or ``"latest"``: what to do with ticks more than
        ``grace`` late, which passed while no pool ran.
    :param grace: how late a tick may be enqueued and still count as on time (a timedelta or
        seconds); default 60 seconds.
    :param name: the name its ticks are recorded under; default the job's name.
    :param queue: the queue to enqueue in; default the job definition's, else ``''``.
    :param priority: the priority to enqueue with; default the definition's, else 100.
    :param unique_key: enqueue as a unique job with this key (a tick whose key is held by a
        job still waiting or running is skipped); a definition's own ``unique_key`` function
        is used when this is not given.
    :raises InvalidJobError: naming the bad value (a bad expression or time zone...).
    """
    return Schedule(
        cron=expression,
        timezone=timezone,
        args=tuple(args),
        missed=missed,
        grace=_seconds(grace, "grace"),
        name=name,
        queue=queue,
        priority=priority,
        unique_key=unique_key,
    )


def every(
    interval: datetime.timedelta | float,
    *,
    args: Sequence[Any] = (),
    missed: Missed = "skip",
    grace: datetime.timedelta | float | None = None,
    name: str | None = None,
    queue: str | None = None,
    priority: int | None = None,
    unique_key: str | None = None,
) -> Schedule:
    """A schedule every ``interval`` (a timedelta, or seconds), on whole multiples of it
    since 1970-01-01 UTC. ``grace`` defaults to the interval or 60 seconds, whichever is
    shorter; the other parameters are as for :func:`cron`.

    :raises InvalidJobError: naming the bad value.
    """
    step = _seconds(interval, "interval")
    return Schedule(
        every=step,
        args=tuple(args),
        missed=missed,
        grace=min(step, DEFAULT_GRACE) if grace is None else _seconds(grace, "grace"),
        name=name,
        queue=queue,
        priority=priority,
        unique_key=unique_key,
    )
