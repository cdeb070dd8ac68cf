"""Several worker processes under one parent: what ``sqlalchemy-que worker --processes N`` runs.

Each child is a ``sqlalchemy-que worker`` process of its own (its own GIL, its own connections),
started with the parent's options less ``--processes``. The parent:

* forwards SIGTERM and SIGINT to every child (the children run in their own process group, so
  a Ctrl-C in a terminal reaches them once, through the parent); a second signal is
  forwarded too, which stops the children at once;
* restarts a child that exits while it should be running, after a pause that doubles from
  1 s up to 30 s for that slot (back to 1 s once a child has run for a minute), and logs it;
* with ``--burst``, lets children that exit 0 or 4 (their queues are empty; 4: some jobs
  failed) stay stopped, and exits 4 when any child did;
* exits 0 after a clean stop, 3 when any child stopped with jobs still running, 128 + N after
  a second signal N, and 1 when a burst child failed.

On Linux each child also asks the kernel for SIGTERM should the parent die without telling it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["supervise"]

logger = logging.getLogger("sqlalchemy_que.supervisor")

EXIT_JOBS_STILL_RUNNING = 3
EXIT_JOBS_FAILED = 4  # a burst child that worked its queue, some jobs failing
_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 30.0
_STABLE_AFTER = 60.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclasses.dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = _FIRST_BACKOFF
    restart_at: float | None = 0.0
    exit_code: int | None = None


def supervise(
    command: Sequence[str],
    processes: int,
    *,
    env: Mapping[str, str] | None = None,
    burst: bool = False,
    handle_signals: bool = True,
) -> int:
    """Run ``processes`` copies of ``command`` until told to stop; return the exit status.

    :param command: the child's argv.
    :param env: the children's environment; default this process's.
    :param burst: children that exit 0 are done, not restarted; return once all are done.
    """
    slots = [_Slot(index) for index in range(processes)]
    received: list[int] = []
    wake = threading.Event()
    preexec = _die_with_parent if sys.platform.startswith("linux") else None

    def forward(signum: int) -> None:
        for slot in slots:
            if slot.process is not None and slot.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signum)

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            logger.info("%s received: stopping %d worker process(es)", name, processes)
        else:
            logger.warning("second signal (%s): stopping the worker processes at once", name)
        forward(signal.SIGTERM if len(received) == 1 else signum)
        wake.set()

    previous: dict[int, Any] = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        while True:
            now = time.monotonic()
            for slot in slots:
                if slot.process is not None:
                    code = slot.process.poll()
                    if code is None:
                        continue
                    slot.process, slot.exit_code = None, code
                    if received or (burst and code in (0, EXIT_JOBS_FAILED)):
                        slot.restart_at = None
                        continue
                    if now - slot.started > _STABLE_AFTER:
                        slot.backoff = _FIRST_BACKOFF
                    logger.warning(
                        "worker process %d exited with status %s; restarting it in %.0fs",
                        slot.index,
                        code,
                        slot.backoff,
                        extra={"worker_process": slot.index, "exit_code": code},
                    )
                    slot.restart_at = now + slot.backoff
                    slot.backoff = min(slot.backoff * 2, _MAX_BACKOFF)
                if received:
                    slot.restart_at = None
                if slot.restart_at is not None and slot.restart_at <= now:
                    slot.process = subprocess.Popen(
                        list(command),
                        env=dict(env) if env is not None else None,
                        start_new_session=True,
                        preexec_fn=preexec,
                    )
                    slot.started, slot.restart_at = now, None
                    logger.info(
                        "started worker process %d (pid %d)",
                        slot.index,
                        slot.process.pid,
                        extra={"worker_process": slot.index, "child_pid": slot.process.pid},
                    )
            if all(slot.process is None and slot.restart_at is None for slot in slots):
                break
            wake.wait(0.1)
            wake.clear()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for slot in slots:  # never leave a child behind
            if slot.process is not None and slot.process.poll() is None:
                slot.process.kill()
                slot.process.wait()
    if len(received) > 1:
        return 128 + received[-1]
    codes = [slot.exit_code for slot in slots]
    if EXIT_JOBS_STILL_RUNNING in codes:
        return EXIT_JOBS_STILL_RUNNING
    if burst and not received and any(code not in (0, EXIT_JOBS_FAILED) for code in codes):
        return 1
    if burst and EXIT_JOBS_FAILED in codes:
        return EXIT_JOBS_FAILED
    return 0


def child_command(arguments: Sequence[str]) -> list[str]:
    """The argv of one worker process: this interpreter running the CLI."""
    return [sys.executable, "-m", "sqlalchemy_que", *arguments]


def child_environment(database_url: str | None) -> dict[str, str]:
    """The children's environment: this one, with the database URL in it (not in argv, where
    any user could read its password)."""
    env = dict(os.environ)
    if database_url:
        env["DATABASE_URL"] = database_url
    return env
