"""Job hooks: code that wraps every job run of every worker of the process.

A hook is an object with any of three methods, each optional::

    class Timing(sqlalchemy_que.JobHook):
        def before(self, run: JobRun) -> None: ...
        def on_error(self, run: JobRun, outcome: JobOutcome) -> None: ...
        def after(self, run: JobRun, outcome: JobOutcome) -> None: ...

``before`` is called once the job is locked, just before its handler; ``after`` once the job
is completed or its failure recorded (``on_error`` first, for a failure). Hooks run in the
order added (``after`` and ``on_error`` in reverse, as middleware unwinds). What a hook
raises is logged and ignored: a hook can never fail a job or stop a worker.

The worker calls :func:`begin` and :func:`end` around a run, which an asynchronous worker can
call around an ``await`` just the same; with no hook added, the worker calls neither (one
test of a module global per job).

The library's own Prometheus metrics are a :class:`Tally` instead: a hook that is given
finished runs in bulk, as plain tuples, once their outcomes are committed (with batched
completion, once per batch), through :func:`tally`. No :class:`JobRun` or
:class:`JobOutcome` is made for it, and no method called per run: with only metrics
installed, the worker's cost per job is two clock readings and a tuple appended to a list.
A caller of :func:`begin` and :func:`end` that knows nothing of tallies still has its runs
counted: :func:`end` gives each to them at once, unless given a list to append it to.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

__all__ = ["JobHook", "JobOutcome", "JobRun", "add_job_hook", "remove_job_hook"]

logger = logging.getLogger("sqlalchemy_que.hooks")

#: How a run ended: completed (``"done"``), failed and rescheduled (``"failed"``), or cut short
#: by KeyboardInterrupt/SystemExit and released untouched (``"interrupted"``).
Outcome = Literal["done", "failed", "interrupted"]


@dataclass(slots=True)
class JobRun:
    """One run of a job, as hooks see it (the row as it was when the worker locked it)."""

    job_id: int
    job_class: str
    queue: str
    priority: int
    #: None only for a row whose ``run_at`` no Python datetime can hold.
    run_at: datetime.datetime | None
    #: The failures before this run: above 0, this run is a retry.
    error_count: int
    #: The name of the worker running it.
    worker: str
    #: Wall-clock time (``time.time()``) when the run started.
    started_at: float
    #: Where a hook may keep what it needs from ``before`` to ``after`` (a span, a timer).
    state: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def wait_seconds(self) -> float | None:
        """Seconds from the job's ``run_at`` to the start of this run (None if unknown)."""
        if self.run_at is None:
            return None
        return self.started_at - self.run_at.timestamp()


@dataclass(slots=True)
class JobOutcome:
    """How a run ended."""

    outcome: Outcome
    #: Seconds from the start of the handler to the end of the completion or failure record.
    duration: float
    #: What the handler (or the completing statement) raised, for ``"failed"`` and
    #: ``"interrupted"``.
    error: BaseException | None = None
    #: For ``"failed"``: seconds until the job runs again.
    retry_in: float | None = None


class JobHook:
    """A base class for hooks: every method does nothing; override the ones you need."""

    def before(self, run: JobRun) -> None:
        """Called before the job's handler runs."""

    def on_error(self, run: JobRun, outcome: JobOutcome) -> None:
        """Called when the run failed or was interrupted, before :meth:`after`."""

    def after(self, run: JobRun, outcome: JobOutcome) -> None:
        """Called after every run, whatever its outcome."""


class RunFacts(Protocol):
    """What a :class:`Tally` reads of a run's job (a locked job, or a :class:`JobRun`)."""

    @property
    def queue(self) -> str: ...
    @property
    def job_class(self) -> str: ...
    @property
    def error_count(self) -> int: ...
    @property
    def run_at(self) -> datetime.datetime | None: ...


#: One finished run, as a :class:`Tally` is given it: the job, whether the run failed (else
#: it completed; interrupted runs are not tallied), when it started (``time.perf_counter()``,
#: read once where a wall-clock reading would be a second one) and its duration in seconds,
#: as :attr:`JobOutcome.duration`.
TalliedRun = tuple[RunFacts, bool, float, float]


class Tally:
    """A hook of the library's own that takes finished runs in bulk (see the module's
    docstring); added and removed with :func:`add_job_hook` and :func:`remove_job_hook`."""

    def tally(self, runs: list[TalliedRun]) -> None:
        """Count ``runs`` (the list is the caller's, cleared afterwards: keep nothing of it)."""
        raise NotImplementedError


