"""The Flask integration, through the example app of ``docs/examples/flask_app.py``: jobs
enqueued with a request's data, handlers writing through ``db.session`` atomically with the
job's completion, configuration, and the ``flask que`` commands."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import pytest
from click.testing import CliRunner
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Engine, create_engine, inspect, text

import sqlalchemy_que._cli
from docs.examples import flask_app
from docs.examples.flask_app import User, create_app, db, que
from sqlalchemy_que import JobContext, JobRegistry, QueError, Worker, WorkerError, WorkerPool
from sqlalchemy_que.flask import Que

from .conftest import wait_for
from .helpers import add_job, job_rows

DOCS = Path(__file__).resolve().parent.parent / "docs"


class Outbox:
    """A ``send_mail`` that records what was sent, or raises when told to."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.error: Exception | None = None
        self.before_send: list[Any] = []

    def __call__(self, to: str, subject: str) -> None:
        for check in self.before_send:
            check()
        if self.error is not None:
            raise self.error
        self.sent.append((to, subject))


@pytest.fixture
def outbox() -> Outbox:
    return Outbox()


@pytest.fixture
def app(database_url: str, engine: Engine, outbox: Outbox) -> Iterator[flask.Flask]:
    app = create_app(database_url, send_mail=outbox)
    with app.app_context():
        db.drop_all()
        db.create_all()
    yield app
    with app.app_context():
        db.drop_all()
        db.engine.dispose()  # no connection left to be garbage-collected open


def users(engine: Engine) -> list[tuple[int, str, bool]]:
    with engine.connect() as connection:
        return [
            (row.id, row.email, row.welcomed)
            for row in connection.execute(text("SELECT * FROM users ORDER BY id"))
        ]


def signup(app: flask.Flask, email: str) -> int:
    response = app.test_client().post("/signup", json={"email": email})
    assert response.status_code == 201, response.text
    user_id: int = response.get_json()["id"]
    return user_id


def single_worker(app: flask.Flask) -> Worker:
    """The one worker of a one-worker pool, to work jobs one at a time in this thread."""
    (worker,) = que.worker_pool(app=app, workers=1).workers
    return worker


# -- enqueueing in a request ---------------------------------------------------------------


def test_a_request_commits_its_user_and_job_together(app: flask.Flask, engine: Engine) -> None:
    user_id = signup(app, "ada@example.com")
    assert users(engine) == [(user_id, "ada@example.com", False)]
    (row,) = job_rows(engine)
    assert (row["job_class"], json.loads(row["args"]), row["priority"]) == (
        "SendWelcomeEmail",
        [user_id],
        10,
    )


def test_a_failing_request_rolls_back_its_users_and_jobs(app: flask.Flask, engine: Engine) -> None:
    response = app.test_client().post(
        "/signups", json={"emails": ["ada@example.com", "grace@example.com", "not-an-address"]}
    )
    assert response.status_code == 400
    assert "not-an-address" in response.text
    assert users(engine) == []
    assert job_rows(engine) == []


# -- working jobs ----------------------------------------------------------------------------


def test_the_handlers_db_session_write_commits_with_the_jobs_deletion(
    app: flask.Flask, engine: Engine, outbox: Outbox
) -> None:
    user_id = signup(app, "ada@example.com")

    def inside_the_handler() -> None:
        # The handler runs in an app context of the app, where db.session is the job's.
        assert flask.current_app._get_current_object() is app  # type: ignore[attr-defined]
        assert db.session.get_one(User, user_id).welcomed
        # Its db.session.commit() only flushed: nothing is visible outside the job yet.
        assert users(engine) == [(user_id, "ada@example.com", False)]
        assert len(job_rows(engine)) == 1

    outbox.before_send.append(inside_the_handler)
    assert single_worker(app).work_one() is True
    assert outbox.sent == [("ada@example.com", "Welcome!")]
    assert users(engine) == [(user_id, "ada@example.com", True)]
    assert job_rows(engine) == []


