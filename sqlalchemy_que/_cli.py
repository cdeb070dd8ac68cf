"""The ``sqlalchemy-que`` command: a thin shell over the library's public functions.

::

    sqlalchemy-que migrate --database-url postgresql://localhost/app
    sqlalchemy-que worker myapp.jobs:registry --workers 4 --queue mail
    sqlalchemy-que stats --json
    sqlalchemy-que schedules myapp.jobs:registry
    sqlalchemy-que web --database-url postgresql://localhost/app --read-only
    sqlalchemy-que demo

Settings come from options or their environment variables (``DATABASE_URL``, ``QUE_QUEUE``,
``QUE_WORKER_COUNT``, ``QUE_WAKE_INTERVAL``, ``QUE_SHUTDOWN_TIMEOUT``, ``QUE_LOG_LEVEL``);
``demo`` alone ignores ``DATABASE_URL`` and runs on a throwaway server unless given
``--database-url``.

Exit status: 0 success (for ``worker``, a clean stop); 1 an error, explained on one line
(bad database URL, unreachable server, wrong schema, bad import path); 2 bad usage;
3 ``worker`` stopped with jobs still running after ``--shutdown-timeout`` (their rows are
intact and their locks released as the process exits); 4 ``worker --burst`` worked every
ready job but some of them failed; 128 + N when a second signal N stopped the worker at
once. The operations commands (``retry``, ``delete``, ``cancel``, ``job``...) exit 1 when a
job was left alone because a worker holds it, or does not exist, and say which.
"""

from __future__ import annotations

import datetime
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import psycopg
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from . import _stats, admin, schema
from ._admin_cli import add_admin_commands
from ._async_cli import has_async_handlers, run_async_pool
from ._enqueue import insert_job
from ._errors import QueError
from ._jobs import JobDefinition, JobRegistry
from ._locking import LockedJob
from ._pool import WorkerPool
from ._scheduler import schedule_states
from ._supervisor import child_command, child_environment, supervise
from ._worker import check_completion

__all__ = ["load_handlers", "main", "normalise_database_url"]

F = TypeVar("F", bound=Callable[..., Any])

EXIT_JOBS_STILL_RUNNING = 3

#: ``worker --burst`` exit status when any job run failed (retried or failed for good).
EXIT_JOBS_FAILED = 4


