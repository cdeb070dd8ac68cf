"""Enqueueing the ticks of periodic schedules, each exactly once across every pool.

Every :class:`~sqlalchemy_que.WorkerPool` whose registry holds schedules runs a
:class:`Scheduler` thread beside its workers, on a connection of its own (made as the Engine
makes its connections, outside its pool, as the listener's is). At each pass it reads, in one
statement, the database clock and the last tick recorded for each schedule, works out the
ticks due since then (:meth:`~sqlalchemy_que.Schedule.due`), and enqueues each in a
transaction of its own:

1. ``INSERT INTO sqlalchemy_que_schedule_ticks (schedule, tick) ... ON CONFLICT DO NOTHING``:
   the primary key ``(schedule, tick)`` lets one pool win; a pool that loses (or waits for an
   uncommitted winner, then loses) enqueues nothing;
2. the job's ``INSERT`` (a unique one when the schedule has a key), and the job's id noted on
   the tick; then ``COMMIT``: the tick and its job, or neither.

Then it sleeps until the next tick of any schedule (at most a minute, so that it notices
another pool's progress). Times come from the database clock, so pools on hosts whose
clocks disagree still agree on which ticks are due. A tick skipped as missed is recorded
without a job, so that it is not considered again. Ticks older than a day are pruned, the
latest of each schedule always kept (the next tick is computed from it).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import InterfaceError, OperationalError

from ._enqueue import insert_job
from ._errors import WorkerError
from ._schedule import Schedule
from ._tables import SCHEDULE_TICKS

__all__ = ["ScheduleState", "Scheduler", "schedule_states"]

logger = logging.getLogger("sqlalchemy_que.scheduler")

_MAX_SLEEP = 60.0
_MAX_BACKOFF = 30.0
_KEEP = datetime.timedelta(days=1)
_PRUNE_EVERY = 3600.0

_READ_STATE = text(
    f"""
SELECT clock_timestamp() AS now, s.name,
       (SELECT max(t.tick) FROM {SCHEDULE_TICKS} AS t WHERE t.schedule = s.name) AS last_tick
FROM unnest(CAST(:names AS text[])) AS s(name)
"""
)

_READ_LAST = text(
    f"""
SELECT s.name, last.tick, last.job_id, last.enqueued_at
FROM unnest(CAST(:names AS text[])) AS s(name)
LEFT JOIN LATERAL (
    SELECT t.tick, t.job_id, t.enqueued_at FROM {SCHEDULE_TICKS} AS t
    WHERE t.schedule = s.name ORDER BY t.tick DESC LIMIT 1
) AS last ON true
"""
)

_CLAIM_TICK = text(
    f"INSERT INTO {SCHEDULE_TICKS} (schedule, tick) VALUES (:schedule, :tick) "
    "ON CONFLICT DO NOTHING RETURNING tick"
)

_NOTE_JOB = text(
    f"UPDATE {SCHEDULE_TICKS} SET job_id = :job_id WHERE schedule = :schedule AND tick = :tick"
)

_PRUNE = text(
    f"""
DELETE FROM {SCHEDULE_TICKS} AS t
WHERE t.schedule = ANY(CAST(:names AS text[])) AND t.tick < :before
  AND t.tick < (SELECT max(l.tick) FROM {SCHEDULE_TICKS} AS l WHERE l.schedule = t.schedule)