def test_a_handler_that_writes_then_raises_leaves_no_write_and_the_job_errored(
    app: flask.Flask, engine: Engine, outbox: Outbox
) -> None:
    user_id = signup(app, "ada@example.com")
    outbox.error = ConnectionError("mail server down")
    assert single_worker(app).work_one() is True
    assert users(engine) == [(user_id, "ada@example.com", False)]
    (row,) = job_rows(engine)
    assert row["error_count"] == 1
    assert row["last_error"].splitlines()[0] == "ConnectionError: mail server down"
    assert row["run_in"] > 0  # retried later

    outbox.error = None
    with engine.begin() as connection:
        connection.execute(text("UPDATE que_jobs SET run_at = now()"))
    assert single_worker(app).work_one() is True
    assert users(engine) == [(user_id, "ada@example.com", True)]
    assert job_rows(engine) == []


def test_pending_changes_a_handler_did_not_flush_are_committed(
    database_url: str, engine: Engine, app: flask.Flask
) -> None:
    # A handler that adds without flushing: the wrapper flushes before the app context's
    # teardown closes db.session.
    extra = flask.Flask("extra")
    extra.config["SQLALCHEMY_DATABASE_URI"] = database_url
    other_db = SQLAlchemy(extra, metadata=User.metadata)
    other = JobRegistry()

    @other.job("AddUser")
    def add_user(job: JobContext, email: str) -> None:
        other_db.session.add(User(email=email))

    Que(extra, handlers=other)
    with extra.app_context():
        with other_db.engine.begin() as connection:
            add_user.insert(connection, "grace@example.com")
        pool = extra.extensions["que"].worker_pool(workers=1)
        try:
            assert pool.workers[0].work_one() is True
        finally:
            other_db.engine.dispose()
    assert [email for _, email, _ in users(engine)] == ["grace@example.com"]
    assert job_rows(engine) == []


def test_a_burst_pool_works_every_job(app: flask.Flask, engine: Engine, outbox: Outbox) -> None:
    emails = [f"user{i}@example.com" for i in range(6)]
    for email in emails:
        signup(app, email)
    pool = que.worker_pool(app=app)
    assert len(pool.workers) == 2  # QUE_WORKER_COUNT of the example
    assert pool.run(burst=True, handle_signals=False) == []
    assert sorted(to for to, _ in outbox.sent) == sorted(emails)
    assert all(welcomed for _, _, welcomed in users(engine))
    assert job_rows(engine) == []


# -- the flask que commands ------------------------------------------------------------------


def test_flask_que_migrate_stats_and_worker(
    app: flask.Flask, database_url: str, engine: Engine, outbox: Outbox
) -> None:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["que", "migrate"])
    assert result.exit_code == 0, result.output
    assert "schema version 3" in result.output

    signup(app, "ada@example.com")
    signup(app, "grace@example.com")
    result = runner.invoke(args=["que", "stats"])
    assert result.exit_code == 0, result.output
    assert "SendWelcomeEmail" in result.output
    standalone = CliRunner().invoke(
        sqlalchemy_que._cli.main, ["stats", "--database-url", database_url]
    )
    assert result.output == standalone.output  # the same table as the standalone command
    result = runner.invoke(args=["que", "stats", "--json"])
    assert json.loads(result.output)["job_stats"][0]["count"] == 2

    result = runner.invoke(args=["que", "worker", "--burst", "--wake-interval", "0.1"])
    assert result.exit_code == 0, result.output
    assert len(outbox.sent) == 2
    assert job_rows(engine) == []
    assert all(welcomed for _, _, welcomed in users(engine))