def normalise_database_url(url: str) -> URL:
    """Parse a database URL, choosing the psycopg 3 driver for plain ``postgres://`` and
    ``postgresql://`` URLs (as ``DATABASE_URL`` usually holds them).

    :raises QueError: naming the URL (password hidden) when it cannot be parsed.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise QueError(
            f"cannot parse the database URL {url!r}; expected postgresql://user@host/db"
        ) from None
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername != "postgresql+psycopg":
        raise QueError(
            f"the database URL {parsed.render_as_string()!r} does not use PostgreSQL with "
            "psycopg 3; use postgresql:// or postgresql+psycopg://"
        )
    return parsed


def load_handlers(import_path: str) -> JobRegistry:
    """Import ``module:attribute`` naming a :class:`~sqlalchemy_que.JobRegistry`, a mapping
    of job_class to handler, or a list of job definitions.

    :raises QueError: saying what could not be imported or what was found instead.
    """
    module_name, _, attribute = import_path.partition(":")
    if not module_name or not attribute:
        raise QueError(f"the handlers path {import_path!r} must look like 'package.module:name'")
    # As Celery, RQ, gunicorn and uvicorn do: the project the command runs from is importable
    # (a console script's sys.path starts with its own folder, not the current directory).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise QueError(f"cannot import {module_name!r} (from {import_path!r}): {error}") from None
    try:
        value = getattr(module, attribute)
    except AttributeError:
        raise QueError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if isinstance(value, JobRegistry):
        return value
    if isinstance(value, dict):
        return JobRegistry(value)
    if isinstance(value, list | tuple) and all(isinstance(v, JobDefinition) for v in value):
        registry = JobRegistry()
        registry.add(*value)
        return registry
    raise QueError(
        f"{import_path!r} is {value!r}; expected a JobRegistry, a dict of job_class to "
        "handler, or a list of job definitions"
    )


#: Seconds the library's own connections wait for a server to answer, unless the URL's query
#: or ``connect_args`` give ``connect_timeout``.
DEFAULT_CONNECT_TIMEOUT = 10


def with_connect_timeout(url: URL, options: dict[str, Any]) -> dict[str, Any]:
    """``create_engine`` options giving ``connect_timeout`` its default, unless the URL or
    the options' ``connect_args`` already set it."""
    connect_args = dict(options.get("connect_args") or {})
    if "connect_timeout" not in url.query and "connect_timeout" not in connect_args:
        connect_args["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
    return {**options, "connect_args": connect_args}


def _engine(url: str | None, **options: Any) -> Engine:
    if not url:
        raise QueError("no database URL: pass --database-url or set DATABASE_URL")
    try:
        parsed = normalise_database_url(url)
        return create_engine(parsed, **with_connect_timeout(parsed, options))
    except (ArgumentError, NoSuchModuleError) as error:
        raise QueError(f"cannot use the database URL: {error}") from None


@contextmanager
def _explained() -> Iterator[None]:
    """Turn the library's and the driver's errors into one clear line and exit status 1."""
    try:
        yield
    except QueError as error:
        raise click.ClickException(str(error)) from None
    except DBAPIError as error:
        detail = str(error.orig or error).strip().splitlines()[0]
        if isinstance(error.orig, psycopg.errors.UndefinedTable):
            detail += "; run `sqlalchemy-que migrate` to create que_jobs"
        raise click.ClickException(f"database error: {detail}") from None


def _json_default(value: object) -> str:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return str(value)


def _database_option(function: F) -> F:
    return click.option(
        "--database-url",
        envvar="DATABASE_URL",
        show_envvar=True,
        help="PostgreSQL URL (postgresql://user:password@host/db).",
    )(function)


class _JSONFormatter(logging.Formatter):
    _standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(
                record.created, datetime.timezone.utc
            ).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(
            {key: value for key, value in vars(record).items() if key not in self._standard}
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=_json_default)


def _configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic's INFO lines ("Context impl PostgresqlImpl") say nothing useful to operators.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))


@click.group()
@click.version_option(package_name="sqlalchemy-que")
def main() -> None:
    """sqlalchemy-que: a PostgreSQL job queue compatible with Ruby's Que 0.x."""


@main.command()
@_database_option
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it.")
def migrate(database_url: str | None, sql: bool) -> None:
    """Create que_jobs (or adopt Ruby Que's) and record the revision."""
    with _explained():
        if sql:
            click.echo(schema.migrate_sql(), nl=False)
            return
        engine = _engine(database_url)
        try:
            schema.migrate(engine)
        finally:
            engine.dispose()
    click.echo("que_jobs is at schema version 3, migrations at head")


@main.command()
@_database_option
def check(database_url: str | None) -> None:
    """Exit non-zero, with the reason, unless que_jobs is ready for workers."""
    with _explained():
        engine = _engine(database_url)
        try:
            with engine.connect() as connection:
                schema.check_schema(connection)
        finally:
            engine.dispose()
    click.echo("ok: que_jobs is a Que 0.x schema version 3 table, migrations at head")


def _print_stats(engine: Engine, as_json: bool, *, compact: bool = False) -> None:
    job_stats = _stats.job_stats(engine)
    states = _stats.worker_states(engine)
    counts = admin.counts(engine)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "counts": {name: getattr(counts, name) for name in counts.__slots__},
                    "job_stats": [
                        {name: getattr(row, name) for name in row.__slots__} for row in job_stats
                    ],
                    "worker_states": [
                        {name: getattr(row, name) for name in row.__slots__} for row in states
                    ],
                },
                default=_json_default,
                # --watch prints one object a line, for line-by-line readers (jq, log shippers).
                indent=None if compact else 2,
                separators=(",", ":") if compact else None,
            )
        )
        return
    header = ("queue", "job_class", "count", "working", "errored", "max_errors", "oldest_run_at")
    rows = [
        (
            repr(row.queue),
            row.job_class,
            str(row.count),
            str(row.count_working),
            str(row.count_errored),
            str(row.highest_error_count),
            row.oldest_run_at.isoformat(timespec="seconds"),
        )
        for row in job_stats
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    for line in (header, *rows):
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    if not rows:
        click.echo("(no jobs)")
    click.echo(
        f"\nready {counts.ready}, scheduled {counts.scheduled}, retrying {counts.retrying}, "
        f"working {counts.working}, failed {counts.failed}"
    )
    click.echo(f"\n{len(states)} job(s) being worked")
    for state in states:
        click.echo(
            f"  job {state.job_id} {state.job_class} (queue {state.queue!r}) by backend "
            f"{state.pg_backend_pid}, {state.pg_state}"
        )


@main.command("stats")
@_database_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--watch", type=click.FloatRange(min=0.1), default=None, help="Refresh every N seconds."
)
def stats_command(database_url: str | None, as_json: bool, watch: float | None) -> None:
    """Job stats per queue and job_class, and the jobs being worked right now."""
    with _explained():
        engine = _engine(database_url)
        try:
            while True:
                if watch is not None and not as_json:
                    click.clear()
                _print_stats(engine, as_json, compact=watch is not None)
                if watch is None:
                    break
                time.sleep(watch)
        finally:
            engine.dispose()


