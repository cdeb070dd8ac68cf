"""Peer queues drained beside ours, when installed: pgqueuer and procrastinate.

``pip install -e '.[bench-peers]'`` installs them; a peer that is not installed is skipped
with a message. Each peer lives in a schema of its own on the suite's server
(:data:`PGQUEUER_SCHEMA`, :data:`PROCRASTINATE_SCHEMA`, created with the peer's own installer:
``pgq install``, procrastinate's ``schema_manager.apply_schema_async()``; dropped afterwards),
and is driven through its own documented API by :mod:`benchmarks.peer_process`.

The yardstick is ours (:mod:`benchmarks.drain`): before each run the peer's tables are
emptied, the same number of no-op jobs is enqueued in one bulk call of the peer's own
(pgqueuer's ``Queries.enqueue`` with lists, procrastinate's ``batch_defer_async``) and the
job table is vacuumed; then P processes, each set up and connected, are released together
(:mod:`benchmarks.barrier`) and timed until the last has exited, which each does when the
peer's drain mode finds no job left (pgqueuer ``QueueExecutionMode.drain``, procrastinate
``wait=False``). The jobs still queued afterwards are reported on the run; the rate counts
only the jobs worked.

What is drained is :data:`PLAN`, one :class:`Peer` a line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from importlib import metadata

from sqlalchemy import text

from .barrier import ROOT, run_released
from .database import BenchDatabase
from .measure import Run

__all__ = [
    "LIBRARIES",
    "PGQUEUER_SCHEMA",
    "PLAN",
    "PROCRASTINATE_SCHEMA",
    "Peer",
    "drop",
    "install",
    "missing",
    "schema",
    "version",
]

PGQUEUER_SCHEMA = "que_bench_pgqueuer"
PROCRASTINATE_SCHEMA = "que_bench_procrastinate"

#: Each peer library and the modules it needs (the driver it is run with included).
LIBRARIES: dict[str, tuple[str, ...]] = {
    "pgqueuer": ("pgqueuer", "asyncpg"),
    "procrastinate": ("procrastinate",),
}

#: The tables emptied before each run (the job table first: it is the one vacuumed).
_TABLES = {
    "pgqueuer": tuple(
        f"{PGQUEUER_SCHEMA}.{table}"
        for table in ("pgqueuer", "pgqueuer_log", "pgqueuer_statistics")
    ),
    "procrastinate": tuple(
        f"{PROCRASTINATE_SCHEMA}.{table}"
        for table in ("procrastinate_jobs", "procrastinate_events", "procrastinate_workers")
    ),
}

#: The jobs not yet worked, and the jobs worked successfully.
_LEFT = {
    "pgqueuer": f"SELECT count(*) FROM {PGQUEUER_SCHEMA}.pgqueuer",
    "procrastinate": (
        f"SELECT count(*) FROM {PROCRASTINATE_SCHEMA}.procrastinate_jobs "
        "WHERE status IN ('todo', 'doing')"
    ),
}
_DONE = {
    "pgqueuer": (
        f"SELECT count(*) FROM {PGQUEUER_SCHEMA}.pgqueuer_log WHERE status = 'successful'"
    ),
    "procrastinate": (
        f"SELECT count(*) FROM {PROCRASTINATE_SCHEMA}.procrastinate_jobs WHERE status = 'succeeded'"
    ),
}


def missing(library: str) -> str | None:
    """Why ``library`` cannot be measured here, or None when it can."""
    absent = [name for name in LIBRARIES[library] if importlib.util.find_spec(name) is None]
    if absent:
        return (
            f"{library} skipped: {', '.join(absent)} not installed "
            "(pip install -e '.[bench-peers]')"
        )
    return None


def version(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "unknown"


def schema(library: str) -> str:
    """The schema the peer's tables live in."""
    return PGQUEUER_SCHEMA if library == "pgqueuer" else PROCRASTINATE_SCHEMA


def _environment(database: BenchDatabase, library: str) -> dict[str, str]:
    """The libpq environment of the suite's database, pointed at the peer's schema."""
    env = database.libpq_environment()
    if library == "pgqueuer":
        env["PGQUEUER_SCHEMA"] = PGQUEUER_SCHEMA
        env["PGOPTIONS"] = f"-c search_path={PGQUEUER_SCHEMA}"
    else:
        env["PGOPTIONS"] = f"-c search_path={PROCRASTINATE_SCHEMA}"
    return env