def test_flask_que_worker_exits_3_when_jobs_outlast_the_shutdown_timeout(
    app: flask.Flask, engine: Engine, outbox: Outbox
) -> None:
    signup(app, "ada@example.com")
    released = threading.Event()

    def stop_the_worker_and_wait() -> None:
        # SIGTERM to this process, caught by the pool's handler in the main thread (where
        # the command runs); the job then outlasts the shutdown timeout of 0 seconds.
        os.kill(os.getpid(), signal.SIGTERM)
        assert released.wait(30)

    outbox.before_send.append(stop_the_worker_and_wait)
    try:
        result = app.test_cli_runner().invoke(
            args=["que", "worker", "--workers", "1", "--shutdown-timeout", "0"]
        )
    finally:
        released.set()
    assert result.exit_code == 3, result.output
    assert "1 job(s) still running" in result.output
    # The job's thread finishes it once let go, then ends (before the app's engine is
    # disposed of by the fixture).
    wait_for(
        lambda: not any(thread.name.startswith("que-worker-") for thread in threading.enumerate()),
        message="the worker thread to end",
    )
    assert job_rows(engine) == []
    assert outbox.sent == [("ada@example.com", "Welcome!")]


def test_flask_que_worker_explains_a_pool_too_small(database_url: str, engine: Engine) -> None:
    app = create_app(
        database_url,
        config={"SQLALCHEMY_ENGINE_OPTIONS": {"pool_size": 1, "max_overflow": 0}},
    )
    try:
        result = app.test_cli_runner().invoke(args=["que", "worker", "--burst", "--workers", "3"])
        assert result.exit_code == 1
        assert 'SQLALCHEMY_ENGINE_OPTIONS = {"pool_size": 3}' in result.output
        assert "create_engine" not in result.output  # a Flask app does not call it
    finally:
        with app.app_context():
            db.engine.dispose()


def test_the_error_reporter_runs_in_the_app_context(app: flask.Flask, engine: Engine) -> None:
    reported: list[tuple[str, str]] = []

    def reporter(error: BaseException, job: JobContext) -> None:
        reported.append((flask.current_app.name, type(error).__name__))

    add_job(engine, "NoSuchJob")
    (worker,) = que.worker_pool(app=app, workers=1, on_error=reporter).workers
    assert worker.work_one() is True
    assert reported == [(app.name, "UnknownJobClassError")]


def test_flask_que_worker_logs_to_stderr_when_the_app_configured_no_logging(
    database_url: str, engine: Engine, tmp_path: Path
) -> None:
    (tmp_path / "plainapp.py").write_text(
        textwrap.dedent(
            f"""
            from flask import Flask
            from flask_sqlalchemy import SQLAlchemy
            from sqlalchemy_que import JobRegistry
            from sqlalchemy_que.flask import Que

            jobs = JobRegistry()

            @jobs.job("Plain::Noop")
            def noop(job):
                pass

            db = SQLAlchemy()
            app = Flask("plainapp")
            app.config["SQLALCHEMY_DATABASE_URI"] = {database_url!r}
            db.init_app(app)
            Que(app, db=db, handlers=jobs)
            """
        )
    )
    add_job(engine, "Plain::Noop")
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("flask")),
            "--app",
            "plainapp",
            "que",
            "worker",
            "--burst",
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Plain::Noop done in" in result.stderr, result.stderr
    assert job_rows(engine) == []


# -- configuration ---------------------------------------------------------------------------


