"""Prometheus metrics, read from a real scrape of the HTTP endpoint on 127.0.0.1."""

from __future__ import annotations

import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, text

from sqlalchemy_que import (
    ConfigurationError,
    JobContext,
    QueMetrics,
    Worker,
    WorkerPool,
    _hooks,
    enqueue,
    insert_jobs,
    install_metrics,
    locked_job,
)

from .conftest import wait_for
from .helpers import add_job, future, job_rows, past
from .test_cli import background_worker


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        body = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


@pytest.fixture
def metrics(engine: Engine) -> Iterator[QueMetrics]:
    installed = install_metrics(engine, registry=CollectorRegistry(), refresh_seconds=3600)
    yield installed
    installed.close()
    assert _hooks.active == ()


def handler(job: JobContext, *args: Any) -> None:
    if args == ("fail",):
        raise ValueError("no")


def labels(queue: str, job_class: str) -> tuple[tuple[str, str], ...]:
    return (("job_class", job_class), ("queue", queue))


def test_counters_and_histograms_count_the_runs(engine: Engine, metrics: QueMetrics) -> None:
    port = metrics.serve(0)
    add_job(engine, "Ok", run_at=past(20), queue="q")
    add_job(engine, "Ok", queue="q")
    bad = add_job(engine, "Bad", "fail", queue="q")
    with engine.begin() as connection:  # a job that failed twice before: this run is a retry
        connection.execute(
            text("UPDATE que_jobs SET error_count = 2 WHERE job_id = :id"), {"id": bad}
        )
    worker = Worker(engine, {"Ok": handler, "Bad": handler}, queue="q")
    assert worker.work_one()
    assert worker.work_one() and worker.work_one()
    samples = scrape(port)
    assert samples[("que_jobs_completed_total", labels("q", "Ok"))] == 2
    assert samples[("que_jobs_failed_total", labels("q", "Bad"))] == 1
    assert samples[("que_jobs_retried_total", labels("q", "Bad"))] == 1
    assert ("que_jobs_retried_total", labels("q", "Ok")) not in samples or samples[
        ("que_jobs_retried_total", labels("q", "Ok"))
    ] == 0
    assert samples[("que_job_run_seconds_count", labels("q", "Ok"))] == 2
    # The job whose run_at was 20 s ago waited at least 20 s; none waited an hour.
    wait_le = {
        dict(key[1]).get("le"): value
        for key, value in samples.items()
        if key[0] == "que_job_wait_seconds_bucket" and dict(key[1])["job_class"] == "Ok"
    }
    assert wait_le["10.0"] <= 1 and wait_le["30.0"] == 2 and wait_le["+Inf"] == 2
    assert len(job_rows(engine)) == 1  # the failed one, rescheduled


def test_queue_gauges_come_from_one_query_per_refresh(engine: Engine, metrics: QueMetrics) -> None:
    port = metrics.serve(0)
    add_job(engine, "A", run_at=past(100), queue="gauges")
    add_job(engine, "A", queue="gauges")
    add_job(engine, "A", queue="gauges")
    add_job(engine, "A", run_at=future(), queue="gauges")
    with locked_job(engine, queue="gauges") as lock:
        assert lock is not None
        samples = scrape(port)
        for _ in range(3):
            scrape(port)
    gauge = {
        name: samples[(name, (("queue", "gauges"),))]
        for name in ("que_jobs_ready", "que_jobs_scheduled", "que_jobs_working")
    }
    assert gauge == {"que_jobs_ready": 2, "que_jobs_scheduled": 1, "que_jobs_working": 1}
    # The oldest job (100 s late) is the one locked; the oldest ready one is younger.
    assert 0 <= samples[("que_oldest_ready_job_age_seconds", (("queue", "gauges"),))] < 100
    assert metrics.queries == 1  # four scrapes, one query (refresh_seconds is an hour)


def test_worker_busy_and_idle(engine: Engine, metrics: QueMetrics) -> None:
    import threading

    started, release = threading.Event(), threading.Event()

    def slow(job: JobContext) -> None:
        started.set()
        release.wait(10)

    pool = WorkerPool(engine, {"Slow": slow}, queue="busy", workers=2, listen=False)
    metrics.track([pool])
    port = metrics.serve(0)
    add_job(engine, "Slow", queue="busy")
    pool.start()
    try:
        assert started.wait(10)
        samples = scrape(port)
        assert samples[("que_workers", (("state", "busy"),))] == 1
        assert samples[("que_workers", (("state", "idle"),))] == 1
    finally:
        release.set()
        pool.shutdown(10)


