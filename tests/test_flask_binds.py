"""Flask handlers with ``SQLALCHEMY_BINDS``: in a handler, ``db.session`` routes each model as
Flask-SQLAlchemy does. Models of the default bind (the queue's database) go through the job's
connection and commit with the job's completion; a model with ``__bind_key__`` goes to its
own database, in a transaction committed right before the job's, or rolled back with it.

Two real databases: the test database (``que_jobs`` and the default bind) and a second one
made for each test (the ``reports`` bind)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import flask
import pytest
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Engine, create_engine, inspect, select, text
from sqlalchemy.orm import Mapped, mapped_column

from sqlalchemy_que import JobContext, JobRegistry, Worker
from sqlalchemy_que.flask import Que

from .helpers import add_job, job_rows

db = SQLAlchemy()
jobs = JobRegistry()
que = Que(db=db, handlers=jobs)


class Account(db.Model):  # type: ignore[name-defined,misc]
    """In the default bind: the queue's database."""

    __tablename__ = "binds_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


class Report(db.Model):  # type: ignore[name-defined,misc]
    """In the ``reports`` bind: another database."""

    __bind_key__ = "reports"
    __tablename__ = "binds_reports"
    id: Mapped[int] = mapped_column(primary_key=True)
    line: Mapped[str]


#: What the handler of the running test does, given the job and the job's name argument.
Step = Callable[[JobContext, str], None]
_steps: list[Step] = []


@jobs.job("Binds::Record")
def record(job: JobContext, name: str) -> None:
    for step in _steps:
        step(job, name)


@jobs.job("Binds::Child")
def child(job: JobContext, name: str) -> None:
    db.session.add(Report(line=f"child of {name}"))


def enqueue_a_child(job: JobContext, name: str) -> None:
    db.session.add(child.enqueue(name))


def write_both(job: JobContext, name: str) -> None:
    db.session.add(Account(name=name))
    db.session.add(Report(line=f"account {name}"))
    db.session.commit()  # only flushes, on both binds


@pytest.fixture
def reports_url(empty_database_url: str) -> str:
    return empty_database_url


@pytest.fixture
def app(database_url: str, engine: Engine, reports_url: str) -> Iterator[flask.Flask]:
    app = flask.Flask("binds")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        SQLALCHEMY_BINDS={"reports": reports_url},
        QUE_WORKER_COUNT=1,
    )
    db.init_app(app)
    que.init_app(app)
    with app.app_context():
        db.drop_all()
        db.create_all()
    _steps.clear()
    yield app
    _steps.clear()
    with app.app_context():
        db.drop_all()
        for bind_engine in db.engines.values():
            bind_engine.dispose()


@pytest.fixture
def reports(reports_url: str) -> Iterator[Engine]:
    reports = create_engine(reports_url)
    yield reports
    reports.dispose()