def test_config_is_read_once_and_options_override_it(database_url: str) -> None:
    app = create_app(
        database_url,
        config={"QUE_QUEUE": "mail", "QUE_WORKER_COUNT": "3", "QUE_WAKE_INTERVAL": "0.5"},
    )
    app.config["QUE_QUEUE"] = "changed later"  # not seen: read by init_app
    pool = que.worker_pool(app=app)
    assert (pool.queue, len(pool.workers), pool.workers[0].wake_interval) == ("mail", 3, 0.5)
    pool = que.worker_pool(app=app, queue="other", workers=1, wake_interval=2)
    assert (pool.queue, len(pool.workers), pool.workers[0].wake_interval) == ("other", 1, 2.0)
    assert app.extensions["que"] is que
    assert "que" in app.cli.commands


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("QUE_QUEUE", 7),
        ("QUE_WORKER_COUNT", 0),
        ("QUE_WORKER_COUNT", "four"),
        ("QUE_WORKER_COUNT", True),
        ("QUE_WAKE_INTERVAL", 0),
        ("QUE_WAKE_INTERVAL", float("nan")),
        ("QUE_SHUTDOWN_TIMEOUT", -1),
        ("QUE_SHUTDOWN_TIMEOUT", "soon"),
    ],
)
def test_a_bad_config_value_is_refused_naming_the_key_and_value(key: str, value: object) -> None:
    app = flask.Flask("bad_config")
    app.config.update(SQLALCHEMY_DATABASE_URI="postgresql+psycopg://localhost/unused")
    app.config[key] = value
    SQLAlchemy(app)
    with pytest.raises(WorkerError, match=key) as raised:
        Que(app, handlers={})
    assert repr(value) in str(raised.value)
    assert "que" not in app.extensions


def test_que_handlers_config_names_the_handlers_by_import_path() -> None:
    app = flask.Flask("handlers_by_path")
    app.config.update(
        SQLALCHEMY_DATABASE_URI="postgresql+psycopg://localhost/unused",
        QUE_HANDLERS="docs.examples.flask_app:jobs",
    )
    SQLAlchemy(app)  # found in app.extensions: no db= needed
    que = Que(app)
    pool = que.worker_pool(workers=1)
    assert isinstance(pool, WorkerPool)
    assert list(pool.registry) == ["SendWelcomeEmail"]
    assert pool.registry["SendWelcomeEmail"].priority == 10


def test_que_handlers_config_errors_name_the_key() -> None:
    def make(handlers_config: object, **options: Any) -> None:
        app = flask.Flask("handlers_errors")
        app.config.update(
            SQLALCHEMY_DATABASE_URI="postgresql+psycopg://localhost/unused",
            QUE_HANDLERS=handlers_config,
        )
        Que(app, db=SQLAlchemy(app), **options)

    with pytest.raises(WorkerError, match=r"QUE_HANDLERS = 'docs.examples.flask_app:nope'"):
        make("docs.examples.flask_app:nope")
    with pytest.raises(WorkerError, match="QUE_HANDLERS must be"):
        make(42)
    with pytest.raises(WorkerError, match="give the handlers one way"):
        make("docs.examples.flask_app:jobs", handlers=flask_app.jobs)


def test_que_needs_flask_sqlalchemy_and_handlers() -> None:
    with pytest.raises(QueError, match=r"call db.init_app\(app\) before que.init_app\(app\)"):
        Que(flask.Flask("no_db"))
    app = flask.Flask("no_handlers")
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg://localhost/unused"
    SQLAlchemy(app)
    que = Que(app)
    with pytest.raises(WorkerError, match="no job handlers"):
        que.worker_pool()
    with pytest.raises(QueError, match="already registered"):
        Que(app)
    with pytest.raises(QueError, match="not registered on the app"):
        que.worker_pool(app=flask.Flask("elsewhere"))


# -- Flask-Migrate ---------------------------------------------------------------------------

# The model that the app of docs/flask.md adds (its second block, without the routes).
DOCS_MODEL = """

class Customer(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    welcomed: Mapped[bool] = mapped_column(default=False)
"""

# Que registered before Flask-Migrate, which has a filter of the app's own.
QUE_FIRST_APP = """
import os

from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_que import JobRegistry
from sqlalchemy_que.flask import Que


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


def not_the_legacy_reports(object_, name, type_, reflected, compare_to):
    return not (type_ == "table" and name == "legacy_reports")


migrate = Migrate(include_object=not_the_legacy_reports)
que = Que(db=db, handlers=JobRegistry())


class Customer(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)


def create_app():
    app = Flask("shop")
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
    db.init_app(app)
    que.init_app(app)
    migrate.init_app(app, db)
    return app
"""