def test_a_bad_refresh_interval_is_refused(engine: Engine) -> None:
    with pytest.raises(ConfigurationError, match=r"refresh_seconds.*-1"):
        install_metrics(engine, registry=CollectorRegistry(), refresh_seconds=-1)
    assert _hooks.active == ()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.slow
def test_the_worker_command_serves_metrics(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    add_job(engine, "CLI::Noop")
    args = ("--wake-interval", "0.1", "--database-url", database_url)
    with background_worker(tmp_path, *args, "--metrics-port", str(port)) as worker:
        wait_for(lambda: job_rows(engine) == [], timeout=20, message="the job to be worked")

        def scraped() -> dict[Any, float] | None:
            try:
                return scrape(port)
            except OSError:
                return None

        wait_for(lambda: scraped() is not None, timeout=20, message="the metrics endpoint")
        samples = scraped()
        assert samples is not None
        assert samples[("que_jobs_completed_total", labels("", "CLI::Noop"))] == 1
        assert samples[("que_workers", (("state", "idle"),))] == 4
        worker.send(signal.SIGTERM)
        assert worker.wait() == 0, worker.stderr


def test_metrics_with_several_processes_are_refused(database_url: str) -> None:
    from .test_cli import run_cli

    result = run_cli(
        "worker",
        "tests.cli_handlers:registry",
        "--processes",
        "2",
        "--metrics-port",
        "9999",
        "--database-url",
        database_url,
    )
    assert result.returncode != 0
    assert "--processes 2" in result.stderr


def test_the_flask_extension_serves_metrics_on_a_route(
    engine: Engine, database_url: str, metrics: QueMetrics
) -> None:
    import threading

    from flask import Flask, abort, request
    from flask_sqlalchemy import SQLAlchemy
    from werkzeug.serving import make_server

    from sqlalchemy_que.flask import Que

    app = Flask("metrics_app")
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    db = SQLAlchemy(app)
    que = Que(app, db=db, handlers={})
    que.add_metrics_route(metrics, rule="/internal/metrics", app=app)

    @app.before_request
    def authenticate() -> None:
        if request.headers.get("Authorization") != "Bearer s3cret":
            abort(401)

    add_job(engine, "Ok", queue="flask")
    assert Worker(engine, {"Ok": handler}, queue="flask").work_one()
    server = make_server("127.0.0.1", 0, app)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/internal/metrics"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(url, timeout=10)
        asked = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(asked, timeout=10) as response:  # noqa: S310 (http)
            assert response.headers["Content-Type"].startswith("text/plain")
            body = response.read().decode()
    finally:
        server.shutdown()
        thread.join(10)
        with app.app_context():
            db.engine.dispose()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    assert samples[("que_jobs_completed_total", labels("flask", "Ok"))] == 1


def test_batched_completion_counts_every_run_beside_a_per_run_hook(
    engine: Engine, metrics: QueMetrics
) -> None:
    from sqlalchemy_que import JobHook, JobOutcome, JobRun, add_job_hook, remove_job_hook

    class Outcomes(JobHook):
        def __init__(self) -> None:
            self.seen: list[str] = []

        def after(self, run: JobRun, outcome: JobOutcome) -> None:
            self.seen.append(outcome.outcome)

    port = metrics.serve(0)
    with engine.begin() as connection:
        insert_jobs(connection, [enqueue("Ok", n, queue="b") for n in range(40)])
        insert_jobs(connection, [enqueue("Bad", "fail", queue="b") for _ in range(3)])
    retry = add_job(engine, "Ok", run_at=past(20), queue="b")
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE que_jobs SET error_count = 1 WHERE job_id = :id"), {"id": retry}
        )
    outcomes = Outcomes()
    add_job_hook(outcomes)
    try:
        worker = Worker(engine, {"Ok": handler, "Bad": handler}, queue="b", completion="batch")
        assert worker.run(burst=True) == 44
    finally:
        remove_job_hook(outcomes)
    assert sorted(outcomes.seen) == ["done"] * 41 + ["failed"] * 3
    samples = scrape(port)
    assert samples[("que_jobs_completed_total", labels("b", "Ok"))] == 41
    assert samples[("que_jobs_failed_total", labels("b", "Bad"))] == 3
    assert samples[("que_jobs_retried_total", labels("b", "Ok"))] == 1
    assert samples[("que_job_run_seconds_count", labels("b", "Ok"))] == 41
    assert samples[("que_job_wait_seconds_count", labels("b", "Bad"))] == 3
    waited = samples[("que_job_wait_seconds_sum", labels("b", "Ok"))]
    assert 20 <= waited < 20 + 41 * 60  # the retry's 20 s, and each other job's own wait


