"""Instant wake-up, the receiving side: one listening connection per worker pool.

A :class:`Listener` holds a dedicated connection (made as the Engine makes its connections,
by a private copy of its pool, so never one of the workers'), ``LISTEN``\\ s on the channel of
each of its queues (see :mod:`sqlalchemy_que.notify`), and calls ``wake(queue)`` when a job is
ready: at once for a job due now, or when its ``run_at`` comes for a job due within the next
hour (a timer), so that a scheduled job starts on time rather than at the next poll.

It also listens on :data:`~sqlalchemy_que._notify.CANCEL_CHANNEL` and passes each job id
asked to cancel to ``on_cancel`` (see :func:`sqlalchemy_que.admin.cancel`), so that a handler
sees ``job.cancel_requested`` without any query of its own.

Polling stays the safety net: a lost notification (the listening connection dropped, a job
from Ruby, Go or raw SQL) only means the job is found at the next poll. Each time the
listening connection is (re)established, every queue is woken once, in case a job was
committed before the ``LISTEN`` took effect. A lost connection is reopened with a growing
pause (0.1 s doubling up to 30 s), logged.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Engine

from ._notify import CANCEL_CHANNEL, channel_for, parse_payload

__all__ = ["Listener"]

logger = logging.getLogger("sqlalchemy_que.listener")

#: Jobs due further ahead than this are left to polling rather than held as timers.
TIMER_HORIZON = 3600.0

_MAX_BACKOFF = 30.0
_TICK = 0.25  # the longest the listener waits before looking at timers and stop requests


class Listener:
    """Listens for jobs of ``queues`` and calls ``wake(queue)`` when one is (or becomes)
    ready; ``queue`` is None when it cannot tell which.

    :param engine: whose URL, connection arguments and connect events the listening
        connection uses.
    :param queues: the queues to listen for.
    :param wake: called from the listener's thread when a job is ready.
    :param on_cancel: called from the listener's thread with the id of a job asked to cancel.
    """

    def __init__(
        self,
        engine: Engine,
        queues: Sequence[str],
        wake: Callable[[str | None], object],
        on_cancel: Callable[[int], object] | None = None,
    ) -> None:
        self.engine = engine
        self.queues = tuple(queues)
        self.channels = {channel_for(queue): queue for queue in self.queues}
        self._wake = wake
        self._on_cancel = on_cancel
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._timers: list[tuple[float, str]] = []  # a heap of (monotonic time, queue)
        self._connection: psycopg.Connection[Any] | None = None
        self.connected = threading.Event()
        self._connecting = False
        #: How many notifications arrived (for tests and monitoring).
        self.received = 0

    @property
    def channel(self) -> str:
        """The channel of the first queue."""
        return channel_for(self.queues[0])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"que-listener-{self.channel}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stopping.set()
        if self._thread is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        # Not waiting for a connection being opened: it holds nothing (and a silent server
        # keeps it waiting for its connect timeout).
        while self._thread.is_alive() and not self._connecting:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            self._thread.join(0.05 if remaining is None else min(0.05, remaining))

    def _connect(self) -> psycopg.Connection[Any]:
        # A connection made exactly as the Engine makes them (its URL, connect_args,
        # creator, connect events), by a copy of its pool, so that it never waits for one of
        # the connections the workers hold; then detached: it is ours.
        pool = self.engine.pool.recreate()
        try:
            fairy = pool.connect()
            connection = fairy.driver_connection
            if not isinstance(connection, psycopg.Connection):
                fairy.close()
                raise psycopg.InterfaceError("the listener needs the psycopg driver")
            fairy.detach()
        finally:
            pool.dispose()
        try:
            connection.autocommit = True
            connection.execute("SET application_name = 'sqlalchemy-que listener'")
            for channel in self.channels:
                connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            if self._on_cancel is not None:
                connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CANCEL_CHANNEL)))
        except BaseException:
            connection.close()
            raise
        return connection

    def _run(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            self._connecting = True
            try:
                self._connection = self._connect()
            except Exception as error:  # the driver's, or the pool's (a timeout)
                backoff = min(max(backoff * 2, 0.1), _MAX_BACKOFF)
                logger.warning(
                    "cannot open the listening connection, retrying in %.1fs: %s",
                    backoff,
                    error,
                    extra={"queues": list(self.queues), "backoff": backoff},
                )
                self._stopping.wait(backoff)
                continue
            finally:
                self._connecting = False
            if backoff:
                logger.info("listening again for queue(s) %s", list(self.queues))
            backoff = 0.0
            self.connected.set()
            # A job committed before LISTEN took effect sent its notification to nobody:
            # look once now rather than at the next poll.
            for queue in self.queues:
                self._wake(queue)
            try:
                self._listen(self._connection)
            except Exception as error:
                backoff = 0.1
                logger.warning(
                    "the listening connection was lost, reconnecting: %s",
                    error,
                    extra={"queues": list(self.queues)},
                )
            finally:
                self.connected.clear()
                self._connection.close()
                self._connection = None
            if backoff:
                self._stopping.wait(backoff)

    def _listen(self, connection: psycopg.Connection[Any]) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, queue = heapq.heappop(self._timers)
                self._wake(queue)
            timeout = _TICK if not self._timers else min(_TICK, self._timers[0][0] - now)
            for notification in connection.notifies(timeout=max(timeout, 0.0)):
                self.received += 1
                self._on_notification(notification.channel, notification.payload)

    def _on_notification(self, channel: str, payload: str) -> None:
        if channel == CANCEL_CHANNEL:
            if self._on_cancel is not None and payload.isdigit():
                self._on_cancel(int(payload))
            return
        queue = self.channels.get(channel)
        if queue is None:
            return
        run_at = parse_payload(payload)
        delay = 0.0 if run_at is None else run_at - time.time()
        if delay <= 0.0:
            self._wake(queue)
        elif delay <= TIMER_HORIZON:
            heapq.heappush(self._timers, (time.monotonic() + delay, queue))
