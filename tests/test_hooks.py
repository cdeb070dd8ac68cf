"""Job hooks: before, on_error and after around every run, with its outcome and duration."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from sqlalchemy_que import (
    JobContext,
    JobHook,
    JobOutcome,
    JobRun,
    Worker,
    _hooks,
    add_job_hook,
    remove_job_hook,
)

from .helpers import add_job, job_rows, past


class Recorder(JobHook):
    def __init__(self, name: str, calls: list[tuple[str, str, Any]]) -> None:
        self.name = name
        self.calls = calls

    def before(self, run: JobRun) -> None:
        self.calls.append((self.name, "before", run))

    def on_error(self, run: JobRun, outcome: JobOutcome) -> None:
        self.calls.append((self.name, "on_error", outcome))

    def after(self, run: JobRun, outcome: JobOutcome) -> None:
        self.calls.append((self.name, "after", outcome))


@pytest.fixture
def calls() -> Iterator[list[tuple[str, str, Any]]]:
    recorded: list[tuple[str, str, Any]] = []
    first, second = Recorder("first", recorded), Recorder("second", recorded)
    add_job_hook(first)
    add_job_hook(second)
    yield recorded
    remove_job_hook(first)
    remove_job_hook(second)
    assert _hooks.active == ()


def handler(job: JobContext, *args: Any) -> None:
    if args and args[0] == "fail":
        raise ValueError("bad input")


def test_hooks_wrap_a_completed_run_in_order(
    engine: Engine, calls: list[tuple[str, str, Any]]
) -> None:
    run_at = past(30)
    job_id = add_job(engine, "Job", 1, run_at=run_at, queue="q", priority=7)
    began = time.monotonic()
    assert Worker(engine, {"Job": handler}, queue="q").work_one()
    took = time.monotonic() - began
    waited = (datetime.datetime.now(datetime.timezone.utc) - run_at).total_seconds()
    assert [(name, what) for name, what, _ in calls] == [
        ("first", "before"),
        ("second", "before"),
        ("second", "after"),
        ("first", "after"),
    ]
    run: JobRun = calls[0][2]
    assert (run.job_id, run.job_class, run.queue, run.priority, run.error_count) == (
        job_id,
        "Job",
        "q",
        7,
        0,
    )
    # Bounded by what the test measured around the run, not by a guess of the machine's speed.
    assert run.wait_seconds is not None and 29.9 < run.wait_seconds <= waited
    outcome: JobOutcome = calls[-1][2]
    assert outcome.outcome == "done" and outcome.error is None
    assert 0 < outcome.duration <= took
    assert job_rows(engine) == []


def test_a_failed_run_calls_on_error_with_the_error_and_retry_delay(
    engine: Engine, calls: list[tuple[str, str, Any]]
) -> None:
    add_job(engine, "Job", "fail")
    assert Worker(engine, {"Job": handler}).work_one()
    assert [(name, what) for name, what, _ in calls][2:] == [
        ("second", "on_error"),
        ("first", "on_error"),
        ("second", "after"),
        ("first", "after"),
    ]
    outcome: JobOutcome = calls[-1][2]
    assert outcome.outcome == "failed"
    assert isinstance(outcome.error, ValueError)
    assert outcome.retry_in == 4.0  # Que's delay for the first error: 1**4 + 3
    (row,) = job_rows(engine)
    assert row["error_count"] == 1


def test_an_interrupted_run_is_reported_and_the_interrupt_goes_on(
    engine: Engine, calls: list[tuple[str, str, Any]]
) -> None:
    def interrupt(job: JobContext) -> None:
        raise KeyboardInterrupt

    add_job(engine, "Job")
    with pytest.raises(KeyboardInterrupt):
        Worker(engine, {"Job": interrupt}).work_one()
    outcome: JobOutcome = calls[-1][2]
    assert outcome.outcome == "interrupted"
    assert isinstance(outcome.error, KeyboardInterrupt)
    assert job_rows(engine)[0]["error_count"] == 0


def test_a_raising_hook_is_logged_and_the_job_still_completes(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(JobHook):
        def before(self, run: JobRun) -> None:
            raise RuntimeError("hook bug")

    broken = add_job_hook(Broken())
    try:
        add_job(engine, "Job")
        with caplog.at_level(logging.ERROR, "sqlalchemy_que.hooks"):
            assert Worker(engine, {"Job": handler}).work_one()
    finally:
        remove_job_hook(broken)
    assert job_rows(engine) == []
    assert "hook bug" in caplog.text


def test_an_object_without_hook_methods_is_refused() -> None:
    with pytest.raises(TypeError, match=r"before, on_error or after.*42"):
        add_job_hook(42)
    assert _hooks.active == ()