@pytest.mark.parametrize(("completion", "counted"), [("job", 2), ("batch", 1)])
def test_a_run_is_counted_once_its_outcome_is_committed(
    engine: Engine, metrics: QueMetrics, completion: str, counted: int
) -> None:
    import threading

    started, release = threading.Event(), threading.Event()

    def slow(job: JobContext) -> None:
        started.set()
        release.wait(10)

    port = metrics.serve(0)
    for job_class in ("Ok", "Ok", "Slow"):  # locked in batches of 1, then 2
        add_job(engine, job_class, queue="c")
    worker = Worker(
        engine,
        {"Ok": handler, "Slow": slow},
        queue="c",
        batch_size=2,
        completion="batch" if completion == "batch" else "job",
    )
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    thread.start()
    try:
        assert started.wait(10)
        # The second Ok job ran in the Slow job's batch: committed on its own with per-job
        # completion, and counted at once; with batched completion, not yet committed.
        assert samples_of(port, "que_jobs_completed_total", "c", "Ok") == counted
    finally:
        release.set()
        thread.join(10)
    assert samples_of(port, "que_jobs_completed_total", "c", "Ok") == 2
    assert samples_of(port, "que_jobs_completed_total", "c", "Slow") == 1


def samples_of(port: int, name: str, queue: str, job_class: str) -> float:
    return scrape(port).get((name, labels(queue, job_class)), 0.0)


# Lisbon was on UTC+1 in 1970 and is on UTC+0 in winter: a naive difference from the epoch
# would be an hour off.
@pytest.mark.parametrize("zone", ["UTC", "Etc/GMT-3", "Europe/Paris", "Europe/Lisbon"])
def test_the_wait_is_measured_whatever_the_connection_time_zone(
    database_url: str, engine: Engine, metrics: QueMetrics, zone: str
) -> None:
    port = metrics.serve(0)
    add_job(engine, "Ok", run_at=past(20), queue=f"tz-{zone}")
    zoned = create_engine(database_url, connect_args={"options": f"-c TimeZone={zone}"})
    try:
        assert Worker(zoned, {"Ok": handler}, queue=f"tz-{zone}").work_one()
    finally:
        zoned.dispose()
    samples = scrape(port)
    key = labels(f"tz-{zone}", "Ok")
    assert 20 <= samples[("que_job_wait_seconds_sum", key)] < 60
    bucket = {
        dict(name_labels).get("le"): value
        for (name, name_labels), value in samples.items()
        if name == "que_job_wait_seconds_bucket" and dict(name_labels)["queue"] == f"tz-{zone}"
    }
    assert (bucket["10.0"], bucket["30.0"]) == (0, 1)


def test_a_fixed_zone_gives_the_exact_epoch_seconds_and_others_ask_their_zone() -> None:
    import datetime
    import zoneinfo

    from sqlalchemy_que._metrics import _epoch_in

    try:
        paris = zoneinfo.ZoneInfo("Europe/Paris")
        fixed: list[datetime.tzinfo] = [
            zoneinfo.ZoneInfo(key) for key in ("UTC", "Etc/UTC", "Etc/GMT+5", "Zulu")
        ]
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no IANA time zone database on this machine")
    fixed += [datetime.timezone.utc, datetime.timezone(datetime.timedelta(hours=5, minutes=30))]
    assert _epoch_in(paris) is None
    assert _epoch_in(None) is None
    moments = [
        datetime.datetime(year, month, 15, 12, 30, 0, 123456, tzinfo=datetime.timezone.utc)
        for year in (1969, 2026, 2038)
        for month in (1, 7)
    ]
    for zone in fixed:
        epoch = _epoch_in(zone)
        assert epoch is not None, zone
        for moment in moments:
            local = moment.astimezone(zone)
            assert (local - epoch).total_seconds() == local.timestamp(), (zone, moment)


