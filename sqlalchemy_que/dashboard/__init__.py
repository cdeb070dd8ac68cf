"""A web dashboard of the queues: a Flask blueprint to mount in an app, or a standalone app.

Install with ``pip install "sqlalchemy-que[flask]"`` (it needs Flask only). Mount it in an
app, behind the app's own authentication::

    from flask import Flask
    from sqlalchemy_que.dashboard import dashboard_blueprint

    app = Flask(__name__)
    app.secret_key = ...  # the CSRF token of the actions lives in the Flask session
    blueprint = dashboard_blueprint(engine, authorize=lambda: current_user.is_admin)
    app.register_blueprint(blueprint)  # at /que

or run it on its own: ``sqlalchemy-que web --database-url URL`` (127.0.0.1:8080), which
calls :func:`create_app`.

Pages: the queues with their jobs by state and a chart of the jobs flowing in and out; the
jobs, filtered by queue, job_class and state, paged along que_jobs's primary key; one job in
full; the jobs being worked right now, by any worker (Ruby's and Go's too); the failed jobs.
Retry and delete are POST requests carrying a CSRF token and go through
:mod:`sqlalchemy_que.admin`, which never touches a job a worker holds. With
``read_only=True`` the buttons are gone and every POST is refused with 403.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine

from sqlalchemy_que import ConfigurationError

if TYPE_CHECKING:
    from flask import Blueprint, Flask

__all__ = ["create_app", "dashboard_blueprint"]


class _HasEngine(Protocol):
    """Flask-SQLAlchemy's ``db`` (its ``engine`` read in the app context of each request)."""

    @property
    def engine(self) -> Engine: ...


def _flask() -> None:
    try:
        import flask  # noqa: F401
    except ImportError as error:
        raise ConfigurationError(
            "the dashboard needs Flask: pip install 'sqlalchemy-que[flask]'"
        ) from error


def _engine_getter(bind: Engine | _HasEngine | Callable[[], Engine]) -> Callable[[], Engine]:
    if isinstance(bind, Engine):
        return lambda: bind
    if hasattr(type(bind), "engine"):  # read in a request's app context, not now
        return lambda: bind.engine  # type: ignore[union-attr]
    if callable(bind):
        return bind
    raise ConfigurationError(
        f"the dashboard needs an Engine, Flask-SQLAlchemy's db, or a function returning an "
        f"Engine; got {bind!r}"
    )


def _positive(name: str, value: object, *, whole: bool = False) -> None:
    kinds = int if whole else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        kind = "a whole number >= 1" if whole else "a positive number of seconds"
        raise ConfigurationError(f"{name} must be {kind}, got {value!r}")


def dashboard_blueprint(
    bind: Engine | _HasEngine | Callable[[], Engine],
    *,
    read_only: bool = False,
    authorize: Callable[[], object] | None = None,
    url_prefix: str | None = "/que",
    name: str = "que_dashboard",
    refresh_seconds: float = 5.0,
    page_size: int = 50,
    window: int = 10_000,
    count_limit: int = 10_000,
    cache_seconds: float = 2.0,
    sample_seconds: float = 5.0,
    history_seconds: float = 900.0,
) -> Blueprint:
    """The dashboard as a Flask blueprint; register it with ``app.register_blueprint``.

    The actions keep a CSRF token in the Flask session, so the app needs a ``secret_key``
    (unless ``read_only``). The blueprint has no authentication of its own: give
    ``authorize``, or add a ``before_request`` function to the blueprint returned.

    :param bind: the Engine of the database, Flask-SQLAlchemy's ``db`` (its engine is read
        in each request's app context), or a function returning an Engine.
    :param read_only: hide the buttons and refuse every POST with 403.
    :param authorize: called before each request of the dashboard: ``True`` lets it
        through, ``False`` or ``None`` answers 403, a response (a redirect to a login page)
        is sent instead.
    :param url_prefix: where the pages are mounted (default ``/que``).
    :param name: the blueprint's name (for ``url_for("que_dashboard.jobs")``).
    :param refresh_seconds: how often an open page refreshes its data.
    :param page_size: jobs per page.
    :param window: the most rows one page of jobs reads to apply the job_class and state
        filters (past it the page says so and the next page goes on from there).
    :param count_limit: the most jobs counted per queue; a larger queue shows the
        planner's estimates (``~N``), from the statistics ANALYZE keeps.
    :param cache_seconds: how long the worker states are kept between two reads.
    :param sample_seconds: the least time between two samples of the throughput chart.
    :param history_seconds: how far back the chart goes.
    :raises ConfigurationError: for a bad option, naming it, or when Flask is missing.
    """
    _flask()
    from ._views import Options, make_blueprint

    for option, value in (
        ("refresh_seconds", refresh_seconds),
        ("cache_seconds", cache_seconds),
        ("sample_seconds", sample_seconds),
        ("history_seconds", history_seconds),
    ):
        _positive(option, value)
    for option, value in (("page_size", page_size), ("window", window)):
        _positive(option, value, whole=True)
    _positive("count_limit", count_limit, whole=True)
    if authorize is not None and not callable(authorize):
        raise ConfigurationError(f"authorize must be a function, got {authorize!r}")
    options = Options(
        engine=_engine_getter(bind),
        read_only=bool(read_only),
        authorize=authorize,
        refresh_seconds=float(refresh_seconds),
        page_size=page_size,
        window=max(window, page_size + 1),
        count_limit=count_limit,
        cache_seconds=float(cache_seconds),
        sample_seconds=float(sample_seconds),
        history_seconds=float(history_seconds),
    )
    return make_blueprint(options, name=name, url_prefix=url_prefix)


def create_app(
    engine: Engine,
    *,
    read_only: bool = False,
    secret_key: str | bytes | None = None,
    **options: Any,
) -> Flask:
    """A Flask app serving only the dashboard, at ``/`` (what ``sqlalchemy-que web`` runs).

    :param secret_key: signs the session cookie holding the CSRF token; default a random key
        of this process (a restart asks the browser to reload before its next action).
    :param options: the other options of :func:`dashboard_blueprint`.
    """
    _flask()
    from flask import Flask

    app = Flask("sqlalchemy_que.dashboard")
    app.secret_key = secret_key or secrets.token_bytes(32)
    app.config["SESSION_COOKIE_SAMESITE"] = "Strict"
    options.setdefault("url_prefix", None)
    app.register_blueprint(dashboard_blueprint(engine, read_only=read_only, **options))
    return app
