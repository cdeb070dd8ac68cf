"""Ending a task of our own for certain, and sleeping until woken, on any supported Python.

On Python < 3.12, ``asyncio.wait_for`` returns the inner result, and loses the cancellation,
when the task is cancelled just as the awaited future completes. psycopg before 3.3 waits on
its socket through ``wait_for`` (in 0.1 s steps), so a task cancelled inside one of its
statements or inside ``notifies()`` may go on as if nothing happened. A single
``task.cancel()`` is therefore no promise that the task ends: :func:`end_task` repeats it
until the task has ended, and :func:`wait_event` sleeps without ``wait_for``.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["end_task", "wait_event"]

#: Seconds between two cancellations of a task that has not ended yet.
RECANCEL_INTERVAL = 0.1


async def end_task(task: asyncio.Task[Any], interval: float = RECANCEL_INTERVAL) -> None:
    """Cancel ``task`` and return once it has ended, cancelling it again every ``interval``
    seconds while it runs on. What the task raised is retrieved and dropped: the caller
    asked it to end, not for its outcome."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=interval)
    if not task.cancelled():
        task.exception()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds have passed; returns whether it
    was set. A cancellation of the caller always propagates."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter], timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()
