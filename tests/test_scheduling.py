"""Periodic jobs: each tick exactly once across pools, missed ticks, DST, the CLI."""

from __future__ import annotations

import datetime
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, text

from sqlalchemy_que import (
    InvalidJobError,
    JobContext,
    JobRegistry,
    Schedule,
    WorkerError,
    WorkerPool,
    cron,
    every,
    insert_job,
)
from sqlalchemy_que._cli import main
from sqlalchemy_que._scheduler import Scheduler
from sqlalchemy_que.admin import schedule_states

from .conftest import wait_for

UTC = datetime.timezone.utc
PARIS = ZoneInfo("Europe/Paris")


@pytest.fixture
def clean(engine: Engine) -> Iterator[Engine]:
    def wipe() -> None:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM sqlalchemy_que_schedule_ticks"))
            connection.execute(text("DELETE FROM sqlalchemy_que_unique_keys"))
            connection.execute(text("DELETE FROM que_jobs"))

    wipe()
    yield engine
    wipe()


def ticks(engine: Engine, schedule: str) -> list[tuple[datetime.datetime, int | None]]:
    with engine.connect() as connection:
        return [
            (row.tick, row.job_id)
            for row in connection.execute(
                text(
                    "SELECT tick, job_id FROM sqlalchemy_que_schedule_ticks "
                    "WHERE schedule = :s ORDER BY tick"
                ),
                {"s": schedule},
            )
        ]


def jobs(engine: Engine) -> list[tuple[int, str, str]]:
    with engine.connect() as connection:
        return [
            (row.job_id, row.job_class, row.args)
            for row in connection.execute(
                text("SELECT job_id, job_class, args::text AS args FROM que_jobs ORDER BY job_id")
            )
        ]


def at(
    year: int, month: int, day: int, hour: int, minute: int = 0, second: int = 0,
    micro: int = 0, *, tz: datetime.tzinfo = UTC,
) -> datetime.datetime:  # fmt: skip
    return datetime.datetime(year, month, day, hour, minute, second, micro, tz).astimezone(UTC)


def test_two_pools_and_a_cron_every_second_enqueue_each_tick_exactly_once(clean: Engine) -> None:
    worked: list[int] = []
    lock = threading.Lock()
    registry = JobRegistry()

    @registry.job("EverySecond", schedule=cron("* * * * * *"))
    def every_second(job: JobContext) -> None:
        with lock:
            worked.append(job.job_id)

    pools = [WorkerPool(clean, registry, workers=2, wake_interval=0.5) for _ in range(2)]
    for pool in pools:
        pool.start()
    try:
        wait_for(lambda: len(ticks(clean, "EverySecond")) >= 11, timeout=20, message="11 ticks")
    finally:
        for pool in pools:
            pool.shutdown(timeout=10)
    recorded = ticks(clean, "EverySecond")
    times = [tick for tick, _ in recorded]
    # Consecutive seconds, none missing, none twice; each with its own job.
    assert all(b - a == datetime.timedelta(seconds=1) for a, b in itertools.pairwise(times))
    assert all(tick.microsecond == 0 for tick in times)
    ids = [job_id for _, job_id in recorded if job_id is not None]
    assert len(ids) == len(recorded) and len(set(ids)) == len(ids)
    assert sum(pool.scheduler.enqueued for pool in pools if pool.scheduler) == len(recorded)
    wait_for(lambda: not jobs(clean), message="every tick's job to be worked")
    assert sorted(worked) == sorted(ids)  # each worked once


def test_schedulers_racing_on_one_tick_enqueue_it_once(clean: Engine) -> None:
    schedule = every(60).bound("Race")
    now = at(2026, 5, 1, 12, 0, 30)
    schedulers = [Scheduler(clean, [schedule]) for _ in range(8)]
    for scheduler in schedulers:
        scheduler.run_once(now - datetime.timedelta(seconds=45))  # first sight: nothing due
    barrier = threading.Barrier(8)

    def run(scheduler: Scheduler) -> None:
        barrier.wait(timeout=10)
        scheduler.run_once(now)

    threads = [threading.Thread(target=run, args=(s,)) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [tick for tick, _ in ticks(clean, "Race")] == [at(2026, 5, 1, 12, 0)]
    assert len(jobs(clean)) == 1
    assert sum(s.enqueued for s in schedulers) == 1


def test_a_new_schedule_does_not_back_fill(clean: Engine) -> None:
    scheduler = Scheduler(clean, [cron("0 * * * *").bound("Hourly")])
    # Nothing due; it sleeps at most a minute (to notice other pools' progress).
    assert scheduler.run_once(at(2026, 5, 1, 12, 30)) == pytest.approx(60, abs=0.01)
    assert scheduler.run_once(at(2026, 5, 1, 12, 59, 50)) == pytest.approx(10, abs=0.01)
    assert ticks(clean, "Hourly") == []
    scheduler.run_once(at(2026, 5, 1, 13, 0, 5))
    assert [t for t, _ in ticks(clean, "Hourly")] == [at(2026, 5, 1, 13)]


def seed(engine: Engine, schedule: str, tick: datetime.datetime) -> None:
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO sqlalchemy_que_schedule_ticks (schedule, tick) VALUES (:s, :t)"),
            {"s": schedule, "t": tick},
        )


