"""The synchronous mode (``sqlalchemy_que.testing.run_synchronously`` and the Flask
extension's ``QUE_SYNCHRONOUS``): jobs run right after their Session commits, never
before, never after a rollback, each in a transaction of its own."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import flask
import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session, sessionmaker

from docs.examples.flask_app import User, create_app, db, que, send_welcome_email
from sqlalchemy_que import JobContext, JobRegistry, QueError, WorkerError, enqueue, insert_job
from sqlalchemy_que.testing import enqueued, run_synchronously

from .helpers import job_rows

jobs = JobRegistry()


@jobs.job("Note")
def note(job: JobContext, text_: str) -> None:
    # The job's own transaction sees what its enqueuer committed, and only that.
    committed = job.connection.execute(
        text("SELECT count(*) FROM sync_effects WHERE note = 'enqueuer'")
    ).scalar_one()
    job.connection.execute(
        text("INSERT INTO sync_effects (note, saw_enqueuer) VALUES (:note, :seen)"),
        {"note": text_, "seen": committed > 0},
    )


@jobs.job("Fail", retry_delay=60)
def fail(job: JobContext, text_: str) -> None:
    job.connection.execute(text("INSERT INTO sync_effects (note) VALUES (:note)"), {"note": text_})
    raise ValueError(f"failed {text_}")


@jobs.job("Parent")
def parent(job: JobContext) -> None:
    job.session.add(enqueue("Note", "child"))


@pytest.fixture
def effects(engine: Engine) -> Iterator[Engine]:
    with engine.begin() as connection:
        connection.execute(
            text("CREATE TABLE sync_effects (id serial PRIMARY KEY, note text, saw_enqueuer bool)")
        )
    yield engine
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE sync_effects"))


def effect_notes(engine: Engine) -> list[tuple[str, bool | None]]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT note, saw_enqueuer FROM sync_effects ORDER BY id"))
        return [(row.note, row.saw_enqueuer) for row in rows]


def enqueuer_row(session: Session) -> None:
    session.execute(text("INSERT INTO sync_effects (note) VALUES ('enqueuer')"))


def test_a_job_runs_only_after_its_session_commits(effects: Engine) -> None:
    factory = sessionmaker(effects)
    with run_synchronously(factory, jobs), factory() as session:
        enqueuer_row(session)
        session.add(enqueue("Note", "orm"))
        insert_job(session, "Note", "core")
        session.flush()
        assert effect_notes(effects) == []  # flushed, not committed: nothing ran
        session.commit()
        first, *jobs_run = effect_notes(effects)
        assert first == ("enqueuer", None)
        # In job_id order; which insert reaches the table first depends on whether the
        # SQLAlchemy version autoflushes the ORM job before a Core statement.
        assert sorted(jobs_run) == [("core", True), ("orm", True)]
    assert job_rows(effects) == []  # completed: deleted, and committed


def test_a_rolled_back_session_runs_nothing(effects: Engine) -> None:
    factory = sessionmaker(effects)
    with run_synchronously(factory, jobs), factory() as session:
        session.add(enqueue("Note", "never"))
        session.flush()
        session.rollback()
        session.add(enqueue("Note", "next transaction"))
        session.commit()
    assert effect_notes(effects) == [("next transaction", False)]


def test_a_job_rolled_back_with_a_savepoint_does_not_run(effects: Engine) -> None:
    factory = sessionmaker(effects)
    with run_synchronously(factory, jobs), factory() as session:
        with session.begin_nested() as savepoint:
            session.add(enqueue("Note", "dropped"))
            session.flush()
            savepoint.rollback()
        session.add(enqueue("Note", "kept"))
        session.commit()
    assert [note for note, _ in effect_notes(effects)] == ["kept"]


def test_each_job_has_its_own_transaction_and_errors_are_raised(effects: Engine) -> None:
    factory = sessionmaker(effects)
    with run_synchronously(factory, jobs), factory() as session:
        session.add(enqueue("Fail", "first"))
        session.add(enqueue("Note", "second"))
        with pytest.raises(ValueError, match="failed first"):
            session.commit()
    # The failing job's write went with its transaction; the next job still ran.
    assert effect_notes(effects) == [("second", False)]
    (row,) = job_rows(effects)
    assert (row["job_class"], row["error_count"]) == ("Fail", 1)
    assert row["last_error"].startswith("ValueError: failed first")
    assert 59 < row["run_in"] < 61


def test_errors_can_be_logged_instead(effects: Engine, caplog: pytest.LogCaptureFixture) -> None:
    factory = sessionmaker(effects)
    with (
        caplog.at_level(logging.ERROR, "sqlalchemy_que.testing"),
        run_synchronously(factory, jobs, errors="log"),
        factory() as session,
    ):
        session.add(enqueue("Fail", "quiet"))
        session.commit()
    assert "failed quiet" in caplog.text
    assert job_rows(effects)[0]["error_count"] == 1


def test_jobs_a_handler_enqueues_run_after_their_job(effects: Engine) -> None:
    with run_synchronously(Session, jobs), Session(effects) as session:
        session.add(enqueue("Parent"))
        session.commit()
    assert [note for note, _ in effect_notes(effects)] == ["child"]
    assert job_rows(effects) == []


def test_stop_turns_the_mode_off(effects: Engine) -> None:
    factory = sessionmaker(effects)
    mode = run_synchronously(factory, jobs)
    mode.stop()
    with factory() as session:
        session.add(enqueue("Note", "for a worker"))
        session.commit()
    assert effect_notes(effects) == []
    assert [row["job_class"] for row in job_rows(effects)] == ["Note"]
    with effects.begin() as connection:
        connection.execute(text("DELETE FROM que_jobs"))


def test_in_a_session_joined_to_a_test_transaction_jobs_run_in_savepoints(
    connection: Connection,
) -> None:
    connection.execute(
        text("CREATE TABLE sync_effects (id serial PRIMARY KEY, note text, saw_enqueuer bool)")
    )
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    with run_synchronously(session, jobs):
        enqueuer_row(session)
        session.add(enqueue("Note", "joined"))
        session.commit()  # releases the session's savepoint only
    rows = connection.execute(text("SELECT note, saw_enqueuer FROM sync_effects ORDER BY id"))
    assert [(row.note, row.saw_enqueuer) for row in rows] == [
        ("enqueuer", None),
        ("joined", True),
    ]
    assert enqueued(connection) == []
    assert connection.in_transaction()  # and the fixture rolls it all back


def test_bad_arguments_are_refused(engine: Engine) -> None:
    with pytest.raises(QueError, match="errors must be 'raise' or 'log', got 'loud'"):
        run_synchronously(Session, jobs, errors="loud")  # type: ignore[arg-type]
    with pytest.raises(QueError, match="got 42"):
        run_synchronously(42, jobs)  # type: ignore[arg-type]


# Flask: QUE_SYNCHRONOUS


@pytest.fixture
def sent() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def sync_app(
    database_url: str, engine: Engine, sent: list[tuple[str, str]]
) -> Iterator[flask.Flask]:
    app = create_app(
        database_url,
        send_mail=lambda to, subject: sent.append((to, subject)),
        config={"QUE_SYNCHRONOUS": True},
    )
    with app.app_context():
        db.drop_all()
        db.create_all()
    yield app
    with app.app_context():
        db.drop_all()
        db.engine.dispose()


def test_flask_runs_a_requests_jobs_after_its_commit(
    sync_app: flask.Flask, sent: list[tuple[str, str]]
) -> None:
    response = sync_app.test_client().post("/signup", json={"email": "ada@example.com"})
    assert response.status_code == 201
    assert sent == [("ada@example.com", "Welcome!")]
    with sync_app.app_context():
        user = db.session.get(User, response.json["id"])  # type: ignore[index]
        assert user is not None and user.welcomed  # the handler's db.session write
        assert enqueued(db.session) == []


def test_flask_runs_nothing_for_a_failed_request(
    sync_app: flask.Flask, sent: list[tuple[str, str]]
) -> None:
    response = sync_app.test_client().post("/signups", json={"emails": ["a@x.org", "bad"]})
    assert response.status_code == 400
    assert sent == []
    with sync_app.app_context():
        assert db.session.query(User).count() == 0
        assert enqueued(db.session) == []


def test_flask_synchronous_mode_only_for_its_own_app(
    sync_app: flask.Flask, database_url: str, sent: list[tuple[str, str]]
) -> None:
    other = create_app(database_url, send_mail=lambda to, subject: sent.append((to, subject)))
    with other.app_context():
        db.session.add(send_welcome_email.enqueue(12345))
        db.session.commit()
        assert [job.job_class for job in enqueued(db.session)] == ["SendWelcomeEmail"]
        db.session.execute(text("DELETE FROM que_jobs"))
        db.session.commit()
        db.engine.dispose()


@pytest.mark.parametrize("value", ["sometimes", 2])
def test_flask_refuses_a_bad_setting(database_url: str, value: object) -> None:
    with pytest.raises(WorkerError, match=f"QUE_SYNCHRONOUS must be .*got {value!r}"):
        create_app(database_url, config={"QUE_SYNCHRONOUS": value})


def test_flask_que_drain_runs_the_handlers_in_the_tests_transaction(
    database_url: str, engine: Engine, sent: list[tuple[str, str]]
) -> None:
    app = create_app(database_url, send_mail=lambda to, subject: sent.append((to, subject)))
    with app.app_context():
        db.drop_all()
        db.create_all()
    try:
        user_id = app.test_client().post("/signup", json={"email": "eve@x.org"}).json["id"]  # type: ignore[index]
        with app.app_context():
            report = que.drain()
            assert report.worked == 1
            user = db.session.get(User, user_id)
            assert user is not None and user.welcomed  # written through the job's db.session
            assert sent == [("eve@x.org", "Welcome!")]
            db.session.rollback()  # nothing of the drain was committed
        assert [row["job_class"] for row in job_rows(engine)] == ["SendWelcomeEmail"]
        with engine.connect() as connection:
            assert connection.execute(text("SELECT welcomed FROM users")).scalar_one() is False
    finally:
        with app.app_context():
            db.drop_all()
            db.engine.dispose()
