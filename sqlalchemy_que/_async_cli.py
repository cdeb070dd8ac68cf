"""``sqlalchemy-que worker`` for a registry with ``async def`` handlers: an
:class:`~sqlalchemy_que.AsyncWorkerPool` on its own event loop, with the sync command's
signals and exit statuses (SIGTERM/SIGINT: finish running jobs within ``--shutdown-timeout``,
then cancel them; a second signal exits at once)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL

from ._jobs import JobRegistry, is_async_handler
from ._locking import LockedJob

if TYPE_CHECKING:
    from ._metrics import QueMetrics

__all__ = ["has_async_handlers", "run_async_pool"]

logger = logging.getLogger("sqlalchemy_que.worker")


def has_async_handlers(registry: JobRegistry) -> bool:
    """True when any handler of ``registry`` is an ``async def``: the CLI then runs the
    async pool (which runs the plain handlers too)."""
    return any(is_async_handler(definition.handler) for definition in registry.values())


def run_async_pool(
    url: URL,
    registry: JobRegistry,
    *,
    engine_options: dict[str, Any],
    queues: Sequence[str] | Mapping[str, int],
    concurrency: int | None,
    batch_size: int | None,
    wake_interval: float,
    listen: bool,
    burst: bool,
    shutdown_timeout: float | None,
    metrics: QueMetrics | None = None,
) -> tuple[list[LockedJob], int]:
    """Run the pool until it ends (burst) or a signal stops it; return the jobs cancelled
    at the shutdown timeout and the number of failed runs."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from ._async_pool import AsyncWorkerPool

    async def main() -> tuple[list[LockedJob], int]:
        engine = create_async_engine(url, **engine_options)
        pool = AsyncWorkerPool(
            engine,
            registry,
            queues=queues,
            concurrency=concurrency,
            batch_size=batch_size,
            wake_interval=wake_interval,
            listen=listen,
        )
        if metrics is not None:
            metrics.track([pool])  # the busy/idle gauge
        loop = asyncio.get_running_loop()
        received: list[int] = []
        stopping: list[asyncio.Task[list[LockedJob]]] = []

        def on_signal(signum: int) -> None:
            received.append(signum)
            if len(received) > 1:
                logger.warning("second signal (%s): stopping at once", signal.Signals(signum).name)
                os._exit(128 + signum)
            logger.info(
                "%s received: finishing jobs in progress, then stopping "
                "(send it again to stop at once)",
                signal.Signals(signum).name,
            )
            stopping.append(loop.create_task(pool.stop(shutdown_timeout)))

        signals = (signal.SIGTERM, signal.SIGINT)
        for signum in signals:
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await pool.run(burst=burst)
            cancelled = await stopping[0] if stopping else []
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
            await engine.dispose()
        return cancelled, pool.failed

    return asyncio.run(main())
