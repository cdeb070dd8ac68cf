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
from sqlalchemy import Engine, text

from sqlalchemy_que import (
    ConfigurationError,
    JobContext,
    QueMetrics,
    Worker,
    WorkerPool,
    _hooks,
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
