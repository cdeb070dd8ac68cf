"""OpenTelemetry spans, read from the SDK's in-memory span exporter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import Engine

from sqlalchemy_que import (
    JobContext,
    Worker,
    _hooks,
    _tracing,
    enqueue,
    insert_job,
    insert_jobs,
    insert_many,
    install_tracing,
)


@pytest.fixture
def provider() -> TracerProvider:
    return TracerProvider()


@pytest.fixture
def exporter(provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing = install_tracing(provider)
    yield memory
    tracing.close()
    assert _hooks.active == () and _tracing.tracer is None


def test_an_enqueue_makes_a_producer_span(engine: Engine, exporter: InMemorySpanExporter) -> None:
    with engine.begin() as connection:
        job_id = insert_job(connection, "Mail", 1, queue="mail")
        insert_jobs(connection, [enqueue("Mail", n, queue="mail") for n in range(3)])
        insert_many(connection, "Sms", [[n] for n in range(5)])
    one, copied, many = exporter.get_finished_spans()
    assert (one.name, one.kind) == ("send mail", SpanKind.PRODUCER)
    assert dict(one.attributes or {}) == {
        "messaging.system": "que",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "mail",
        "que.job_class": "Mail",
        "messaging.message.id": str(job_id),
    }
    assert (copied.attributes or {})["messaging.batch.message_count"] == 3
    assert many.name == "send (default queue)"
    assert (many.attributes or {})["messaging.batch.message_count"] == 5
    assert (many.attributes or {})["que.job_class"] == "Sms"


def test_a_run_makes_a_consumer_span_parenting_the_handler_spans(
    engine: Engine, exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    from opentelemetry import trace

    def handler(job: JobContext, n: int) -> None:
        with provider.get_tracer("app").start_as_current_span("handler work"):
            pass

    with engine.begin() as connection:
        job_id = insert_job(connection, "Work", 7, queue="q", priority=3)
    exporter.clear()
    assert Worker(engine, {"Work": handler}, queue="q", name="w1").work_one()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    run = spans["process q"]
    assert run.kind == SpanKind.CONSUMER
    attributes = dict(run.attributes or {})
    assert attributes["messaging.message.id"] == str(job_id)
    assert attributes["messaging.destination.name"] == "q"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.consumer.group.name"] == "w1"
    assert (attributes["que.job_class"], attributes["que.priority"]) == ("Work", 3)
    assert attributes["que.outcome"] == "done"
    assert run.status.status_code == StatusCode.UNSET
    inner = spans["handler work"]
    assert inner.parent is not None and inner.parent.span_id == run.context.span_id
    assert trace.get_current_span() is trace.INVALID_SPAN  # detached after the run


def test_a_failed_run_span_has_the_error(engine: Engine, exporter: InMemorySpanExporter) -> None:
    def handler(job: JobContext, *args: Any) -> None:
        raise LookupError("missing row")

    with engine.begin() as connection:
        insert_job(connection, "Bad")
    exporter.clear()
    assert Worker(engine, {"Bad": handler}).work_one()
    (run,) = exporter.get_finished_spans()
    assert run.status.status_code == StatusCode.ERROR
    assert (run.attributes or {})["error.type"] == "LookupError"
    assert (run.attributes or {})["que.retry_in"] == 4.0
    assert [event.name for event in run.events] == ["exception"]


def test_without_tracing_no_span_is_made(engine: Engine) -> None:
    assert _tracing.tracer is None
    assert _tracing.enqueue_span("q", "X", 1) is _tracing.enqueue_span("", None, 2)
