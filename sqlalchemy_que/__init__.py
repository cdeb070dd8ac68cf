"""sqlalchemy-que: a PostgreSQL job queue inside SQLAlchemy, compatible with Ruby's Que 0.x.

Jobs are rows of Que's ``que_jobs`` table, written in the caller's own transaction::

    from sqlalchemy_que import enqueue

    with Session(engine) as session:
        session.add(enqueue("SendEmail", user.id))
        session.commit()   # the job is committed with the caller's other changes

The public names are re-exported here; see the documentation in ``docs/`` for the guide.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from ._hooks import JobHook, JobOutcome, JobRun, add_job_hook, remove_job_hook
from ._metrics import QueMetrics, install_metrics
from ._pool import WorkerPool
from ._tracing import QueTracing, install_tracing
from .enqueue import enqueue, insert_job, insert_jobs, insert_many
from .errors import (
    ConfigurationError,
    InvalidJobError,
    LockError,
    LostSessionError,
    QueError,
    SchemaError,
    UnknownJobClassError,
    UnsupportedSchemaError,
    WorkerError,
)
from .jobs import JobContext, JobDefinition, JobRegistry, default_retry_delay, job
from .locking import JobLock, LockedJob, locked_job
from .model import QueJob, metadata
from .schema import check_schema, migrate, migrations_path, schema_version, version_location
from .stats import JobStats, WorkerState, clear, job_stats, worker_states
from .worker import Worker, format_last_error

__all__ = [
    "ConfigurationError",
    "InvalidJobError",
    "JobContext",
    "JobDefinition",
    "JobHook",
    "JobLock",
    "JobOutcome",
    "JobRegistry",
    "JobRun",
    "JobStats",
    "LockError",
    "LockedJob",
    "LostSessionError",
    "QueError",
    "QueJob",
    "QueMetrics",
    "QueTracing",
    "SchemaError",
    "UnknownJobClassError",
    "UnsupportedSchemaError",
    "Worker",
    "WorkerError",
    "WorkerPool",
    "WorkerState",
    "add_job_hook",
    "check_schema",
    "clear",
    "default_retry_delay",
    "enqueue",
    "format_last_error",
    "insert_job",
    "insert_jobs",
    "insert_many",
    "install_metrics",
    "install_tracing",
    "job",
    "job_stats",
    "locked_job",
    "metadata",
    "migrate",
    "migrations_path",
    "remove_job_hook",
    "schema_version",
    "version_location",
    "worker_states",
]

try:
    __version__ = _metadata.version("sqlalchemy-que")
except _metadata.PackageNotFoundError:  # imported from a checkout that is not installed
    __version__ = "0+unknown"
