"""A pool of worker threads on one Engine, its wake-ups, its start-up checks and its signals.

::

    from sqlalchemy import create_engine
    from sqlalchemy_que import WorkerPool

    def print_name(job, name):
        print("hello", name)

    engine = create_engine(url, pool_size=5)
    pool = WorkerPool(engine, {"PrintName": print_name}, workers=4, queues=["mail", ""])
    pool.start()
    ...
    still_running = pool.shutdown(timeout=30)
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.pool import AssertionPool, QueuePool, StaticPool

from ._errors import WorkerError
from ._listener import Listener
from ._scheduler import Scheduler
from ._session import LockedJob
from ._worker import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_HOLD,
    Completion,
    ErrorReporter,
    Handlers,
    Worker,
    check_queues,
    registry_of,
)
from .schema import check_schema

__all__ = ["WorkerPool"]

logger = logging.getLogger("sqlalchemy_que.worker")


class _StoppedWhileStarting(BaseException):
    """Raised by the signal handler of :meth:`WorkerPool.run` while the pool starts."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _pool_capacity(engine: Engine) -> float:
    pool = engine.pool
    if isinstance(pool, QueuePool):
        overflow = getattr(pool, "_max_overflow", 0)  # no public accessor
        return math.inf if overflow < 0 else pool.size() + overflow
    if isinstance(pool, StaticPool | AssertionPool):
        return 1
    return math.inf  # NullPool and others open connections as needed


def _assignments(
    queue: str | None, queues: Sequence[str] | Mapping[str, int] | None, workers: int | None
) -> list[tuple[str, ...]]:
    """The queues of each worker, in order of preference."""
    if queue is not None and queues is not None:
        raise WorkerError("give queue= or queues=, not both")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise WorkerError(f"workers must be a whole number >= 1, got {workers!r}")
    if isinstance(queues, Mapping):
        names = check_queues(list(queues))
        counts = [queues[name] for name in names]
        for name, count in zip(names, counts, strict=True):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise WorkerError(
                    f"the worker count of queue {name!r} must be a whole number >= 1, got {count!r}"
                )
        if workers is not None and workers != sum(counts):
            raise WorkerError(
                f"workers={workers} but the queues' counts add up to {sum(counts)}: "
                f"{dict(queues)!r}"
            )
        return [(name,) for name, count in zip(names, counts, strict=True) for _ in range(count)]
    names = check_queues(queues) if queues is not None else (queue or "",)
    if queue is not None and not isinstance(queue, str):
        raise WorkerError(f"queue must be a str, got {queue!r}")
    return [names] * (4 if workers is None else workers)


