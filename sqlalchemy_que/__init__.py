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

from . import _tables  # noqa: F401  # our tables join sqlalchemy_que.metadata
from ._hooks import JobHook, JobOutcome, JobRun, add_job_hook, remove_job_hook
from ._metrics import QueMetrics, install_metrics
from ._pool import WorkerPool
from ._schedule import Schedule, cron, every
from ._scheduler import ScheduleState, schedule_states
from ._tracing import QueTracing, install_tracing
from .enqueue import enqueue, insert_job, insert_jobs, insert_many
from .errors import (
    ConfigurationError,
    FailJob,
    InvalidJobError,
    JobCancelledError,
    JobCrashedError,
    JobLockedError,
    JobTimeoutError,
    LockError,
    LostSessionError,
    QueError,
    RetryJob,
    SchemaError,
    UnknownJobClassError,
    UnsupportedSchemaError,
    WorkerError,
)
from .jobs import JobContext, JobDefinition, JobRegistry, default_retry_delay, job
from .locking import JobLock, LockedJob, locked_job
from .model import FailedJob, QueJob, metadata
from .schema import check_schema, migrate, migrations_path, schema_version, version_location
from .stats import JobStats, WorkerState, clear, job_stats, worker_states
from .worker import Worker, format_last_error

__all__ = [
    "ConfigurationError",
    "FailJob",
    "FailedJob",
    "InvalidJobError",
    "JobCancelledError",
    "JobContext",
    "JobCrashedError",
    "JobDefinition",
    "JobHook",
    "JobLock",
    "JobLockedError",
    "JobOutcome",
    "JobRegistry",
    "JobRun",
    "JobStats",
    "JobTimeoutError",
    "LockError",
    "LockedJob",
    "LostSessionError",
    "QueError",
    "QueJob",
    "QueMetrics",
    "QueTracing",
    "RetryJob",
    "Schedule",
    "ScheduleState",
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
    "cron",
    "default_retry_delay",
    "enqueue",
    "every",
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
    "schedule_states",
    "schema_version",
    "version_location",
    "worker_states",
]

try:
    __version__ = _metadata.version("sqlalchemy-que")
except _metadata.PackageNotFoundError:  # imported from a checkout that is not installed
    __version__ = "0+unknown"