def test_a_run_reported_through_begin_and_end_alone_is_counted(metrics: QueMetrics) -> None:
    # As a worker that knows nothing of tallies reports its runs (an asynchronous one).
    port = metrics.serve(0)
    run = _hooks.begin(
        _hooks.active,
        "elsewhere",
        job_id=1,
        job_class="Ok",
        queue="direct",
        priority=100,
        run_at=past(20),
        error_count=1,
    )
    _hooks.end(_hooks.active, run, _hooks.JobOutcome("failed", 0.002, ValueError("no"), 4.0))
    samples = scrape(port)
    assert samples[("que_jobs_failed_total", labels("direct", "Ok"))] == 1
    assert samples[("que_jobs_retried_total", labels("direct", "Ok"))] == 1
    assert samples[("que_job_run_seconds_sum", labels("direct", "Ok"))] == 0.002
    assert 20 <= samples[("que_job_wait_seconds_sum", labels("direct", "Ok"))] < 60


def test_the_async_pools_runs_are_counted(
    engine: Engine, database_url: str, metrics: QueMetrics
) -> None:
    import asyncio

    from sqlalchemy import make_url
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    from sqlalchemy_que import AsyncJobContext, AsyncWorkerPool, JobRegistry

    registry = JobRegistry()

    @registry.job("Ok")
    async def ok(job: AsyncJobContext, *args: Any) -> None:
        if args == ("fail",):
            raise ValueError("no")

    port = metrics.serve(0)
    add_job(engine, "Ok", run_at=past(20), queue="async")
    add_job(engine, "Ok", "fail", queue="async")
    url = make_url(database_url).set(drivername="postgresql+psycopg")

    async def work() -> None:
        async_engine = create_async_engine(url, poolclass=NullPool)
        try:
            pool = AsyncWorkerPool(
                async_engine, registry, queue="async", listen=False, wake_interval=0.05
            )
            await asyncio.wait_for(pool.run(burst=True), 30)
        finally:
            await async_engine.dispose()

    asyncio.run(work())
    samples = scrape(port)
    assert samples[("que_jobs_completed_total", labels("async", "Ok"))] == 1
    assert samples[("que_jobs_failed_total", labels("async", "Ok"))] == 1
    assert samples[("que_job_run_seconds_count", labels("async", "Ok"))] == 2
    waited = (("job_class", "Ok"), ("le", "30.0"), ("queue", "async"))
    assert samples[("que_job_wait_seconds_bucket", waited)] == 2


def test_the_async_pools_tasks_show_busy_and_idle(
    engine: Engine, database_url: str, metrics: QueMetrics
) -> None:
    import asyncio

    from sqlalchemy import make_url
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    from sqlalchemy_que import AsyncJobContext, AsyncWorkerPool, JobRegistry

    registry = JobRegistry()
    port = metrics.serve(0)
    url = make_url(database_url).set(drivername="postgresql+psycopg")
    add_job(engine, "Slow", queue="async-busy")

    async def work() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        started, release = asyncio.Event(), asyncio.Event()

        @registry.job("Slow")
        async def slow(job: AsyncJobContext) -> None:
            started.set()
            await release.wait()

        async_engine = create_async_engine(url, poolclass=NullPool)
        pool = AsyncWorkerPool(async_engine, registry, queue="async-busy", concurrency=3)
        metrics.track([pool])
        try:
            async with pool:
                await asyncio.wait_for(started.wait(), 20)
                samples = await asyncio.to_thread(scrape, port)  # the loop keeps running
                release.set()
        finally:
            await async_engine.dispose()
        return samples

    samples = asyncio.run(work())
    assert samples[("que_workers", (("state", "busy"),))] == 1
    assert samples[("que_workers", (("state", "idle"),))] == 2