def accounts(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT name FROM binds_accounts ORDER BY id"))
        return list(rows.scalars())


def report_lines(reports: Engine) -> list[str]:
    with reports.connect() as connection:
        rows = connection.execute(text("SELECT line FROM binds_reports ORDER BY id"))
        return list(rows.scalars())


def worker(app: flask.Flask) -> Worker:
    (worker,) = que.worker_pool(app=app, workers=1).workers
    return worker


def test_each_model_lands_in_its_own_database_and_both_commit_with_the_job(
    app: flask.Flask, engine: Engine, reports: Engine
) -> None:
    seen: list[tuple[list[str], list[str], int]] = []

    def before_the_job_commits(job: JobContext, name: str) -> None:
        # Flushed on both binds, committed on neither yet.
        assert db.session.execute(select(Report.line)).scalars().all() == ["account ada"]
        seen.append((accounts(engine), report_lines(reports), len(job_rows(engine))))

    _steps.extend([write_both, before_the_job_commits])
    add_job(engine, "Binds::Record", "ada")
    assert worker(app).work_one() is True
    assert seen == [([], [], 1)]
    assert accounts(engine) == ["ada"]
    assert report_lines(reports) == ["account ada"]
    assert job_rows(engine) == []  # completed
    # Each table exists in its own database only: no row went to the other one.
    assert not inspect(engine).has_table("binds_reports")
    assert not inspect(reports).has_table("binds_accounts")


def test_a_failing_job_rolls_back_its_writes_on_every_bind_and_is_retried(
    app: flask.Flask, engine: Engine, reports: Engine
) -> None:
    def fail(job: JobContext, name: str) -> None:
        raise RuntimeError("the mail server is down")

    _steps.extend([write_both, fail])
    add_job(engine, "Binds::Record", "ada")
    assert worker(app).work_one() is True
    assert accounts(engine) == []
    assert report_lines(reports) == []
    (row,) = job_rows(engine)
    assert row["error_count"] == 1
    assert row["last_error"].startswith("RuntimeError: the mail server is down")

    _steps.remove(fail)
    with engine.begin() as connection:
        connection.execute(text("UPDATE que_jobs SET run_at = now()"))
    assert worker(app).work_one() is True
    assert accounts(engine) == ["ada"]
    assert report_lines(reports) == ["account ada"]
    assert job_rows(engine) == []


def test_a_job_failed_after_its_handler_returned_commits_no_bind(
    app: flask.Flask, engine: Engine, reports: Engine
) -> None:
    # Cancelled while it ran: the worker fails the job once the handler returns. The other
    # bind is committed only after that check, so it is rolled back too.
    def cancelled(job: JobContext, name: str) -> None:
        job._request_cancel()

    _steps.extend([write_both, cancelled])
    add_job(engine, "Binds::Record", "ada")
    assert worker(app).work_one() is True
    assert accounts(engine) == []
    assert report_lines(reports) == []
    assert job_rows(engine) == []
    with engine.connect() as connection:
        (last_error,) = connection.execute(text("SELECT last_error FROM que_failed_jobs")).scalars()
    assert "was cancelled while it ran" in last_error  # failed for good, as cancelled jobs are


def test_when_another_binds_commit_fails_the_job_fails_and_its_default_bind_write_too(
    app: flask.Flask, engine: Engine, reports: Engine
) -> None:
    # The other bind commits first, while the job's transaction is still open: a refusal
    # there (a deferred constraint) fails the job, and nothing of it is committed.
    with reports.begin() as connection:
        connection.execute(
            text(
                "ALTER TABLE binds_reports ADD CONSTRAINT one_line UNIQUE (line) "
                "DEFERRABLE INITIALLY DEFERRED"
            )
        )
        connection.execute(text("INSERT INTO binds_reports (line) VALUES ('account ada')"))
    _steps.append(write_both)
    add_job(engine, "Binds::Record", "ada")
    assert worker(app).work_one() is True
    assert accounts(engine) == []
    assert report_lines(reports) == ["account ada"]  # the row that was there before
    (row,) = job_rows(engine)
    assert row["error_count"] == 1
    assert "one_line" in row["last_error"]


def test_rollback_in_a_handler_undoes_every_bind_back_to_its_last_commit(
    app: flask.Flask, engine: Engine, reports: Engine
) -> None:
    def second_thoughts(job: JobContext, name: str) -> None:
        db.session.add(Account(name="grace"))
        db.session.add(Report(line="account grace"))
        db.session.flush()
        db.session.rollback()  # back to the savepoint of write_both's commit(), on both binds
        assert db.session.execute(select(Report.line)).scalars().all() == ["account ada"]

    _steps.extend([write_both, second_thoughts])
    add_job(engine, "Binds::Record", "ada")
    assert worker(app).work_one() is True
    assert accounts(engine) == ["ada"]
    assert report_lines(reports) == ["account ada"]
    assert job_rows(engine) == []


def test_a_handler_that_only_uses_another_bind(
    app: flask.Flask, engine: Engine, reports: Engine
) -> None:
    used: list[bool] = []

    def report_only(job: JobContext, name: str) -> None:
        db.session.add(Report(line=name))
        db.session.flush()
        used.append(job.touched_database)

    _steps.append(report_only)
    add_job(engine, "Binds::Record", "only the report")
    assert worker(app).work_one() is True
    assert used == [False]  # the job's own transaction was not even begun
    assert report_lines(reports) == ["only the report"]
    assert job_rows(engine) == []


def test_que_drain_runs_the_default_bind_in_the_tests_transaction_and_commits_the_others(
    app: flask.Flask, engine: Engine, reports: Engine
) -> None:
    _steps.append(write_both)
    with app.app_context():
        db.session.add(record.enqueue("ada"))
        report = que.drain()
        assert [job.job_class for job in report.completed] == ["Binds::Record"]
        assert db.session.execute(select(Account.name)).scalars().all() == ["ada"]
        db.session.rollback()  # the test's transaction: the job and the default bind's write
    assert accounts(engine) == []
    assert job_rows(engine) == []
    assert report_lines(reports) == ["account ada"]  # another database: committed


def test_the_synchronous_mode_runs_a_requests_job_that_writes_to_another_bind(
    database_url: str, engine: Engine, reports_url: str, reports: Engine
) -> None:
    app = flask.Flask("binds_synchronous")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        SQLALCHEMY_BINDS={"reports": reports_url},
        QUE_SYNCHRONOUS="raise",
    )
    db.init_app(app)
    que.init_app(app)
    # The handler's db.session is of db.session's class: the jobs it enqueues run after it.
    _steps[:] = [write_both, enqueue_a_child]
    try:
        with app.app_context():
            db.create_all()
            # The request uses the reports bind first, then enqueues: the job is found in
            # the queue's database all the same.
            db.session.add(Report(line="from the request"))
            db.session.flush()
            db.session.add(record.enqueue("ada"))
            db.session.commit()
        assert accounts(engine) == ["ada"]
        assert report_lines(reports) == ["from the request", "account ada", "child of ada"]
        assert job_rows(engine) == []
    finally:
        _steps.clear()
        with app.app_context():
            db.drop_all()
            for bind_engine in db.engines.values():
                bind_engine.dispose()