@main.command()
@_database_option
@click.argument("job_class")
@click.argument("args_json", default="[]")
@click.option("--queue", default=None, help="Queue name (default '').")
@click.option("--priority", type=int, default=None, help="Lower runs first (default 100).")
@click.option(
    "--run-at",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z"]),
    default=None,
    help="When to run, with a UTC offset: 2030-01-01T09:00:00+00:00.",
)
def enqueue(
    database_url: str | None,
    job_class: str,
    args_json: str,
    queue: str | None,
    priority: int | None,
    run_at: datetime.datetime | None,
) -> None:
    """Enqueue JOB_CLASS with ARGS_JSON, a JSON array of arguments (default [])."""
    try:
        args = json.loads(args_json)
    except json.JSONDecodeError as error:
        raise click.BadParameter(
            f"{args_json!r} is not JSON: {error}", param_hint="ARGS_JSON"
        ) from None
    if not isinstance(args, list):
        raise click.BadParameter(f"{args_json!r} is not a JSON array", param_hint="ARGS_JSON")
    with _explained():
        engine = _engine(database_url)
        try:
            with engine.begin() as connection:
                job_id = insert_job(
                    connection, job_class, *args, queue=queue, priority=priority, run_at=run_at
                )
        finally:
            engine.dispose()
    click.echo(f"enqueued job {job_id}")


@main.command()
@click.argument("import_path")
@_database_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def schedules(import_path: str, database_url: str | None, as_json: bool) -> None:
    """List the schedules of the registry at IMPORT_PATH with their last and next tick."""
    with _explained():
        registry = load_handlers(import_path)
        engine = _engine(database_url)
        try:
            print_schedules(engine, registry, as_json, where=import_path)
        finally:
            engine.dispose()


