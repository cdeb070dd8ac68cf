"""The failed-jobs gauge of the Prometheus metrics, read from a real scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from sqlalchemy_que import admin, install_metrics

from .helpers import add_job
from .test_metrics import scrape


def test_failed_jobs_are_a_gauge_per_queue(engine: Engine) -> None:
    for queue in ("a", "a", "b"):
        admin.cancel(engine, add_job(engine, "X", queue=queue))  # failed, as cancelled
    metrics = install_metrics(engine, registry=CollectorRegistry(), refresh_seconds=3600)
    try:
        samples = scrape(metrics.serve(0))
    finally:
        metrics.close()
    assert samples[("que_failed_jobs", (("queue", "a"),))] == 2
    assert samples[("que_failed_jobs", (("queue", "b"),))] == 1
    assert metrics.queries == 1
