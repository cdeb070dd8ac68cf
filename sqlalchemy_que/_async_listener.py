"""Instant wake-up for the async pool: one listening ``AsyncConnection`` on the event loop.

The asyncio twin of :class:`~sqlalchemy_que.listener.Listener`, with its rules: ``LISTEN`` on
the channel of each queue and on the cancel channel, wake at once for a job due now and on a
timer for one due within the hour, wake every queue once after each (re)connection, reconnect
with a growing pause. It runs as a task beside the workers rather than in a thread: the
notifications arrive through psycopg's ``AsyncConnection.notifies()`` on the loop that runs
the jobs, so waking a worker task is a plain call (no hand-over between threads), and the
connection is made by the AsyncEngine's own connect path (its URL, ``connect_args`` and
events, through a private copy of its pool), which a thread could not use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

from ._async_tasks import end_task
from ._listener import TIMER_HORIZON
from ._notify import CANCEL_CHANNEL, channel_for, parse_payload

__all__ = ["AsyncListener"]

logger = logging.getLogger("sqlalchemy_que.listener")

_MAX_BACKOFF = 30.0


class AsyncListener:
    """Calls ``wake(queue)`` when a job of ``queues`` is (or becomes) ready, and
    ``on_cancel(job_id)`` for a cancel request; both on the event loop."""

    def __init__(
        self,
        engine: AsyncEngine,
        queues: Sequence[str],
        wake: Callable[[str | None], object],
        on_cancel: Callable[[int], object] | None = None,
    ) -> None:
        self.engine = engine
        self.queues = tuple(queues)
        self.channels = {channel_for(queue): queue for queue in self.queues}
        self._wake = wake
        self._on_cancel = on_cancel
        self._task: asyncio.Task[None] | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self.connected = asyncio.Event()
        #: How many notifications arrived.
        self.received = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"que-listener-{channel_for(self.queues[0])}"
        )

    async def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        task, self._task = self._task, None
        if task is not None:
            await end_task(task)  # one cancel may be lost inside psycopg's wait

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        pool = self.engine.sync_engine.pool.recreate()
        try:
            fairy = await greenlet_spawn(pool.connect)
            connection = fairy.driver_connection
            if not isinstance(connection, psycopg.AsyncConnection):
                fairy.close()
                raise psycopg.InterfaceError("the listener needs psycopg's async driver")
            fairy.detach()
        finally:
            await greenlet_spawn(pool.dispose)
        try:
            await connection.set_autocommit(True)
            await connection.execute("SET application_name = 'sqlalchemy-que listener'")
            channels = [*self.channels, *([CANCEL_CHANNEL] if self._on_cancel else [])]
            for channel in channels:
                await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            try:
                connection = await self._connect()
            except Exception as error:
                backoff = min(max(backoff * 2, 0.1), _MAX_BACKOFF)
                logger.warning(
                    "cannot open the listening connection, retrying in %.1fs: %s",
                    backoff,
                    error,
                    extra={"queues": list(self.queues), "backoff": backoff},
                )
                await asyncio.sleep(backoff)
                continue
            backoff = 0.0
            self.connected.set()
            for queue in self.queues:  # a job committed before LISTEN took effect
                self._wake(queue)
            try:
                async for notification in connection.notifies():
                    self.received += 1
                    self._on_notification(notification.channel, notification.payload)
            except Exception as error:
                logger.warning(
                    "the listening connection was lost, reconnecting: %s",
                    error,
                    extra={"queues": list(self.queues)},
                )
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await connection.close()
            await asyncio.sleep(0.1)

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
            timer: asyncio.TimerHandle | None = None

            def fire() -> None:
                if timer is not None:
                    self._timers.discard(timer)
                self._wake(queue)

            timer = asyncio.get_running_loop().call_later(delay, fire)
            self._timers.add(timer)
