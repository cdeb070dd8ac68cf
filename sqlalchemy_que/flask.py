"""Flask integration: jobs enqueued with a request's data, handlers that use ``db.session``.

Install with ``pip install "sqlalchemy-que[flask]"`` (Flask and Flask-SQLAlchemy). Register the
extension after Flask-SQLAlchemy's::

    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy
    from sqlalchemy_que import JobContext, JobRegistry
    from sqlalchemy_que.flask import Que

    db = SQLAlchemy()
    jobs = JobRegistry()
    que = Que(db=db, handlers=jobs)

    @jobs.job("SendWelcomeEmail")
    def send_welcome_email(job: JobContext, user_id: int) -> None:
        db.session.get(User, user_id).welcomed = True   # committed with the job's completion

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg://localhost/app"
        db.init_app(app)
        que.init_app(app)
        return app

Enqueueing needs nothing from the extension: ``db.session.add(send_welcome_email.enqueue(
user.id))`` adds the job to the request's session, and it is committed with the request's
other changes, or not at all.

The worker runs each handler inside an application context of the app in which
``db.session`` *is the job's own session* (:attr:`~sqlalchemy_que.JobContext.session`), joined
to the transaction that deletes the job: what the handler writes through ``db.session`` is
committed together with the job's completion, or rolled back with the error that reschedules
it. ``db.session.commit()`` in a handler only flushes. Models with a ``__bind_key__``
(``SQLALCHEMY_BINDS``) go to their own databases, in transactions committed right before the
job's (not atomically with it: see docs/flask.md).

``init_app`` adds a ``flask que`` command group: ``flask que worker``, ``flask que stats``,
``flask que schedules``, ``flask que migrate``, and the operations commands of
``sqlalchemy-que`` (``jobs``, ``job``, ``retry``, ``delete``, ``clear``, ``cancel``,
``purge-failed``) on the app's database. It
reads these configuration keys once, when it runs (later changes to ``app.config`` are not
seen; options of ``flask que worker`` override them):

=======================  =========  ======================================================
Key                      Default    Meaning
=======================  =========  ======================================================
``QUE_QUEUE``            ``""``     the queue ``flask que worker`` works
``QUE_WORKER_COUNT``     ``4``      worker threads, each holding one connection per job
``QUE_WAKE_INTERVAL``    ``5.0``    seconds a worker sleeps when no job is ready
``QUE_SHUTDOWN_TIMEOUT`` ``None``   seconds jobs get to finish after SIGTERM (no limit)
``QUE_LISTEN``           ``True``   wake workers by LISTEN/NOTIFY (off behind PgBouncer's
                                   transaction mode); polling always runs
``QUE_HANDLERS``         ``None``   the handlers, instead of ``Que(handlers=...)``: a
                                    :class:`~sqlalchemy_que.JobRegistry`, a mapping of
                                    job_class to handler, or an import path
                                    ``"package.module:name"`` naming one
``QUE_SYNCHRONOUS``      ``False``  for development and tests: run the jobs enqueued
                                    in ``db.session`` right after its commit, in this
                                    process; ``"raise"`` (or ``True``) raises a job's error
                                    from ``commit()``, ``"log"`` only logs it (see
                                    :func:`sqlalchemy_que.testing.run_synchronously`)
=======================  =========  ======================================================

Numbers may be given as strings (as environment variables loaded into the config are). A
bad value raises :class:`~sqlalchemy_que.WorkerError` naming the key and the value.

With Flask-Migrate on the app (registered before or after this extension), ``flask db migrate``
leaves sqlalchemy-que's tables alone: the extension sets
:func:`sqlalchemy_que.schema.include_object` as Flask-Migrate's ``include_object``, combined
with the app's own filter if it gave one, so that autogenerate neither drops ``que_jobs`` nor
creates it. ``flask que migrate`` creates and upgrades them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import click
from flask import Flask, Response, appcontext_pushed, current_app, has_app_context
from flask.cli import AppGroup
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Engine

from . import schema
from ._admin_cli import add_admin_commands
from ._cli import (
    _configure_logging,
    _explained,
    _print_stats,
    exit_if_jobs_failed,
    exit_if_jobs_still_running,
    load_handlers,
    print_schedules,
)
from ._drain import DatabaseBind, DrainReport, drain_wrapped
from ._errors import ConfigurationError, QueError, WorkerError
from ._flask_session import job_session
from ._jobs import JobContext, JobRegistry
from ._metrics import QueMetrics
from ._pool import WorkerPool, _pool_capacity
from ._sync import OnError, SynchronousMode
from ._worker import ErrorReporter, Handlers
from ._worker import registry_of as _registry

__all__ = ["Que"]

#: The key of the extension in ``app.extensions``.
EXTENSION_KEY = "que"


@dataclasses.dataclass(frozen=True)
class _AppState:
    """What ``init_app`` read for one app."""

    db: SQLAlchemy
    handlers: JobRegistry | None
    queue: str
    workers: int
    wake_interval: float
    shutdown_timeout: float | None
    listen: bool


class Que:
    """The Flask extension: configuration, handlers in an app context, and ``flask que``.

    :param app: the Flask app, or None to call :meth:`init_app` later (app factories).
    :param db: the Flask-SQLAlchemy extension; default: the one registered on the app
        (``app.extensions["sqlalchemy"]``) when :meth:`init_app` runs.
    :param handlers: the jobs the workers run: a :class:`~sqlalchemy_que.JobRegistry`, a
        mapping of job_class to handler, or an iterable of job definitions; default: the
        ``QUE_HANDLERS`` config key. Give one or the other, not both.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        db: SQLAlchemy | None = None,
        handlers: Handlers | None = None,
    ) -> None:
        self.app = app
        self.db = db
        self.handlers = _registry(handlers) if handlers is not None else None
        self._states: weakref.WeakKeyDictionary[Flask, _AppState] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the ``QUE_*`` config of ``app``, register the extension in
        ``app.extensions["que"]`` and the ``flask que`` commands on ``app.cli``.

        Call it after Flask-SQLAlchemy's ``db.init_app(app)``.

        :raises WorkerError: for a bad ``QUE_*`` value, naming the key and the value.
        :raises ConfigurationError: when no Flask-SQLAlchemy extension is registered on the app, or
            another Que is.
        """
        if EXTENSION_KEY in app.extensions:
            raise ConfigurationError(
                f"a Que extension is already registered on the app {app.name!r}; use that instance"
            )
        db = self.db if self.db is not None else app.extensions.get("sqlalchemy")
        if not isinstance(db, SQLAlchemy):
            raise ConfigurationError(
                f"Que needs Flask-SQLAlchemy on the app {app.name!r}: call db.init_app(app) "
                "before que.init_app(app), or pass Que(db=db)"
            )
        config = app.config
        self._states[app] = _AppState(
            db=db,
            handlers=self._config_handlers(config.get("QUE_HANDLERS")),
            queue=_config_queue(config.get("QUE_QUEUE", "")),
            workers=_config_workers(config.get("QUE_WORKER_COUNT", 4)),
            wake_interval=_config_seconds(
                "QUE_WAKE_INTERVAL", config.get("QUE_WAKE_INTERVAL", 5.0), allow_zero=False
            ),
            shutdown_timeout=(
                None
                if (timeout := config.get("QUE_SHUTDOWN_TIMEOUT")) is None
                else _config_seconds("QUE_SHUTDOWN_TIMEOUT", timeout, allow_zero=True)
            ),
            listen=_config_flag("QUE_LISTEN", config.get("QUE_LISTEN", True)),
        )
        synchronous = _config_synchronous(config.get("QUE_SYNCHRONOUS", False))
        if synchronous is not None:
            self._run_synchronously(app, db, self._states[app].handlers, synchronous)
        app.extensions[EXTENSION_KEY] = self
        app.cli.add_command(que_cli)
        if not _exclude_our_tables_from_flask_migrate(app):
            # Flask-Migrate may be registered after us: wire it in when a context is pushed
            # (every `flask db` command pushes one before Alembic reads the arguments).
            appcontext_pushed.connect(_on_appcontext_pushed, app, weak=False)

    def _run_synchronously(
        self, app: Flask, db: SQLAlchemy, handlers: JobRegistry | None, errors: OnError
    ) -> None:
        if handlers is None:
            raise WorkerError("QUE_SYNCHRONOUS needs handlers: pass Que(handlers=...)")
        app_ref = weakref.ref(app)

        def of_this_app(session: Any) -> bool:
            # db.session's Session class is shared by every app of this db.
            return (
                getattr(session, "_db", None) is db
                and has_app_context()
                and current_app._get_current_object() is app_ref()  # type: ignore[attr-defined]
            )

        mode = SynchronousMode(
            db.session,
            handlers,
            errors=errors,
            wrap=lambda handler: _in_app_context(cast(Flask, app_ref()), db, handler),
            accept=of_this_app,
        )
        # Its listeners sit on db.session's Session class, which outlives the app (a test
        # suite makes many): they go with the app.
        weakref.finalize(app, mode.stop)

    def add_metrics_route(
        self, metrics: QueMetrics, *, rule: str = "/metrics", app: Flask | None = None
    ) -> None:
        """Serve ``metrics`` (from :func:`~sqlalchemy_que.install_metrics`) in Prometheus'
        text format at ``rule`` of the app, endpoint ``que_metrics``; the app's own
        ``before_request`` checks (authentication) apply to it as to any view."""

        def que_metrics() -> Response:
            body, content_type = metrics.exposition()
            return Response(body, content_type=content_type)

        self._app(app).add_url_rule(rule, "que_metrics", que_metrics, methods=["GET"])

    def _config_handlers(self, value: object) -> JobRegistry | None:
        if value is None:
            return self.handlers
        if self.handlers is not None:
            raise WorkerError(
                f"QUE_HANDLERS is set ({value!r}) and Que(handlers=...) was given too; "
                "give the handlers one way"
            )
        if isinstance(value, str):
            try:
                return load_handlers(value)
            except QueError as error:
                raise WorkerError(f"QUE_HANDLERS = {value!r}: {error}") from error
        if isinstance(value, Mapping):
            return _registry(value)
        raise WorkerError(
            f"QUE_HANDLERS must be a JobRegistry, a mapping of job_class to handler, or an "
            f"import path 'package.module:name', got {value!r}"
        )

    def _app(self, app: Flask | None) -> Flask:
        if app is not None:
            return app
        if has_app_context():
            return cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
        if self.app is not None:
            return self.app
        raise ConfigurationError(
            "no Flask app: pass app=..., or call this inside an application context"
        )

    def _state(self, app: Flask) -> _AppState:
        try:
            return self._states[app]
        except KeyError:
            raise ConfigurationError(
                f"this Que is not registered on the app {app.name!r}: call que.init_app(app)"
            ) from None

    def worker_pool(
        self,
        *,
        app: Flask | None = None,
        queue: str | None = None,
        workers: int | None = None,
        wake_interval: float | None = None,
        on_error: ErrorReporter | None = None,
        listen: bool | None = None,
    ) -> WorkerPool:
        """A :class:`~sqlalchemy_que.WorkerPool` on the app's ``db.engine`` whose handlers
        run in an application context with ``db.session`` set to the job's session.

        Each worker holds one connection of ``db.engine`` for the whole of each job: the
        pool refuses to start when the engine's pool cannot hand out that many (set
        ``SQLALCHEMY_ENGINE_OPTIONS = {"pool_size": ...}``).

        :param app: default: the current app, else the app given to :class:`Que`.
        :param queue: default ``QUE_QUEUE``.
        :param workers: default ``QUE_WORKER_COUNT``.
        :param wake_interval: default ``QUE_WAKE_INTERVAL``.
        :param on_error: as for :class:`~sqlalchemy_que.Worker`; default none.
        :param listen: default ``QUE_LISTEN``: start jobs as soon as they are committed.
        :raises WorkerError: when no handlers were given.
        """
        app = self._app(app)
        state = self._state(app)
        if state.handlers is None:
            raise WorkerError(
                "no job handlers: pass Que(handlers=...) or set QUE_HANDLERS to "
                "'package.module:registry'"
            )
        with app.app_context():
            engine = state.db.engine
        worker_count = state.workers if workers is None else workers
        if _pool_capacity(engine) < worker_count:
            raise WorkerError(
                f"the app's connection pool ({engine.pool.status()}) hands out fewer "
                f"connections than the {worker_count} workers hold while they run: set "
                f'SQLALCHEMY_ENGINE_OPTIONS = {{"pool_size": {worker_count}}} (plus what the '
                "rest of the process needs), or use fewer workers"
            )
        if on_error is not None:
            on_error = _reporter_in_app_context(app, on_error)
        registry = JobRegistry()
        registry.add(
            *(
                dataclasses.replace(
                    definition, handler=_in_app_context(app, state.db, definition.handler)
                )
                for definition in state.handlers.values()
            )
        )
        # The registry's own schedules (its definitions' come with them): they only enqueue.
        registry._schedules.extend(getattr(state.handlers, "_schedules", ()))
        return WorkerPool(
            engine,
            registry,
            queue=state.queue if queue is None else queue,
            workers=worker_count,
            wake_interval=state.wake_interval if wake_interval is None else wake_interval,
            on_error=on_error,
            listen=state.listen if listen is None else listen,
        )

    def drain(
        self, bind: DatabaseBind | None = None, *, app: Flask | None = None, **options: Any
    ) -> DrainReport:
        """For tests: :func:`sqlalchemy_que.testing.drain` with the app's handlers, each run
        in an application context where ``db.session`` is the job's own Session (as in a
        worker), on ``bind``'s connection and transaction, which is never committed.

        :param bind: a Connection or Session; default ``db.session`` (in an app context).
        :param app: default: the current app, else the app given to :class:`Que`.
        :param options: ``queue``, ``queues``, ``max_jobs``, ``now``, ``raise_errors``.
        :raises WorkerError: when no handlers were given.
        """
        app = self._app(app)
        state = self._state(app)
        if state.handlers is None:
            raise WorkerError("no job handlers: pass Que(handlers=...) or set QUE_HANDLERS")
        if bind is None:
            if not has_app_context():
                raise ConfigurationError("que.drain() without bind= needs an application context")
            bind = state.db.session
        db = state.db
        return drain_wrapped(
            bind,
            state.handlers,
            wrap=lambda handler: _in_app_context(app, db, handler),
            **options,
        )

    def __repr__(self) -> str:
        return f"<Que handlers={sorted(self.handlers) if self.handlers else None!r}>"


def _in_app_context(
    app: Flask, db: SQLAlchemy, handler: Callable[..., object]
) -> Callable[..., object]:
    """Wrap ``handler`` to run in an application context where ``db.session`` is the job's
    Session."""

    @functools.wraps(handler)
    def run_in_app_context(job: JobContext, *args: Any) -> object:
        with app.app_context():
            # Flask-SQLAlchemy scopes db.session by application context: in this one, it is
            # the job's Session, routing binds as db.session does.
            session = job_session(db, job)
            db.session.registry.set(session)  # type: ignore[arg-type]
            result = handler(job, *args)
            # Popping the context runs Flask-SQLAlchemy's teardown, db.session.remove(),
            # which closes the Session, and routing needs the app: first keep what the
            # handler did (flush, and release the session's savepoints). The worker commits
            # the other binds' transactions, then the job's.
            session.commit()
        return result

    return run_in_app_context


def _reporter_in_app_context(app: Flask, on_error: ErrorReporter) -> ErrorReporter:
    """Run the error reporter in an application context (reporters use ``current_app``)."""

    @functools.wraps(on_error)
    def report_in_app_context(error: BaseException, job: JobContext) -> object:
        with app.app_context():
            return on_error(error, job)

    return report_in_app_context


def _exclude_our_tables_from_flask_migrate(app: Flask) -> bool:
    """Add our autogenerate filter to Flask-Migrate's arguments for Alembic on ``app``.

    Flask-Migrate's ``env.py`` passes ``app.extensions["migrate"].configure_args`` to
    ``context.configure``. Returns False while Flask-Migrate is not registered on the app.
    """
    migrate_state = app.extensions.get("migrate")
    configure_args = getattr(migrate_state, "configure_args", None)
    if not isinstance(configure_args, dict):
        return False
    theirs = configure_args.get("include_object")
    if theirs is None or theirs is schema.include_object:
        configure_args["include_object"] = schema.include_object
    elif not getattr(theirs, "_excludes_que_tables", False):
        configure_args["include_object"] = _both_filters(theirs)
    return True


def _both_filters(theirs: Callable[..., bool]) -> Callable[..., bool]:
    def include_object(*args: Any) -> bool:
        return schema.include_object(*args) and bool(theirs(*args))

    include_object._excludes_que_tables = True  # type: ignore[attr-defined]
    return include_object


def _on_appcontext_pushed(app: Flask, **extra: object) -> None:
    if _exclude_our_tables_from_flask_migrate(app):
        appcontext_pushed.disconnect(_on_appcontext_pushed, app)


def _config_queue(value: object) -> str:
    if not isinstance(value, str):
        raise WorkerError(f"QUE_QUEUE must be a str (the queue's name), got {value!r}")
    return value


def _config_flag(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise WorkerError(f"{key} must be true or false, got {value!r}")


def _config_synchronous(value: object) -> OnError | None:
    if value in ("raise", "log"):
        return value
    try:
        on = _config_flag("QUE_SYNCHRONOUS", value)
    except WorkerError:
        raise WorkerError(
            f"QUE_SYNCHRONOUS must be false, true, 'raise' or 'log', got {value!r}"
        ) from None
    return "raise" if on else None


def _config_workers(value: object) -> int:
    number: object = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise WorkerError(f"QUE_WORKER_COUNT must be a whole number >= 1, got {value!r}")
    return number


def _config_seconds(key: str, value: object, *, allow_zero: bool) -> float:
    number: object = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if (
        isinstance(number, bool)
        or not isinstance(number, int | float)
        or not math.isfinite(number)
        or number < 0
        or (number == 0 and not allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise WorkerError(f"{key} must be a number of seconds {bound}, got {value!r}")
    return float(number)


def _current() -> tuple[Que, _AppState]:
    app = cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
    que = app.extensions[EXTENSION_KEY]
    return que, que._state(app)


#: The ``flask que`` command group, added to ``app.cli`` by :meth:`Que.init_app`. Its
#: commands run in an application context of the app.
que_cli = AppGroup("que", help="Work and inspect the sqlalchemy-que job queue.")


@que_cli.command("worker")
@click.option("--queue", default=None, help="Queue to work [default: QUE_QUEUE, else ''].")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker threads [default: QUE_WORKER_COUNT, else 4].",
)
@click.option(
    "--wake-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds to sleep when no job is ready [default: QUE_WAKE_INTERVAL, else 5].",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds jobs in progress get to finish after SIGTERM/SIGINT "
    "[default: QUE_SHUTDOWN_TIMEOUT, else no limit].",
)
@click.option(
    "--burst",
    is_flag=True,
    help="Work until no job is ready, then exit: 0, or 4 when any job failed.",
)
@click.option(
    "--listen/--no-listen",
    default=None,
    help="Start jobs as soon as they are committed [default: QUE_LISTEN, else on].",
)
def worker_command(
    queue: str | None,
    workers: int | None,
    wake_interval: float | None,
    shutdown_timeout: float | None,
    burst: bool,
    listen: bool | None,
) -> None:
    """Run a pool of workers on the app's database, handlers in an app context.

    Exit status 3 when jobs were still running after the shutdown timeout; with --burst,
    4 when any job failed.
    """
    que, state = _current()
    if not logging.getLogger().handlers:
        # The app configured no logging: say what the workers do on stderr, as
        # `sqlalchemy-que worker` does.
        _configure_logging("info", "text")
    with _explained():
        pool = que.worker_pool(
            queue=queue, workers=workers, wake_interval=wake_interval, listen=listen
        )
        if shutdown_timeout is None:
            shutdown_timeout = state.shutdown_timeout
        still_running = pool.run(burst=burst, shutdown_timeout=shutdown_timeout)
    exit_if_jobs_still_running(still_running)
    exit_if_jobs_failed(pool, burst)


@que_cli.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--watch", type=click.FloatRange(min=0.1), default=None, help="Refresh every N seconds."
)
def stats_command(as_json: bool, watch: float | None) -> None:
    """Job stats per queue and job_class, and the jobs being worked right now."""
    _, state = _current()
    with _explained():
        while True:
            if watch is not None and not as_json:
                click.clear()
            _print_stats(state.db.engine, as_json, compact=watch is not None)
            if watch is None:
                break
            time.sleep(watch)


@que_cli.command("schedules")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def schedules_command(as_json: bool) -> None:
    """The schedules of the app's handlers, with their last and next tick."""
    _, state = _current()
    with _explained():
        if state.handlers is None:
            raise WorkerError(
                "no job handlers: pass Que(handlers=...) or set QUE_HANDLERS to "
                "'package.module:registry'"
            )
        print_schedules(state.db.engine, state.handlers, as_json, where="the app's handlers")


@que_cli.command("migrate")
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it.")
def migrate_command(sql: bool) -> None:
    """Create que_jobs (or adopt Ruby Que's) on the app's database."""
    _, state = _current()
    with _explained():
        if sql:
            click.echo(schema.migrate_sql(), nl=False)
            return
        schema.migrate(state.db.engine)
    click.echo("que_jobs is at schema version 3, migrations at head")


@contextlib.contextmanager
def _app_engine(extra: dict[str, Any]) -> Iterator[Engine]:
    _, state = _current()
    with _explained():
        yield state.db.engine


def _no_options(function: Any) -> Any:
    return function


add_admin_commands(que_cli, options=_no_options, engine_for=_app_engine)