def docs_setup_block() -> str:
    """The first ```python block of docs/flask.md: its Setup, the app factory."""
    page = (DOCS / "flask.md").read_text(encoding="utf-8")
    first = re.search(r"^```python\n(.*?)^```$", page, re.DOTALL | re.MULTILINE)
    assert first is not None
    assert "Migrate" in first.group(1)
    return first.group(1)


def run_flask(app_dir: Path, database_url: str, *args: str) -> str:
    """``flask --app shop ARGS`` as a user runs it in the app's folder."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLASK_")}
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "shop", *args],
        cwd=app_dir,
        env={**env, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"flask {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr


def autogenerated_revision(app_dir: Path, database_url: str) -> str:
    """``flask db init``, ``flask que migrate``, a job enqueued, ``flask db migrate``: the
    text of the one revision written."""
    run_flask(app_dir, database_url, "db", "init")
    run_flask(app_dir, database_url, "que", "migrate")
    run_flask(app_dir, database_url, "db", "migrate", "-m", "customers")
    (revision,) = (app_dir / "migrations" / "versions").glob("*.py")
    return revision.read_text(encoding="utf-8")


@pytest.mark.slow
def test_flask_db_migrate_leaves_the_queues_tables_alone(
    tmp_path: Path, empty_database_url: str
) -> None:
    """The app of docs/flask.md: flask que migrate, then flask db migrate and upgrade. The
    revision creates the app's table and neither drops nor creates ours."""
    (tmp_path / "shop.py").write_text(docs_setup_block() + DOCS_MODEL, encoding="utf-8")
    engine = create_engine(empty_database_url)
    try:
        revision = autogenerated_revision(tmp_path, empty_database_url)
        assert "op.create_table('customer'" in revision
        assert "que_jobs" not in revision
        assert "sqlalchemy_que_version" not in revision

        job_id = add_job(engine, "WelcomeCustomer", 1)
        run_flask(tmp_path, empty_database_url, "db", "upgrade")
        assert {"customer", "alembic_version", "que_jobs", "sqlalchemy_que_version"} <= set(
            inspect(engine).get_table_names()
        )
        assert [row["job_id"] for row in job_rows(engine)] == [job_id]
        # Nothing is left to autogenerate: Flask-Migrate writes no empty revision.
        output = run_flask(tmp_path, empty_database_url, "db", "migrate", "-m", "nothing")
        assert "No changes in schema detected" in output
        assert len(list((tmp_path / "migrations" / "versions").glob("*.py"))) == 1
    finally:
        engine.dispose()


@pytest.mark.slow
def test_flask_migrate_registered_after_que_keeps_the_apps_own_filter(
    tmp_path: Path, empty_database_url: str
) -> None:
    (tmp_path / "shop.py").write_text(textwrap.dedent(QUE_FIRST_APP), encoding="utf-8")
    engine = create_engine(empty_database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE legacy_reports (id integer)"))
            connection.execute(text("CREATE TABLE forgotten (id integer)"))
        revision = autogenerated_revision(tmp_path, empty_database_url)
    finally:
        engine.dispose()
    assert "op.create_table('customer'" in revision
    assert "op.drop_table('forgotten')" in revision  # autogenerate still drops what it should
    assert "legacy_reports" not in revision  # the app's own filter
    assert "que_jobs" not in revision  # ours
    assert "sqlalchemy_que_version" not in revision


def test_the_filter_on_flask_migrate_is_added_once_whatever_the_order() -> None:
    from flask_migrate import Migrate

    from sqlalchemy_que.schema import include_object

    for que_first in (True, False):
        app = flask.Flask("order")
        app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg://localhost/unused"
        db = SQLAlchemy(app)
        if que_first:
            Que(app, handlers=JobRegistry())
            Migrate(app, db)
        else:
            Migrate(app, db)
            Que(app, handlers=JobRegistry())
        for _ in range(3):
            with app.app_context():
                pass
        assert app.extensions["migrate"].configure_args["include_object"] is include_object