@pytest.mark.parametrize("missed", ["skip", "latest"])
def test_missed_ticks_while_no_pool_ran(clean: Engine, missed: str) -> None:
    schedule = cron("0 * * * *", missed=missed, args=[missed]).bound("Report")  # type: ignore[arg-type]
    seed(clean, "Report", at(2026, 5, 1, 6))  # the last tick before every pool stopped
    scheduler = Scheduler(clean, [schedule])
    scheduler.run_once(at(2026, 5, 1, 12, 20))  # back 6 hours later: 07:00..12:00 missed
    recorded = ticks(clean, "Report")
    assert [t for t, _ in recorded] == [at(2026, 5, 1, 6), at(2026, 5, 1, 12)]
    if missed == "skip":
        assert recorded[1][1] is None and jobs(clean) == []  # recorded as skipped, no job
    else:
        assert recorded[1][1] is not None  # the latest missed tick, once
        assert [(c, a) for _, c, a in jobs(clean)] == [("Report", '["latest"]')]
    scheduler.run_once(at(2026, 5, 1, 12, 40))  # nothing new
    scheduler.run_once(at(2026, 5, 1, 13, 0, 30))  # the next tick, on time, under both
    assert [t for t, _ in ticks(clean, "Report")][-1] == at(2026, 5, 1, 13)
    assert len(jobs(clean)) == (2 if missed == "latest" else 1)


def test_late_ticks_within_grace_all_run(clean: Engine) -> None:
    seed(clean, "Often", at(2026, 5, 1, 12, 0, 0))
    scheduler = Scheduler(clean, [cron("* * * * * *", grace=5).bound("Often")])
    scheduler.run_once(at(2026, 5, 1, 12, 0, 10, 500_000))  # 10 s late: 6..10 on time
    assert [t.second for t, _ in ticks(clean, "Often")] == [0, 6, 7, 8, 9, 10]
    assert len(jobs(clean)) == 5


def step_through(
    engine: Engine, schedule: Schedule, start: datetime.datetime, hours: int
) -> list[datetime.datetime]:
    """A fixed clock walking 10 minutes at a time (plus 5 s, as a pool wakes after a tick)."""
    scheduler = Scheduler(engine, [schedule])
    for step in range(hours * 6 + 1):
        scheduler.run_once(start + datetime.timedelta(minutes=10 * step, seconds=5))
    return [tick for tick, job_id in ticks(engine, schedule.key) if job_id is not None]


def test_dst_spring_forward_in_paris(clean: Engine) -> None:
    # 2026-03-29: at 02:00 CET the clocks go to 03:00 CEST (01:00 UTC).
    start = at(2026, 3, 29, 0, 0, tz=PARIS)
    daily = step_through(clean, cron("30 2 * * *", timezone="Europe/Paris").bound("D"), start, 5)
    # 02:30 does not exist that day: the job runs as the skipped hour ends, at 03:00 CEST.
    assert daily == [at(2026, 3, 29, 3, 0, tz=PARIS)] == [at(2026, 3, 29, 1, 0)]
    hourly = step_through(clean, cron("0 * * * *", timezone="Europe/Paris").bound("H"), start, 5)
    assert [t.astimezone(PARIS).hour for t in hourly] == [1, 3, 4, 5, 6]  # no 02:00
    assert [t.hour for t in hourly] == [0, 1, 2, 3, 4]  # one hour of real time apart
    interval = step_through(clean, every(3600).bound("I"), start, 5)
    assert [t.hour for t in interval] == [0, 1, 2, 3, 4]  # elapsed time: unaffected


def test_dst_fall_back_in_paris(clean: Engine) -> None:
    # 2026-10-25: at 03:00 CEST the clocks go back to 02:00 CET (01:00 UTC).
    start = at(2026, 10, 25, 0, 0, tz=PARIS)
    daily = step_through(clean, cron("30 2 * * *", timezone="Europe/Paris").bound("D"), start, 6)
    assert daily == [at(2026, 10, 25, 0, 30)]  # 02:30 comes twice; the job runs once (CEST)
    hourly = step_through(clean, cron("0 * * * *", timezone="Europe/Paris").bound("H"), start, 6)
    # Every hour of real time: 02:00 local twice, once in each offset.
    assert [t.astimezone(PARIS).strftime("%H%z") for t in hourly] == [
        "01+0200",
        "02+0200",
        "02+0100",
        "03+0100",
        "04+0100",
        "05+0100",
    ]


def test_a_tick_whose_unique_key_is_held_is_skipped(clean: Engine) -> None:
    seed(clean, "Unique", at(2026, 5, 1, 11, 59))
    with clean.begin() as connection:
        holder = insert_job(connection, "Refresh", unique_key="refresh")
    scheduler = Scheduler(clean, [every(60, unique_key="refresh", name="Unique").bound("Refresh")])
    scheduler.run_once(at(2026, 5, 1, 12, 0, 1))
    assert ticks(clean, "Unique")[-1] == (at(2026, 5, 1, 12, 0), None)
    assert [job_id for job_id, _, _ in jobs(clean)] == [holder]


