"""sqlalchemy-que: a PostgreSQL job queue inside SQLAlchemy, compatible with Ruby's Que 0.x.

Jobs are rows of Que's ``que_jobs`` table, written in the caller's own transaction::

    from sqlalchemy_que import enqueue

    with Session(engine) as session:
        session.add(enqueue("SendEmail", user.id))
        session.commit()   # the job is committed with the caller's other changes

The public names are re-exported here; the other public modules are ``sqlalchemy_que.admin``
(operations), ``.schema`` (migrations and Alembic), ``.asyncio``, ``.flask``, ``.dashboard``,
``.testing`` and ``.pytest_plugin``. Modules whose names start with an underscore are
internal. See ``docs/`` for the guide.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

from . import _tables  # noqa: F401  # our tables join sqlalchemy_que.metadata
from ._enqueue import enqueue, insert_job, insert_jobs, insert_many
from ._errors import (
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
from ._hooks import JobHook, JobOutcome, JobRun, add_job_hook, remove_job_hook
from ._jobs import JobContext, JobDefinition, JobRegistry, default_retry_delay, job
from ._locking import JobLock, LockedJob, locked_job
from ._metrics import QueMetrics, install_metrics
from ._model import FailedJob, QueJob, metadata
from ._pool import WorkerPool
from ._schedule import Schedule, cron, every
from ._stats import JobStats, WorkerState, clear, job_stats, worker_states
from ._tracing import QueTracing, install_tracing
from ._worker import Worker
from .schema import check_schema, migrate

if TYPE_CHECKING:
    from ._async_context import AsyncJobContext
    from ._async_pool import AsyncWorkerPool

#: Names whose modules import SQLAlchemy's asyncio extension: imported on first use, so that
#: the sync API never loads it.
_ASYNC_NAMES = {"AsyncJobContext": "_async_context", "AsyncWorkerPool": "_async_pool"}


def __getattr__(name: str) -> Any:
    module = _ASYNC_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'sqlalchemy_que' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "AsyncJobContext",
    "AsyncWorkerPool",
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
    "remove_job_hook",
    "worker_states",
]

try:
    __version__ = _metadata.version("sqlalchemy-que")
except _metadata.PackageNotFoundError:  # imported from a checkout that is not installed
    __version__ = "0+unknown"
