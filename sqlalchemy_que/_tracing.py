"""OpenTelemetry spans (extra ``otel``): one per job run, one per enqueue.

Attributes follow OpenTelemetry's messaging semantic conventions (``messaging.system``
``"que"``, ``messaging.destination.name`` the queue, ``messaging.message.id`` the job_id,
``messaging.operation.type`` ``"send"`` or ``"process"``), with ``que.*`` attributes for
what the conventions have no name for. The run span is made current while the handler runs,
so that the handler's own spans are its children.

Trace context is not carried from the enqueue to the run: ``que_jobs`` has no column for it,
and it is not changed. A run span starts a trace of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from . import _hooks
from ._errors import ConfigurationError

__all__ = ["QueTracing", "install_tracing"]

#: The tracer enqueue spans are made with, once :func:`install_tracing` ran; None: no spans.
tracer: Any = None

_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


def _otel() -> Any:
    try:
        from opentelemetry import trace
    except ImportError as error:
        raise ConfigurationError(
            "OpenTelemetry tracing needs opentelemetry-api: pip install 'sqlalchemy-que[otel]'"
        ) from error
    return trace


def _name(operation: str, queue: str) -> str:
    return f"{operation} {queue}" if queue else f"{operation} (default queue)"


def enqueue_span(
    queue: str, job_class: str | None, count: int
) -> contextlib.AbstractContextManager[Any]:
    """A span around an enqueue, or a shared do-nothing context when tracing is off."""
    if tracer is None:
        return _NO_SPAN
    return _enqueue_span(tracer, queue, job_class, count)


@contextlib.contextmanager
def _enqueue_span(active: Any, queue: str, job_class: str | None, count: int) -> Iterator[Any]:
    trace = _otel()
    attributes: dict[str, Any] = {
        "messaging.system": "que",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": queue,
    }
    if job_class is not None:
        attributes["que.job_class"] = job_class
    if count != 1:
        attributes["messaging.batch.message_count"] = count
    with active.start_as_current_span(
        _name("send", queue), kind=trace.SpanKind.PRODUCER, attributes=attributes
    ) as span:
        yield span


class _RunSpans(_hooks.JobHook):
    def __init__(self, active: Any) -> None:
        self.tracer = active
        self.trace = _otel()
        from opentelemetry import context

        self.context = context

    def before(self, run: _hooks.JobRun) -> None:
        span = self.tracer.start_span(
            _name("process", run.queue),
            kind=self.trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "que",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": run.queue,
                "messaging.message.id": str(run.job_id),
                "messaging.consumer.group.name": run.worker,
                "que.job_class": run.job_class,
                "que.priority": run.priority,
                "que.error_count": run.error_count,
            },
        )
        run.state["otel.span"] = span
        run.state["otel.token"] = self.context.attach(self.trace.set_span_in_context(span))

    def after(self, run: _hooks.JobRun, outcome: _hooks.JobOutcome) -> None:
        span = run.state.pop("otel.span", None)
        token = run.state.pop("otel.token", None)
        if token is not None:
            self.context.detach(token)
        if span is None:
            return
        span.set_attribute("que.outcome", outcome.outcome)
        if outcome.error is not None:
            span.record_exception(outcome.error)
            span.set_attribute("error.type", type(outcome.error).__qualname__)
            span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, str(outcome.error)))
        if outcome.retry_in is not None:
            span.set_attribute("que.retry_in", outcome.retry_in)
        span.end()


class QueTracing:
    """Tracing installed by :func:`install_tracing`; :meth:`close` turns it off."""

    def __init__(self, active: Any) -> None:
        self.tracer = active
        self._hook = _RunSpans(active)

    def close(self) -> None:
        global tracer
        _hooks.remove_job_hook(self._hook)
        if tracer is self.tracer:
            tracer = None


def install_tracing(tracer_provider: Any = None) -> QueTracing:
    """Make a span for every job run of this process's workers and every enqueue.

    :param tracer_provider: an OpenTelemetry ``TracerProvider``; default the global one.
    """
    global tracer
    trace = _otel()
    from . import __version__

    active = trace.get_tracer("sqlalchemy_que", __version__, tracer_provider=tracer_provider)
    tracing = QueTracing(active)
    _hooks.add_job_hook(tracing._hook)
    tracer = active
    return tracing