def test_changing_a_schedule_keeps_its_history(clean: Engine) -> None:
    seed(clean, "Report", at(2026, 5, 1, 12, 0))
    # Was hourly; now every 15 minutes: the next tick follows the last one recorded.
    scheduler = Scheduler(clean, [cron("*/15 * * * *").bound("Report")])
    scheduler.run_once(at(2026, 5, 1, 12, 15, 1))
    assert [t.minute for t, _ in ticks(clean, "Report")] == [0, 15]


def test_bad_schedules_are_refused_naming_the_value() -> None:
    registry = JobRegistry()

    @registry.job("Takes", schedule=cron("0 * * * *", args=[1]))
    def takes(job: JobContext, n: int) -> None: ...

    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: cron("61 * * * *"), r"bad cron expression '61 \* \* \* \*'"),
        (lambda: cron("0 0 30 2 *"), "Bad day-of-month"),
        (lambda: cron("* * * * *", timezone="Mars/Olympus"), "Mars/Olympus"),
        (lambda: cron("* * * * *", missed="all"), "'all'"),  # type: ignore[arg-type]
        (lambda: every(0), "at least a millisecond"),
        (lambda: every("5"), "'5'"),  # type: ignore[arg-type]
        (lambda: cron("* * * * *", args=[object()]), "object"),
        (lambda: Schedule(), "needs a cron expression or an interval"),
        (lambda: registry.schedule(takes, every(5), args=[1, 2]), "do not fit"),
        (lambda: registry.schedule("Takes", every(5)), "already has a schedule named 'Takes'"),
    ]
    for make, message in cases:
        with pytest.raises(InvalidJobError, match=message):
            make()

    with pytest.raises(InvalidJobError, match="'Wrong' do not fit: too many"):

        @registry.job("Wrong", schedule=cron("0 * * * *", args=[1, 2]))
        def wrong(job: JobContext) -> None: ...

    with pytest.raises(WorkerError, match="not a schedule"):
        Scheduler(None, [cron("* * * * *")])  # type: ignore[arg-type]


def test_schedule_states_and_the_cli(clean: Engine, database_url: str) -> None:
    from .schedule_handlers import registry

    seed(clean, "Ping", at(2026, 5, 1, 12, 0, 30))
    before = datetime.datetime.now(UTC)
    states = {state.name: state for state in schedule_states(clean, registry)}
    after = datetime.datetime.now(UTC)
    assert set(states) == {"Nightly", "Ping"}
    assert states["Ping"].last_tick == at(2026, 5, 1, 12, 0, 30)
    assert states["Ping"].last_job_id is None
    assert states["Nightly"].last_tick is None
    # The next tick after the moment schedule_states looked, wherever in its 30 s it fell.
    assert before < states["Ping"].next_tick <= after + datetime.timedelta(seconds=30)
    assert states["Nightly"].next_tick.astimezone(PARIS).strftime("%H:%M") in ("02:30", "03:00")

    runner = CliRunner()
    path = "tests.schedule_handlers:registry"
    result = runner.invoke(main, ["schedules", path, "--database-url", database_url])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "schedule", "job_class", "when", "missed", "last_tick", "last_job", "next_tick"
    ]  # fmt: skip
    assert any(
        line.startswith("Nightly") and "'30 2 * * *' (Europe/Paris)" in line for line in lines
    )
    assert any(line.startswith("Ping") and "2026-05-01T12:00:30+00:00" in line for line in lines)
    result = runner.invoke(main, ["schedules", path, "--json", "--database-url", database_url])
    assert result.exit_code == 0, result.output
    assert {entry["name"] for entry in json.loads(result.output)} == {"Nightly", "Ping"}


def test_a_failing_key_function_is_refused_when_the_scheduler_is_made(clean: Engine) -> None:
    registry = JobRegistry()

    @registry.job("Keyed", unique_key=lambda n: "", schedule=every(60, args=[1]))
    def keyed(job: JobContext, n: int) -> None: ...

    with pytest.raises(WorkerError, match="must return a non-empty str"):
        WorkerPool(clean, registry)


def test_flask_que_schedules_and_the_apps_pool_keep_every_schedule(
    clean: Engine, database_url: str
) -> None:
    import flask
    from flask_sqlalchemy import SQLAlchemy

    from sqlalchemy_que.flask import Que

    from .schedule_handlers import registry

    app = flask.Flask("schedules")
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    db = SQLAlchemy(app)
    que = Que(app, db=db, handlers=registry)
    pool = que.worker_pool(workers=1)
    assert pool.scheduler is not None
    assert sorted(pool.scheduler.schedules) == ["Nightly", "Ping"]
    result = app.test_cli_runner().invoke(args=["que", "schedules", "--json"])
    assert result.exit_code == 0, result.output
    assert {entry["name"] for entry in json.loads(result.output)} == {"Nightly", "Ping"}
    with app.app_context():
        db.engine.dispose()
