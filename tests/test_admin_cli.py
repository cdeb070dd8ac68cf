"""The operations commands of ``sqlalchemy-que`` and ``flask que``, and ``--burst``'s exit
status when jobs failed, on a real server (in-process, through click's runner)."""

from __future__ import annotations

import json

import flask
from click.testing import CliRunner, Result
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Engine, text

from sqlalchemy_que import FailJob, JobContext, Worker, locked_job
from sqlalchemy_que._cli import EXIT_JOBS_FAILED, main
from sqlalchemy_que.flask import Que

from .helpers import add_job, job_rows


def que(database_url: str, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, [*args, "--database-url", database_url], input=input)


def fail_one(engine: Engine, job_class: str = "Broken", **options: object) -> int:
    job_id = add_job(engine, job_class, 1, **options)

    def broken(job: JobContext, *args: object) -> None:
        raise FailJob("no such user")

    assert Worker(engine, {job_class: broken}, queue=str(options.get("queue", ""))).work_one()
    return job_id


def failed_ids(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(
            connection.execute(text("SELECT job_id FROM que_failed_jobs ORDER BY 1")).scalars()
        )


def test_jobs_lists_with_filters_and_shows_the_last_error(
    engine: Engine, database_url: str
) -> None:
    failed = fail_one(engine)
    waiting = add_job(engine, "Mail", queue="mail")
    result = que(database_url, "jobs")
    assert result.exit_code == 0, result.output
    assert str(waiting) in result.output and "ready" in result.output
    result = que(database_url, "jobs", "--failed")
    assert "failed (failed)" in result.output
    assert "sqlalchemy_que.FailJob: no such user" in result.output
    result = que(database_url, "jobs", "--queue", "nope")
    assert "(no jobs)" in result.output
    listed = json.loads(que(database_url, "jobs", "--job-class", "Mail", "--json").output)
    assert [row["job_id"] for row in listed] == [waiting]
    assert que(database_url, "jobs", "--errored").output.strip().endswith("(no jobs)")
    assert que(database_url, "jobs", "--scheduled").output.strip().endswith("(no jobs)")

    result = que(database_url, "job", str(failed))
    assert result.exit_code == 0, result.output
    assert "reason: failed" in result.output and "last_error:" in result.output
    assert "args: [1]" in result.output
    result = que(database_url, "job", "999999")
    assert result.exit_code == 1 and "no such job" in result.output
    result = que(database_url, "job", "abc")
    assert result.exit_code == 2 and "'abc' is not a job id" in result.output


def test_retry_delete_cancel_and_purge(engine: Engine, database_url: str) -> None:
    failed = fail_one(engine)
    result = que(database_url, "retry", str(failed))
    assert result.exit_code == 0, result.output
    assert f"job {failed}: due now" in result.output
    [row] = job_rows(engine)
    assert (row["job_id"], row["error_count"]) == (failed, 0)

    result = que(database_url, "cancel", str(failed))
    assert result.exit_code == 0 and "cancelled" in result.output
    assert failed_ids(engine) == [failed]
    result = que(database_url, "delete", str(failed))
    assert f"job {failed}: deleted" in result.output
    assert failed_ids(engine) == []

    fail_one(engine)
    result = que(database_url, "purge-failed", "--older-than", "7d")
    assert "purged 0 failed job(s)" in result.output
    result = que(database_url, "purge-failed", "--older-than", "0")
    assert "purged 1 failed job(s)" in result.output
    result = que(database_url, "purge-failed", "--older-than", "soon")
    assert result.exit_code == 2 and "'soon' is not a duration" in result.output


def test_clear_with_filters(engine: Engine, database_url: str) -> None:
    add_job(engine, "A", queue="one")
    add_job(engine, "B", queue="one")
    keep = add_job(engine, "A", queue="two")
    fail_one(engine, "C")
    result = que(database_url, "clear", "--queue", "one", "--job-class", "A", "--yes")
    assert "deleted 1 job(s)" in result.output
    assert que(database_url, "clear", "--queue", "one", input="n\n").exit_code == 1
    assert len(job_rows(engine)) == 2
    result = que(database_url, "clear", "--failed", "--yes")
    assert "deleted 1 failed job(s)" in result.output
    assert failed_ids(engine) == []
    assert que(database_url, "clear", "--yes").exit_code == 0
    assert keep not in [row["job_id"] for row in job_rows(engine)]


def test_commands_refuse_a_job_a_worker_holds_and_say_so(engine: Engine, database_url: str) -> None:
    held = add_job(engine, "Held")
    with locked_job(engine) as lock:
        assert lock is not None
        for command in ("retry", "delete"):
            result = que(database_url, command, str(held))
            assert result.exit_code == 1
            assert f"job {held}: held by a worker (backend pid " in result.output
        result = que(database_url, "clear", "--yes")
        assert "left 1 job(s) a worker holds" in result.output
        result = que(database_url, "cancel", str(held))
        assert result.exit_code == 0 and "held by a worker, not touched" in result.output
        assert [row["job_id"] for row in job_rows(engine)] == [held]
        lock.complete()


def test_stats_shows_failed_and_retrying_counts(engine: Engine, database_url: str) -> None:
    fail_one(engine)
    add_job(engine, "Retrying")
    with engine.begin() as connection:
        connection.execute(text("UPDATE que_jobs SET error_count = 1"))
    result = que(database_url, "stats")
    assert "retrying 1, working 0, failed 1" in result.output
    counts = json.loads(que(database_url, "stats", "--json").output)["counts"]
    assert (counts["failed"], counts["retrying"]) == (1, 1)


def test_burst_exits_4_when_any_job_failed(engine: Engine, database_url: str) -> None:
    add_job(engine, "CLI::Noop")
    result = que(database_url, "worker", "tests.cli_handlers:registry", "--burst")
    assert result.exit_code == 0, result.output
    add_job(engine, "CLI::Fail")
    add_job(engine, "CLI::Noop")
    result = que(database_url, "worker", "tests.cli_handlers:registry", "--burst")
    assert result.exit_code == EXIT_JOBS_FAILED == 4
    assert "1 job run(s) failed" in result.output
    assert job_rows(engine) == [] and len(failed_ids(engine)) == 1


def test_the_same_commands_under_flask_que(engine: Engine, database_url: str) -> None:
    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    db = SQLAlchemy()
    db.init_app(app)

    def always_fails(job: JobContext) -> None:
        raise ValueError("always fails")

    Que(handlers={"CLI::Fail": always_fails}).init_app(app)
    runner = app.test_cli_runner()
    failed = fail_one(engine)
    result = runner.invoke(args=["que", "jobs", "--failed"])
    assert result.exit_code == 0, result.output
    assert str(failed) in result.output
    assert runner.invoke(args=["que", "job", str(failed)]).exit_code == 0
    assert f"job {failed}: due now" in runner.invoke(args=["que", "retry", str(failed)]).output
    assert "cancelled" in runner.invoke(args=["que", "cancel", str(failed)]).output
    assert "purged 1" in runner.invoke(args=["que", "purge-failed", "--older-than", "0"]).output
    add_job(engine, "X")
    assert "deleted 1 job(s)" in runner.invoke(args=["que", "clear", "--yes"]).output
    other = add_job(engine, "Y")
    assert f"job {other}: deleted" in runner.invoke(args=["que", "delete", str(other)]).output
    add_job(engine, "CLI::Fail")
    result = runner.invoke(args=["que", "worker", "--burst", "--wake-interval", "0.1"])
    assert result.exit_code == 4, result.output
    with app.app_context():
        db.engine.dispose()
