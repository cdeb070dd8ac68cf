"""Worker processes released together: the timed part of every multi-process drain.

Each child (ours, :mod:`benchmarks.drain_process`; a peer's, :mod:`benchmarks.peer_process`)
sets itself up, prints ``ready``, waits for a line on stdin, works until its queue is empty,
prints one line of JSON about itself (at least ``cpu_seconds``: its CPU since its release)
and exits. The parent waits until all are ready, releases them, and is timed from the release
until the last has exited.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .measure import ServerCpu, Snapshot, take, take_end

__all__ = ["ROOT", "run_released"]

#: Where ``python -m benchmarks...`` finds the package.
ROOT = Path(__file__).resolve().parent.parent

#: The longest a multi-process run may take before it is stopped as failed.
_TIMEOUT = 600.0


def run_released(
    argvs: Sequence[Sequence[str]],
    server: ServerCpu | None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = _TIMEOUT,
) -> tuple[Snapshot, Snapshot, list[dict[str, Any]]]:
    """Start one child per argv, release them together once all are ready, wait for all.

    :returns: the snapshots at the release and after the last exit, and each child's report.
    :raises RuntimeError: when a child does not get ready, fails, or reports no JSON.
    """
    children = [
        subprocess.Popen(
            list(argv),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else None,
        )
        for argv in argvs
    ]
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a drain process did not get ready: {line!r}")
        start = take(server)
        for child in children:  # the barrier's release
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        for child in children:
            child.wait(timeout)
        end = take_end(server)
        outputs = [child.communicate()[0] for child in children]  # and closes the pipes
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            for pipe in (child.stdin, child.stdout):
                if pipe is not None:
                    pipe.close()
    reports: list[dict[str, Any]] = []
    for child, output in zip(children, outputs, strict=True):
        if child.returncode != 0:
            raise RuntimeError(f"a drain process failed with exit code {child.returncode}")
        try:
            reports.append(json.loads(output))
        except ValueError:
            raise RuntimeError(f"a drain process reported no JSON: {output!r}") from None
    return start, end, reports