class WorkerPool:
    """Several :class:`~sqlalchemy_que.Worker` threads on one Engine.

    Each worker holds one connection for as long as it runs, so the Engine's pool must be
    able to hand out at least ``workers`` connections at once: :meth:`start` checks it and
    refuses with an explanation otherwise. The listener's connection is made as the Engine
    makes its connections, outside its pool.

    Usable as a context manager, which starts the pool and shuts it down on exit.

    :param queue: the one queue to work; default ``''``.
    :param queues: several queues. A list: every worker works every queue, in the order
        given (a later queue only when no earlier one has a ready job). A mapping of queue
        to a number of workers: that many workers work only that queue (``workers`` is then
        their sum).
    :param workers: how many worker threads; default 4, as Ruby Que.
    :param batch_size: the most jobs a worker locks at once; default 20 (100 with
        ``completion="batch"``). Larger batches
        cost fewer round trips per job; a more urgent job enqueued meanwhile may wait up to
        ``max_hold`` seconds plus one job's run time.
    :param completion: ``"job"`` (default) or ``"batch"``; see :class:`~sqlalchemy_que.Worker`.
    :param check_schema: check at start that ``que_jobs`` is a Que 0.x version 3 table.
    :param listen: keep one extra, dedicated connection listening for the notifications our
        enqueue sends, so that jobs start within milliseconds of their commit instead of at
        the next poll (see :mod:`sqlalchemy_que.listener`). Turn it off where ``LISTEN``
        does not work, such as behind a transaction-pooling proxy; polling every
        ``wake_interval`` still finds every job.
    :param run_schedules: take part in enqueueing the ticks of the registry's schedules
        (:func:`~sqlalchemy_que.cron`, :func:`~sqlalchemy_que.every`), in a thread with a
        connection of its own; each tick is enqueued once however many pools run. Default
        True; it does nothing for a registry without schedules, or with ``burst``.
        ``wake_interval`` still finds every job. The listener also delivers cancel
        requests to running jobs: without it (and in burst mode) they never arrive.
    :param max_attempts: runs a job gets in all, unless its definition says; default 16.
    :param timeout: seconds a job may run, unless its definition says; default None.
    Other parameters as for :class:`~sqlalchemy_que.Worker`.
    """

    def __init__(
        self,
        engine: Engine,
        handlers: Handlers,
        *,
        queue: str | None = None,
        queues: Sequence[str] | Mapping[str, int] | None = None,
        workers: int | None = None,
        batch_size: int | None = None,
        completion: Completion = "job",
        wake_interval: float = 5.0,
        max_hold: float = DEFAULT_MAX_HOLD,
        on_error: ErrorReporter | None = None,
        check_schema: bool = True,
        listen: bool = True,
        run_schedules: bool = True,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout: float | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry_of(handlers)
        assignments = _assignments(queue, queues, workers)
        self.queues: tuple[str, ...] = tuple(dict.fromkeys(q for a in assignments for q in a))
        self.check_schema = check_schema
        self.workers = [
            Worker(
                engine,
                self.registry,
                queues=worker_queues,
                batch_size=batch_size,
                completion=completion,
                wake_interval=wake_interval,
                max_hold=max_hold,
                on_error=on_error,
                name=f"que-worker-{index}",
                on_locked=self._wake_idle,
                max_attempts=max_attempts,
                timeout=timeout,
            )
            for index, worker_queues in enumerate(assignments)
        ]
        self._threads: list[threading.Thread] = []
        self.listener = Listener(engine, self.queues, self._wake_for) if listen else None
        schedules = self.registry.schedules
        self.scheduler = (
            Scheduler(engine, schedules.values()) if run_schedules and schedules else None
        )
        self.listener = (
            Listener(engine, self.queues, self._wake_for, self._cancel) if listen else None
        )

    @property
    def failed(self) -> int:
        """How many job runs failed (retried or failed for good) in this pool's workers."""
        return sum(worker.failed for worker in self.workers)

    def _cancel(self, job_id: int) -> None:
        for worker in self.workers:
            if worker.cancel(job_id):
                return

    @property
    def queue(self) -> str:
        """The first queue of the pool."""
        return self.queues[0]

    def _wake_for(self, queue: str | None) -> None:
        """A job of ``queue`` (None: of any) is ready: wake one idle worker that works it."""
        self._wake_idle(queue)

    def _wake_idle(self, queue: str | None = None) -> None:
        """Wake one sleeping worker, if any: one ready job wakes one worker, and each worker
        that then finds jobs wakes the next, so a burst of jobs wakes as many workers as it
        needs, and a single job does not wake the whole pool."""
        candidates = [w for w in self.workers if queue is None or queue in w.queues]
        for worker in candidates:
            if worker.sleeping:
                worker.wake()
                return
        # Nobody asleep: an idle worker may be between its last look and its sleep, having
        # looked before the job was committed. Its wake flag makes that sleep end at once.
        for worker in candidates:
            if worker.current_job is None:
                worker.wake()
                return

    def _warn_unworked_definitions(self) -> None:
        for definition in self.registry.values():
            if definition.queue is not None and definition.queue not in self.queues:
                logger.warning(
                    "job %r is declared with queue=%r, which no worker of this pool works "
                    "(it works %s): its jobs will wait for another worker",
                    definition.name,
                    definition.queue,
                    ", ".join(repr(queue) for queue in self.queues),
                    extra={"job_class": definition.name, "queue": definition.queue},
                )

    def _preflight(self) -> None:
        capacity = _pool_capacity(self.engine)
        needed = len(self.workers)
        if capacity < needed:
            pool = self.engine.pool
            raise WorkerError(
                f"the Engine's connection pool ({type(pool).__name__}, {pool.status()}) hands "
                f"out at most {capacity:g} connections, but this WorkerPool has {needed} "
                "workers, each holding one connection while it runs. Create the Engine "
                f"with create_engine(url, pool_size={needed}) (plus what the rest of the "
                "process needs), or use fewer workers"
            )
        if self.check_schema:
            with self.engine.connect() as connection:
                check_schema(connection)
        self._warn_unworked_definitions()

    def start(self, *, burst: bool = False) -> None:
        """Check the Engine and the schema, then start the worker threads.

        :param burst: each worker stops when no job is ready instead of sleeping.
        :raises WorkerError: when the Engine's pool is too small for the workers.
        :raises SchemaError: when ``que_jobs`` is missing or not a Que 0.x version 3 table.
        """
        if self._threads:
            raise WorkerError("this WorkerPool was already started")
        self._preflight()
        if self.listener is not None and not burst:  # a burst ends when nothing is ready
            self.listener.start()
        if self.scheduler is not None and not burst:
            self.scheduler.start()
        for worker in self.workers:
            thread = threading.Thread(
                target=worker.run, kwargs={"burst": burst}, name=worker.name, daemon=True
            )
            self._threads.append(thread)
            thread.start()
        logger.info(
            "started %d workers on queue(s) %s",
            len(self.workers),
            ", ".join(repr(queue) for queue in self.queues),
            extra={"queues": list(self.queues), "workers": len(self.workers)},
        )

    @property
    def running_jobs(self) -> list[LockedJob]:
        """The jobs being worked right now."""
        return [job for worker in self.workers if (job := worker.current_job) is not None]

    def wake(self, count: int | None = None) -> None:
        """Wake up to ``count`` sleeping workers (all when None)."""
        for worker in self.workers[: count if count is not None else len(self.workers)]:
            worker.wake()

    def is_alive(self) -> bool:
        """True while any worker thread runs."""
        return any(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker threads to end; True when all have ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker, thread in zip(self.workers, self._threads, strict=False):
            # A stopped worker still waiting for a connection holds nothing: not worth
            # waiting for (a silent server could keep it there for its connect timeout).
            while thread.is_alive() and not (worker.stopping and worker.connecting):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                thread.join(0.05 if remaining is None else min(0.05, remaining))
        if any(
            thread.is_alive() and not (worker.stopping and worker.connecting)
            for worker, thread in zip(self.workers, self._threads, strict=False)
        ):
            return False
        if self.listener is not None:
            self.listener.stop()  # nobody left to wake
        if self.scheduler is not None:
            self.scheduler.stop()
        return True

    def shutdown(self, timeout: float | None = None) -> list[LockedJob]:
        """Stop taking jobs at once, let jobs in progress finish, and return within ``timeout``.

        Jobs locked but not started are released as soon as each worker's job in progress
        ends (at once for a worker between jobs).

        :returns: the jobs still running when the timeout ran out (empty when all finished).
            Their rows are intact; each is completed by its worker when its handler returns,
            and its lock is released at the latest when its connection closes (at process
            exit for the worker threads, which are daemons).
        """
        started = time.monotonic()
        for worker in self.workers:
            worker.stop()
        if self.listener is not None:
            self.listener.stop(timeout)
        if self.scheduler is not None:
            self.scheduler.stop(timeout)
        self.join(None if timeout is None else max(0.0, timeout - (time.monotonic() - started)))
        still_running = self.running_jobs
        if still_running:
            logger.warning(
                "shutdown timed out with %d job(s) still running: %s",
                len(still_running),
                ", ".join(str(job.job_id) for job in still_running),
            )
        return still_running

    def run(
        self,
        *,
        burst: bool = False,
        shutdown_timeout: float | None = None,
        handle_signals: bool = True,
    ) -> list[LockedJob]:
        """Start the pool and block until it is told to stop; what the CLI's ``worker`` runs.

        It returns when every worker has ended (with ``burst``, once no job is ready), or
        after SIGTERM or SIGINT, which shut the pool down gracefully: no new job is taken
        and jobs in progress get ``shutdown_timeout`` seconds to finish. A second signal
        ends the process at once (exit status 128 + signal number); jobs in progress are
        then rolled back by the server as their connections close, their rows intact.

        :param handle_signals: install the SIGTERM/SIGINT handlers (main thread only).
        :returns: the jobs still running when the shutdown timeout ran out.
        """
        stop = threading.Event()
        received: list[int] = []
        starting = [True]

        def on_signal(signum: int, frame: object) -> None:
            received.append(signum)
            if starting[0]:
                # Still checking the Engine (a silent server can keep that waiting for its
                # connect timeout): nothing is locked yet, so stop now.
                raise _StoppedWhileStarting(signum)
            if len(received) > 1:
                logger.warning("second signal (%s): stopping at once", signal.Signals(signum).name)
                os._exit(128 + signum)
            logger.info(
                "%s received: finishing jobs in progress, then stopping "
                "(send it again to stop at once)",
                signal.Signals(signum).name,
            )
            stop.set()

        previous: dict[int, Any] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            try:
                self.start(burst=burst)
            except _StoppedWhileStarting as stopped:
                logger.info(
                    "%s received while starting: stopped", signal.Signals(stopped.signum).name
                )
                return self.shutdown(shutdown_timeout)
            finally:
                starting[0] = False
            while self.is_alive() and not stop.wait(0.1):
                pass
            return self.shutdown(shutdown_timeout)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