class Plan(NamedTuple):
    """What the hooks added ask of a worker: the methods to call per run, hooks' no-op
    :class:`JobHook` methods left out (``on_error`` and ``after`` in reverse order), and the
    tallies to give finished runs to."""

    before: tuple[Callable[[JobRun], object], ...]
    on_error: tuple[Callable[[JobRun, JobOutcome], object], ...]
    after: tuple[Callable[[JobRun, JobOutcome], object], ...]
    tallies: tuple[Tally, ...]
    #: True when some hook has a method to call per run (a JobRun is needed).
    per_run: bool


#: The hooks added, in order; a tuple replaced whole, so that workers read it without a lock.
active: tuple[Any, ...] = ()
_lock = threading.Lock()
#: What ``active`` asks of a worker; replaced whole with it.
plan = Plan((), (), (), (), per_run=False)


def _plan(hooks: tuple[Any, ...]) -> Plan:
    def bound(name: str, order: Any) -> tuple[Any, ...]:
        found = []
        for hook in order:
            method = getattr(hook, name, None)
            if method is None or getattr(method, "__func__", None) is getattr(JobHook, name):
                continue
            found.append(method)
        return tuple(found)

    before, on_error, after = (
        bound("before", hooks),
        bound("on_error", hooks[::-1]),
        bound("after", hooks[::-1]),
    )
    tallies = tuple(hook for hook in hooks if isinstance(hook, Tally))
    return Plan(before, on_error, after, tallies, per_run=bool(before or on_error or after))


def add_job_hook(hook: object) -> object:
    """Add a hook to every job run of this process's workers; returns the hook.

    :param hook: an object with any of ``before(run)``, ``on_error(run, outcome)`` and
        ``after(run, outcome)`` (a :class:`JobHook` subclass, for instance).
    """
    global active, plan
    if not isinstance(hook, Tally) and not any(
        callable(getattr(hook, name, None)) for name in ("before", "on_error", "after")
    ):
        raise TypeError(f"a job hook needs a before, on_error or after method, got {hook!r}")
    with _lock:
        active = (*active, hook)
        plan = _plan(active)
    return hook


def remove_job_hook(hook: object) -> None:
    """Remove a hook added with :func:`add_job_hook` (nothing happens if it was not added)."""
    global active, plan
    with _lock:
        active = tuple(h for h in active if h is not hook)
        plan = _plan(active)


def _failed(method: Any) -> None:
    logger.exception("job hook %r raised; ignored", method)


def begin(
    hooks: tuple[Any, ...],
    worker: str,
    *,
    job_id: int,
    job_class: str,
    queue: str,
    priority: int,
    run_at: datetime.datetime | None,
    error_count: int,
) -> JobRun:
    """Call every hook's ``before``; returns the run to give to :func:`end`."""
    run = JobRun(
        job_id=job_id,
        job_class=job_class,
        queue=queue,
        priority=priority,
        run_at=run_at,
        error_count=error_count,
        worker=worker,
        started_at=time.time(),
    )
    for method in plan.before:
        try:
            method(run)
        except Exception:
            _failed(method)
    return run


def end(
    hooks: tuple[Any, ...],
    run: JobRun,
    outcome: JobOutcome,
    *,
    tallied: list[TalliedRun] | None = None,
) -> None:
    """Call every hook's ``on_error`` (for a run that did not complete), then ``after``; and
    count the run (unless interrupted) for the tallies: appended to ``tallied``, for the
    caller to give to :func:`tally` once committed, or else given to them at once."""
    current = plan
    if current.tallies and outcome.outcome != "interrupted":
        started = run.started_at - (time.time() - time.perf_counter())
        counted = (run, outcome.outcome == "failed", started, outcome.duration)
        if tallied is not None:
            tallied.append(counted)
        else:
            tally([counted])
    if outcome.outcome != "done":
        for method in current.on_error:
            try:
                method(run, outcome)
            except Exception:
                _failed(method)
    for method in current.after:
        try:
            method(run, outcome)
        except Exception:
            _failed(method)


def tally(runs: list[TalliedRun]) -> None:
    """Give finished runs to every :class:`Tally`, then clear ``runs``."""
    for hook in plan.tallies:
        try:
            hook.tally(runs)
        except Exception:
            _failed(hook.tally)
    runs.clear()