"""
)

_NOW = text("SELECT clock_timestamp()")


def check_schedules(schedules: Iterable[Schedule]) -> dict[str, Schedule]:
    """The schedules by name.

    :raises WorkerError: when two share a name, or one is attached to no job.
    """
    by_name: dict[str, Schedule] = {}
    for schedule in schedules:
        if not isinstance(schedule, Schedule) or schedule.job is None:
            raise WorkerError(f"{schedule!r} is not a schedule attached to a job")
        if schedule.key in by_name and by_name[schedule.key] != schedule:
            raise WorkerError(
                f"two schedules are named {schedule.key!r}; give one of them name=..."
            )
        _unique_key(schedule)  # a key function that fails does so now, not at every tick
        by_name[schedule.key] = schedule
    return by_name


def _unique_key(schedule: Schedule) -> str | None:
    if schedule.unique_key is not None:
        return schedule.unique_key
    key_function = getattr(schedule.job, "unique_key", None)
    if key_function is None:
        return None
    key = key_function(*schedule.args)
    if not isinstance(key, str) or not key:
        raise WorkerError(
            f"the unique_key function of job {schedule.job_class!r} returned {key!r} for the "
            f"arguments of schedule {schedule.key!r}; it must return a non-empty str"
        )
    return key


def enqueue_tick(connection: Connection, schedule: Schedule, tick: datetime.datetime) -> int | None:
    """Record ``tick`` of ``schedule`` and enqueue its job, in ``connection``'s transaction,
    unless the tick is already recorded (another pool enqueued it). Returns the job's id, or
    None when nothing was enqueued (the tick was taken, or its unique key is held)."""
    claimed = connection.execute(_CLAIM_TICK, {"schedule": schedule.key, "tick": tick}).first()
    if claimed is None:
        return None
    assert schedule.job is not None
    options: dict[str, Any] = {"queue": schedule.queue, "priority": schedule.priority}
    key = _unique_key(schedule)
    job_id: int | None
    if key is None:
        job_id = insert_job(connection, schedule.job, *schedule.args, **options)  # type: ignore[arg-type]
    else:
        job_id = insert_job(
            connection,
            schedule.job,  # type: ignore[arg-type]
            *schedule.args,
            unique_key=key,
            **options,
        )
    if job_id is not None:
        connection.execute(_NOTE_JOB, {"job_id": job_id, "schedule": schedule.key, "tick": tick})
    return job_id


class Scheduler:
    """Enqueues the ticks of ``schedules`` in a thread of its own.

    :param engine: whose URL, connection arguments and connect events its connection uses.
    :param schedules: the schedules to take part in.
    :param clock: where "now" comes from; default the database clock. Tests give a fixed one.
    """

    def __init__(
        self,
        engine: Engine,
        schedules: Iterable[Schedule],
        *,
        clock: Callable[[], datetime.datetime] | None = None,
        name: str = "que-scheduler",
    ) -> None:
        self.engine = engine
        self.schedules = check_schedules(schedules)
        self.clock = clock
        self.name = name
        self._first_seen: dict[str, datetime.datetime] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._own_engine: Engine | None = None
        self._pruned_at = 0.0
        #: How many ticks this scheduler enqueued (for tests and monitoring).
        self.enqueued = 0

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise WorkerError("this scheduler was already started")
        # Its own connection, made as the Engine makes them, never one the workers need.
        self._own_engine = create_engine(self.engine.url, pool=self.engine.pool.recreate())
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._own_engine is not None and (self._thread is None or not self._thread.is_alive()):
            self._own_engine.dispose()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                pause = self.run_once(engine=self._own_engine)
                backoff = 0.0
            except Exception as error:
                backoff = min(max(backoff * 2, 0.1), _MAX_BACKOFF)
                pause = backoff
                logger.warning(
                    "scheduler error, retrying in %.1fs: %s",
                    backoff,
                    error,
                    exc_info=True,
                    extra={"backoff": backoff},
                )
            self._stopping.wait(pause)

    # -- one pass ------------------------------------------------------------------------

    def run_once(
        self, now: datetime.datetime | None = None, *, engine: Engine | None = None
    ) -> float:
        """Enqueue every tick due now (``now``, else the clock, else the database's), and
        return how many seconds until the next tick of any schedule (at most 60)."""
        engine = engine or self.engine
        names = sorted(self.schedules)
        if not names:
            return _MAX_SLEEP
        with engine.begin() as connection:
            rows = connection.execute(_READ_STATE, {"names": names}).all()
        if now is None:
            now = self.clock() if self.clock is not None else rows[0].now
        assert now is not None
        last_ticks = {row.name: row.last_tick for row in rows}
        wait = _MAX_SLEEP
        for name in names:
            schedule = self.schedules[name]
            since = last_ticks.get(name) or self._first_seen.setdefault(name, now)
            try:
                latest = self._enqueue_due(engine, schedule, since, now)
            except (OperationalError, InterfaceError, OSError):
                raise  # the connection: the thread backs off and starts the pass again
            except Exception:
                # This schedule's job cannot be enqueued (say, a handler's arguments the
                # server refuses): the others go on; it is tried again in a second.
                logger.exception("schedule %s: cannot enqueue its tick", name)
                wait = min(wait, 1.0)
                continue
            upcoming = schedule.next_after(max(latest, now))
            wait = min(wait, (upcoming - now).total_seconds())
        if time.monotonic() - self._pruned_at > _PRUNE_EVERY:
            with engine.begin() as connection:
                connection.execute(_PRUNE, {"names": names, "before": now - _KEEP})
            self._pruned_at = time.monotonic()
        return max(wait, 0.0) + 0.001  # wake just after the tick, not just before it

    def _enqueue_due(
        self,
        engine: Engine,
        schedule: Schedule,
        since: datetime.datetime,
        now: datetime.datetime,
    ) -> datetime.datetime:
        """Enqueue (or record as skipped) the ticks of one schedule due since ``since``;
        return the latest tick it now knows of."""
        name = schedule.key
        ticks, skipped = schedule.due(since, now)
        for tick in ticks:
            with engine.begin() as connection:
                job_id = enqueue_tick(connection, schedule, tick)
            if job_id is not None:
                self.enqueued += 1
                logger.info(
                    "schedule %s: tick %s enqueued as job %s",
                    name,
                    tick.isoformat(),
                    job_id,
                    extra={"schedule": name, "tick": tick.isoformat(), "job_id": job_id},
                )
        if skipped is not None:
            with engine.begin() as connection:
                connection.execute(_CLAIM_TICK, {"schedule": name, "tick": skipped})
            logger.warning(
                "schedule %s: ticks up to %s were missed (no pool ran); skipped",
                name,
                skipped.isoformat(),
                extra={"schedule": name, "tick": skipped.isoformat()},
            )
        return max([since, *ticks, *([skipped] if skipped else [])])


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduleState:
    """A schedule as the ``schedules`` command shows it."""

    name: str
    job_class: str
    timing: str
    missed: str
    last_tick: datetime.datetime | None
    last_job_id: int | None
    next_tick: datetime.datetime


def schedule_states(
    bind: Engine | Connection, schedules: Iterable[Schedule] | Any
) -> list[ScheduleState]:
    """Each schedule with its last recorded tick (and the job it enqueued, None for a tick
    skipped) and its next tick by the database clock, sorted by name.

    :param schedules: schedules, or a :class:`~sqlalchemy_que.JobRegistry` (its schedules).
    """
    found = getattr(schedules, "schedules", schedules)
    by_name = check_schedules(found.values() if isinstance(found, dict) else found)
    names = sorted(by_name)
    if isinstance(bind, Engine):
        with bind.connect() as connection:
            return _states(connection, by_name, names)
    return _states(bind, by_name, names)


def _states(
    connection: Connection, by_name: dict[str, Schedule], names: Sequence[str]
) -> list[ScheduleState]:
    now = connection.execute(_NOW).scalar_one()
    rows = {row.name: row for row in connection.execute(_READ_LAST, {"names": list(names)})}
    states = []
    for name in names:
        schedule, row = by_name[name], rows[name]
        last = row.tick
        states.append(
            ScheduleState(
                name=name,
                job_class=schedule.job_class,
                timing=schedule.describe(),
                missed=schedule.missed,
                last_tick=last,
                last_job_id=row.job_id,
                next_tick=schedule.next_after(max(now, last) if last is not None else now),
            )
        )
    return states