def print_schedules(engine: Engine, registry: JobRegistry, as_json: bool, *, where: str) -> None:
    """Print the registry's schedules with their last and next tick (the ``schedules``
    command, here and under ``flask que``)."""
    states = schedule_states(engine, registry.schedules.values())
    if as_json:
        click.echo(
            json.dumps(
                [{name: getattr(s, name) for name in s.__slots__} for s in states],
                default=_json_default,
                indent=2,
            )
        )
        return
    if not states:
        click.echo(f"(no schedules in {where})")
        return
    header = ("schedule", "job_class", "when", "missed", "last_tick", "last_job", "next_tick")
    rows = [
        (
            state.name,
            state.job_class,
            state.timing,
            state.missed,
            state.last_tick.isoformat(timespec="seconds") if state.last_tick else "-",
            "-" if state.last_job_id is None else str(state.last_job_id),
            state.next_tick.isoformat(timespec="seconds"),
        )
        for state in states
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    for line in (header, *rows):
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


@contextmanager
def _engine_for(extra: dict[str, Any]) -> Iterator[Engine]:
    with _explained():
        engine = _engine(extra.get("database_url"))
        try:
            yield engine
        finally:
            engine.dispose()


add_admin_commands(main, options=_database_option, engine_for=_engine_for)


@main.command()
@click.argument("import_path")
@_database_option
@click.option(
    "--queue",
    "queue_options",
    multiple=True,
    metavar="NAME[=N]",
    help="A queue to work; repeat for several, worked in the order given. NAME=N gives the "
    "queue N workers of its own (then every --queue needs a count) [default: QUE_QUEUE, "
    "else ''].",
)
@click.option(
    "--workers",
    envvar="QUE_WORKER_COUNT",
    show_envvar=True,
    type=click.IntRange(min=1),
    default=None,
    help="Worker threads per process [default: 4, or the sum of the --queue counts]; with "
    "async def handlers, jobs at once per process [default: 10].",
)
@click.option(
    "--processes",
    envvar="QUE_PROCESSES",
    show_envvar=True,
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes, each with --workers threads, under one supervising parent.",
)
@click.option(
    "--batch-size",
    envvar="QUE_BATCH_SIZE",
    show_envvar=True,
    type=click.IntRange(min=1),
    default=None,
    help="The most jobs a worker locks at once [default: 20, or 100 with --completion batch].",
)
@click.option(
    "--completion",
    envvar="QUE_COMPLETION",
    show_envvar=True,
    type=click.Choice(["job", "batch"]),
    default="job",
    show_default=True,
    help="Commit each job on its own, or jobs that did not use the database together.",
)
@click.option(
    "--wake-interval",
    envvar="QUE_WAKE_INTERVAL",
    show_envvar=True,
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to sleep when no job is ready.",
)
@click.option(
    "--shutdown-timeout",
    envvar="QUE_SHUTDOWN_TIMEOUT",
    show_envvar=True,
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds jobs in progress get to finish after SIGTERM/SIGINT (default: no limit).",
)
@click.option(
    "--burst",
    is_flag=True,
    help="Work until no job is ready, then exit: 0, or 4 when any job failed.",
)
@click.option(
    "--listen/--no-listen",
    envvar="QUE_LISTEN",
    show_envvar=True,
    default=True,
    show_default=True,
    help="Start jobs as soon as they are committed (LISTEN/NOTIFY); polling always runs.",
)
@click.option(
    "--log-level",
    envvar="QUE_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.option(
    "--metrics-port",
    envvar="QUE_METRICS_PORT",
    show_envvar=True,
    type=click.IntRange(min=1, max=65535),
    default=None,
    help="Serve Prometheus metrics on this port (extra 'prometheus'; one process only).",
)
@click.option(
    "--metrics-addr", default="127.0.0.1", show_default=True, help="Address for --metrics-port."
)
def worker(
    import_path: str,
    database_url: str | None,
    queue_options: tuple[str, ...],
    workers: int | None,
    processes: int,
    batch_size: int | None,
    completion: str,
    wake_interval: float,
    shutdown_timeout: float | None,
    burst: bool,
    listen: bool,
    log_level: str,
    log_format: str,
    metrics_port: int | None,
    metrics_addr: str,
) -> None:
    """Run a pool of workers for the handlers at IMPORT_PATH (module:attribute).

    A registry with any async def handler runs in the async pool (AsyncWorkerPool), which
    runs its plain def handlers too."""
    _configure_logging(log_level, log_format)
    if metrics_port is not None and processes > 1:
        raise click.BadParameter(
            f"--metrics-port serves one process; got --processes {processes}",
            param_hint="--metrics-port",
        )
    queues = parse_queues(queue_options or (os.environ.get("QUE_QUEUE", ""),))
    options: dict[str, Any] = {
        "queues": queues,
        "workers": workers,
        "batch_size": batch_size,
        "completion": check_completion(completion),
        "wake_interval": wake_interval,
        "listen": listen,
    }
    with _explained():
        handlers = load_handlers(import_path)
        if has_async_handlers(handlers) and processes == 1:
            metrics = None if metrics_port is None else (metrics_port, metrics_addr)
            _run_async_worker(handlers, database_url, options, burst, shutdown_timeout, metrics)
            return
        # One connection per worker while it works, and a little room for checks.
        threads = workers or (sum(queues.values()) if isinstance(queues, dict) else 4)
        engine = _engine(database_url, pool_size=threads, max_overflow=2, pool_pre_ping=True)
        try:
            if has_async_handlers(handlers):  # each child process runs an async pool
                _async_worker_options(options)
            else:
                pool = WorkerPool(engine, handlers, **options)
                if processes > 1:
                    pool._preflight()  # refuse a bad setting once, here, not in every child
        finally:
            if processes > 1:
                engine.dispose()
        if processes > 1:
            arguments = ["worker", import_path, *_child_options(queue_options, workers)]
            arguments += ["--completion", completion]
            if batch_size is not None:
                arguments += ["--batch-size", str(batch_size)]
            arguments += ["--wake-interval", repr(wake_interval)]
            arguments += ["--listen" if listen else "--no-listen"]
            arguments += ["--log-level", log_level, "--log-format", log_format]
            if shutdown_timeout is not None:
                arguments += ["--shutdown-timeout", repr(shutdown_timeout)]
            if burst:
                arguments.append("--burst")
            sys.exit(
                supervise(
                    child_command(arguments),
                    processes,
                    env=child_environment(
                        str(normalise_database_url(database_url).render_as_string(False))
                        if database_url
                        else None
                    ),
                    burst=burst,
                )
            )
        if metrics_port is not None:
            from ._metrics import install_metrics

            install_metrics(engine, workers=[pool]).serve(metrics_port, metrics_addr)
        try:
            still_running = pool.run(burst=burst, shutdown_timeout=shutdown_timeout)
        finally:
            engine.dispose()
    exit_if_jobs_still_running(still_running)
    exit_if_jobs_failed(pool, burst)


def _async_worker_options(options: dict[str, Any]) -> dict[str, Any]:
    """The sync pool's options as the async pool's (``--workers`` is its concurrency)."""
    if options["completion"] != "job":
        raise QueError(
            "--completion batch is for plain def handlers; this registry has async def "
            "handlers, which the async worker completes one job per transaction"
        )
    queues = options["queues"]
    concurrency = options["workers"] or (None if isinstance(queues, dict) else 10)
    return {**options, "concurrency": concurrency}


def _run_async_worker(
    handlers: JobRegistry,
    database_url: str | None,
    options: dict[str, Any],
    burst: bool,
    shutdown_timeout: float | None,
    metrics: tuple[int, str] | None,
) -> None:
    """Run the registry's handlers in an AsyncWorkerPool: it has ``async def`` handlers."""
    settings = _async_worker_options(options)
    gauges = _engine(database_url, pool_size=1, max_overflow=0)  # checks the URL too
    url = normalise_database_url(str(database_url))
    installed = None
    if metrics is not None:
        from ._metrics import install_metrics

        installed = install_metrics(gauges)  # run counts come from the job hooks
        installed.serve(*metrics)
    queues = settings["queues"]
    size = settings["concurrency"] or sum(queues.values())
    engine_options = with_connect_timeout(
        url, {"pool_size": size, "max_overflow": 2, "pool_pre_ping": True}
    )
    try:
        cancelled, failed = run_async_pool(
            url,
            handlers,
            engine_options=engine_options,
            queues=queues,
            concurrency=settings["concurrency"],
            batch_size=settings["batch_size"],
            wake_interval=settings["wake_interval"],
            listen=settings["listen"],
            burst=burst,
            shutdown_timeout=shutdown_timeout,
            metrics=installed,
        )
    finally:
        gauges.dispose()
    exit_if_jobs_still_running(cancelled)
    if burst and failed:
        click.echo(f"{failed} job run(s) failed", err=True)
        sys.exit(EXIT_JOBS_FAILED)


def _child_options(queue_options: tuple[str, ...], workers: int | None) -> list[str]:
    arguments: list[str] = []
    for option in queue_options:
        arguments += ["--queue", option]
    if workers is not None:
        arguments += ["--workers", str(workers)]
    return arguments


def parse_queues(options: tuple[str, ...]) -> list[str] | dict[str, int]:
    """``--queue`` values as WorkerPool's ``queues``: a list of names, or, when they carry
    ``=N`` worker counts, a mapping of name to count.

    :raises click.BadParameter: when some carry a count and others do not, or a count is not
        a whole number >= 1.
    """
    counted: dict[str, int] = {}
    plain: list[str] = []
    for option in options:
        name, equals, count = option.rpartition("=")
        if equals and count.isdigit():
            if int(count) < 1:
                raise click.BadParameter(
                    f"{option!r}: a queue's worker count must be >= 1", param_hint="--queue"
                )
            counted[name] = int(count)
        else:
            plain.append(option)
    if counted and plain:
        raise click.BadParameter(
            f"give every --queue a worker count or none: {plain[0]!r} has none, "
            f"{next(iter(counted))!r} has one",
            param_hint="--queue",
        )
    return counted if counted else plain


def exit_if_jobs_failed(pool: WorkerPool, burst: bool) -> None:
    """After a burst: exit 4 when any job run failed, saying how many."""
    if burst and pool.failed:
        click.echo(f"{pool.failed} job run(s) failed", err=True)
        sys.exit(EXIT_JOBS_FAILED)


def exit_if_jobs_still_running(still_running: list[LockedJob]) -> None:
    """After a worker pool's shutdown: name the jobs that outlived the timeout and exit 3."""
    if still_running:
        click.echo(
            f"stopped with {len(still_running)} job(s) still running: "
            + ", ".join(str(job.job_id) for job in still_running),
            err=True,
        )
        sys.exit(EXIT_JOBS_STILL_RUNNING)


@main.command()
@_database_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any."
)
@click.option("--read-only", is_flag=True, help="Hide the buttons and refuse every action.")
def web(database_url: str | None, host: str, port: int, read_only: bool) -> None:
    """Serve the web dashboard (no authentication of its own: keep it on 127.0.0.1, or put
    it behind a proxy that authenticates)."""
    with _explained():
        from .dashboard import create_app  # only this command needs Flask

        engine = _engine(database_url)
        try:
            serve_dashboard(create_app(engine, read_only=read_only), host, port)
        finally:
            engine.dispose()


def serve_dashboard(app: Any, host: str, port: int) -> None:
    """Serve ``app`` with werkzeug's threaded server until interrupted."""
    from werkzeug.serving import make_server

    try:
        server = make_server(host, port, app, threaded=True)
    except OSError as error:
        raise QueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    click.echo(f"que dashboard on http://{server.host}:{server.port}/ (Ctrl-C to stop)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(
            f"warning: listening on {host}, and the dashboard has no authentication of its "
            "own: anyone who reaches the port can retry and delete jobs (see --read-only)",
            err=True,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@main.command()
@click.option(
    "--database-url",
    help="PostgreSQL URL to run on instead of a throwaway server (DATABASE_URL is not read: "
    "only a URL given here makes the demo write to a database of yours).",
)
@click.option("--jobs", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True)
def demo(database_url: str | None, jobs: int, workers: int) -> None:
    """Work a few hundred sample jobs, on a throwaway PostgreSQL unless --database-url."""
    from ._demo import run_demo  # only this command needs it

    with _explained():
        run_demo(
            normalise_database_url(database_url) if database_url else None,
            jobs=jobs,
            workers=workers,
            echo=click.echo,
        )