def _child(library: str, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.peer_process", library, *arguments]


def _call(database: BenchDatabase, library: str, argv: list[str]) -> None:
    result = subprocess.run(
        argv,
        cwd=ROOT,
        env=_environment(database, library),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[1:])} failed (exit {result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )


def install(database: BenchDatabase, library: str) -> None:
    """Create the peer's schema and objects, with the peer's own installer."""
    drop(database, library)
    if library == "pgqueuer":
        # pgq install creates the schema named by PGQUEUER_SCHEMA.
        _call(database, library, [sys.executable, "-m", "pgqueuer", "install"])
    else:
        with database.admin.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {PROCRASTINATE_SCHEMA}"))
        _call(database, library, _child(library, "install"))


def drop(database: BenchDatabase, library: str) -> None:
    with database.admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {schema(library)} CASCADE"))


def _count(database: BenchDatabase, sql: str) -> int:
    with database.admin.connect() as connection:
        count: int = connection.execute(text(sql)).scalar_one()
        return count


def _refill(database: BenchDatabase, library: str, jobs: int) -> None:
    tables = _TABLES[library]
    with database.admin.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(tables)} CASCADE"))
    _call(database, library, _child(library, "enqueue", "--jobs", str(jobs)))
    queued = _count(database, _LEFT[library])
    if queued != jobs:
        raise RuntimeError(f"{library} holds {queued} queued jobs after enqueueing {jobs}")
    with database.admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"VACUUM ANALYZE {tables[0]}"))


@dataclasses.dataclass(frozen=True)
class Peer:
    """One peer drain figure: ``processes`` processes of one library's worker.

    :param library: ``pgqueuer`` or ``procrastinate``.
    :param processes: worker processes released together.
    :param batch_size: pgqueuer: ``run(batch_size=...)``, the jobs one dequeue takes.
    :param managers: pgqueuer: managers (``PgQueuer``, one asyncpg connection each) per process.
    :param concurrency: procrastinate: ``run_worker_async(concurrency=...)``, the jobs one
        worker runs at once.
    """

    library: str
    processes: int
    batch_size: int | None = None
    managers: int = 1
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if self.library not in LIBRARIES:
            raise ValueError(f"unknown peer library {self.library!r}; choose from {LIBRARIES}")
        needed = "batch_size" if self.library == "pgqueuer" else "concurrency"
        if getattr(self, needed) is None:
            raise ValueError(f"a {self.library} peer needs {needed}")

    @property
    def key(self) -> str:
        if self.library == "pgqueuer":
            return f"peers.pgqueuer.{self.processes}x{self.managers}.b{self.batch_size}"
        return f"peers.procrastinate.{self.processes}.c{self.concurrency}"

    @property
    def label(self) -> str:
        processes = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        if self.library == "pgqueuer":
            managers = "" if self.managers == 1 else f" x {self.managers} managers"
            how = f"{processes}{managers}, batch_size={self.batch_size}"
        else:
            how = f"{processes}, concurrency={self.concurrency}"
        return f"{self.library} {version(self.library)}: {how}"

    def _argv(self) -> list[str]:
        if self.library == "pgqueuer":
            options = ["--managers", str(self.managers), "--batch-size", str(self.batch_size)]
        else:
            options = ["--concurrency", str(self.concurrency)]
        return _child(self.library, "work", *options)

    def measure(self, database: BenchDatabase, jobs: int) -> Run:
        """One drain of ``jobs`` fresh jobs."""
        _refill(database, self.library, jobs)
        start, end, reports = run_released(
            [self._argv()] * self.processes,
            database.server_cpu,
            env=_environment(database, self.library),
        )
        left = _count(database, _LEFT[self.library])
        done = _count(database, _DONE[self.library])
        run = Run.between(
            start,
            end,
            (jobs - left) / (end.wall - start.wall),
            children=True,
            detail={
                "library": self.library,
                "version": version(self.library),
                "processes": self.processes,
                "batch_size": self.batch_size,
                "managers_per_process": self.managers,
                "concurrency": self.concurrency,
                "jobs": jobs,
                "left_behind": left,
                "succeeded": done,
                "cpu_children_rusage": end.cpu_children - start.cpu_children,
                "process_reports": reports,
            },
        )
        run.cpu_client = sum(report["cpu_seconds"] for report in reports)
        return run


#: The peers' drains, one a line. pgqueuer scales by processes of one manager each (its
#: deployment guide), here at its default batch size and at a large one, and with one process
#: per core; procrastinate with one worker process running jobs concurrently (each of its
#: drains of 20,000 jobs takes over a minute on 2 cores). Duplicate keys run once.
PLAN: tuple[Peer, ...] = (
    Peer("pgqueuer", processes=4, batch_size=10),
    Peer("pgqueuer", processes=8, batch_size=100),
    Peer("pgqueuer", processes=os.cpu_count() or 1, batch_size=100),
    Peer("procrastinate", processes=1, concurrency=4),
)
