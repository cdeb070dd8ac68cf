"""The ``sqlalchemy-que`` command end to end: each test runs the installed console script in a
subprocess against the real test database, and checks exit statuses, output and the table.

Worker processes import their handlers from ``tests.cli_handlers``; they run with the
repository root as working directory and on ``PYTHONPATH``. Every process is bounded by a
timeout and killed in ``finally`` if it is still running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.pool import NullPool

from sqlalchemy_que import JobContext, QueError, Worker
from sqlalchemy_que._cli import normalise_database_url
from sqlalchemy_que._demo import run_demo

from .cli_handlers import CREATE_EVENTS, DROP_EVENTS, HAS_EVENT, RECORD_EVENT
from .conftest import advisory_lock_count, wait_for
from .helpers import add_job, future, job_rows, past

REPO = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).with_name("sqlalchemy-que")
HANDLERS = "tests.cli_handlers:registry"

#: Seconds any one command may take before the test gives up on it.
COMMAND_TIMEOUT = 60.0

#: Environment variables the command reads; cleared so that only what a test sets counts.
_CLI_VARIABLES = (
    "DATABASE_URL",
    "QUE_QUEUE",
    "QUE_WORKER_COUNT",
    "QUE_WAKE_INTERVAL",
    "QUE_SHUTDOWN_TIMEOUT",
    "QUE_LOG_LEVEL",
)


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _CLI_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *args],
        cwd=REPO,
        env=cli_env(env),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_cli_together(
    *commands: list[str], timeout: float = COMMAND_TIMEOUT
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent commands at the same time (each start costs about a second of
    imports); return their results in order."""
    processes = [
        subprocess.Popen(
            [str(CLI), *command],
            cwd=REPO,
            env=cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    try:
        results = []
        for command, process in zip(commands, processes, strict=True):
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(
                subprocess.CompletedProcess(
                    [str(CLI), *command], process.returncode, stdout, stderr
                )
            )
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=10)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status 1, and one ``Error: ...`` line on stderr naming each needle."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def plain_url(url: str) -> str:
    """The URL as ``DATABASE_URL`` usually holds it: ``postgresql://``, no driver."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    # Nothing listens once the socket is closed (and nothing else binds it this quickly).
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


# ---------------------------------------------------------------------------------------------
# Background worker processes


class WorkerProcess:
    """A ``sqlalchemy-que worker`` running in the background, its output in files."""

    def __init__(self, process: subprocess.Popen[str], stdout: Path, stderr: Path) -> None:
        self.process = process
        self.stdout_path = stdout
        self.stderr_path = stderr

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def send(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = COMMAND_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit in {timeout}s; stderr:\n{self.stderr}")


@contextlib.contextmanager
def background_worker(
    tmp_path: Path, *args: str, env: Mapping[str, str] | None = None
) -> Iterator[WorkerProcess]:
    stdout, stderr = tmp_path / "worker.out", tmp_path / "worker.err"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            [str(CLI), "worker", HANDLERS, *args],
            cwd=REPO,
            env=cli_env(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            text=True,
        )
    try:
        yield WorkerProcess(process, stdout, stderr)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


# ---------------------------------------------------------------------------------------------
# The events table the blocking handler and the tests talk through


class Events:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def token(self) -> str:
        return uuid.uuid4().hex

    def seen(self, token: str, event: str) -> bool:
        with self.engine.connect() as connection:
            return bool(
                connection.execute(HAS_EVENT, {"token": token, "event": event}).scalar_one()
            )

    def release(self, token: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(RECORD_EVENT, {"token": token, "event": "release"})


@pytest.fixture
def events(engine: Engine) -> Iterator[Events]:
    with engine.begin() as connection:
        connection.execute(CREATE_EVENTS)
    yield Events(engine)
    with engine.begin() as connection:
        connection.execute(DROP_EVENTS)


def wait_started(events: Events, token: str, worker: WorkerProcess) -> None:
    def started() -> bool:
        if worker.process.poll() is not None:
            pytest.fail(
                f"the worker exited ({worker.process.returncode}) before the job started:\n"
                f"{worker.stderr}"
            )
        return events.seen(token, "started")

    wait_for(started, timeout=30, message="the blocking job to start")


def wait_no_lock(engine: Engine) -> None:
    wait_for(
        lambda: advisory_lock_count(engine) == 0,
        timeout=30,
        message="the server to release the job's advisory lock",
    )


# ---------------------------------------------------------------------------------------------
# migrate and check


def test_migrate_creates_que_jobs_and_check_accepts_it(empty_database_url: str) -> None:
    before = run_cli("check", "--database-url", empty_database_url)
    assert_one_line_error(before, "no que_jobs table", "sqlalchemy-que migrate")

    migrated = run_cli("migrate", "--database-url", empty_database_url)
    assert migrated.returncode == 0, migrated.stderr
    assert "schema version 3" in migrated.stdout
    engine = create_engine(empty_database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT to_regclass('que_jobs')")).scalar_one()
            comment = "SELECT obj_description('que_jobs'::regclass, 'pg_class')"
            assert connection.execute(text(comment)).scalar_one() == "3"
    finally:
        engine.dispose()

    checked = run_cli("check", env={"DATABASE_URL": empty_database_url})
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("ok: ")


def test_migrate_sql_prints_the_ddl_without_a_database() -> None:
    result = run_cli("migrate", "--sql")
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE que_jobs" in result.stdout


def test_check_refuses_a_que_1x_table(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE que_jobs (id bigserial PRIMARY KEY)"))
            connection.execute(text("COMMENT ON TABLE que_jobs IS '4'"))
    finally:
        engine.dispose()
    result = run_cli("check", "--database-url", empty_database_url)
    assert_one_line_error(result, "version 4")


# ---------------------------------------------------------------------------------------------
# enqueue


def test_enqueue_inserts_exactly_what_it_was_given(engine: Engine, database_url: str) -> None:
    result = run_cli(
        "enqueue",
        "CLI::Exact",
        '[1,"a",{"k":null}]',
        "--queue",
        "q",
        "--priority",
        "5",
        "--run-at",
        "2030-01-01T00:00:00+00:00",
        "--database-url",
        database_url,
    )
    assert result.returncode == 0, result.stderr
    with engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT job_id, job_class, args::text AS args, queue, priority, "
                "run_at = '2030-01-01T00:00:00+00:00'::timestamptz AS at_run_at, error_count "
                "FROM que_jobs"
            )
        ).one()
    assert result.stdout.strip() == f"enqueued job {row.job_id}"
    assert row.job_class == "CLI::Exact"
    assert row.args == '[1,"a",{"k":null}]'
    assert (row.queue, row.priority, row.at_run_at, row.error_count) == ("q", 5, True, 0)


def test_enqueue_refuses_bad_args_json(engine: Engine, database_url: str) -> None:
    cases = {
        "not json": "is not JSON",
        '{"k": 1}': "is not a JSON array",
        "7": "is not a JSON array",
    }
    results = run_cli_together(
        *(["enqueue", "CLI::Bad", args, "--database-url", database_url] for args in cases)
    )
    for (args_json, complaint), result in zip(cases.items(), results, strict=True):
        assert result.returncode == 2, (args_json, result.stdout, result.stderr)
        assert "Invalid value for ARGS_JSON" in result.stderr, result.stderr
        assert f"{args_json!r} {complaint}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert job_rows(engine) == []


def test_enqueue_refuses_a_priority_out_of_range(engine: Engine, database_url: str) -> None:
    result = run_cli("enqueue", "CLI::Bad", "--priority", "40000", "--database-url", database_url)
    assert_one_line_error(result, "priority 40000")
    assert job_rows(engine) == []


# ---------------------------------------------------------------------------------------------
# stats and clear


def test_stats_table_and_json(engine: Engine, database_url: str) -> None:
    for _ in range(3):
        add_job(engine, "CLI::Mail", queue="mail")
    add_job(engine, "CLI::Report", 1)

    table, as_json = run_cli_together(
        ["stats", "--database-url", database_url],
        ["stats", "--json", "--database-url", database_url],
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "queue",
        "job_class",
        "count",
        "working",
        "errored",
        "max_errors",
        "oldest_run_at",
    ]
    assert lines[1].split()[:5] == ["'mail'", "CLI::Mail", "3", "0", "0"]
    assert lines[2].split()[:5] == ["''", "CLI::Report", "1", "0", "0"]
    assert "0 job(s) being worked" in table.stdout

    assert as_json.returncode == 0, as_json.stderr
    parsed: dict[str, Any] = json.loads(as_json.stdout)
    assert set(parsed) == {"counts", "job_stats", "worker_states"}
    assert parsed["counts"]["ready"] == 4 and parsed["counts"]["failed"] == 0
    counts = {(row["queue"], row["job_class"]): row["count"] for row in parsed["job_stats"]}
    assert counts == {("mail", "CLI::Mail"): 3, ("", "CLI::Report"): 1}
    assert parsed["worker_states"] == []


def test_clear_with_yes_deletes_and_reports_the_count(engine: Engine, database_url: str) -> None:
    for index in range(3):
        add_job(engine, "CLI::Clear", index)
    result = run_cli("clear", "--yes", "--database-url", database_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "deleted 3 job(s)"
    assert job_rows(engine) == []


def test_clear_without_yes_aborts_on_no(engine: Engine, database_url: str) -> None:
    job_id = add_job(engine, "CLI::Keep")
    result = run_cli("clear", "--database-url", database_url, input="n\n")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Delete every job in que_jobs?" in result.stdout
    assert "Aborted" in result.stderr
    assert [row["job_id"] for row in job_rows(engine)] == [job_id]


# ---------------------------------------------------------------------------------------------
# worker: burst, environment, URLs


def test_worker_burst_works_every_ready_job_then_exits(engine: Engine, database_url: str) -> None:
    for index in range(10):
        add_job(engine, "CLI::Noop", index)
    later = add_job(engine, "CLI::Noop", run_at=future())
    result = run_cli(
        "worker",
        HANDLERS,
        "--burst",
        "--workers",
        "2",
        "--wake-interval",
        "0.1",
        "--database-url",
        database_url,
    )
    assert result.returncode == 0, result.stderr
    assert [row["job_id"] for row in job_rows(engine)] == [later]


def test_worker_reads_database_url_and_que_queue_from_the_environment(
    engine: Engine, database_url: str
) -> None:
    chosen = [add_job(engine, "CLI::Noop", index, queue="chosen") for index in range(3)]
    others = [add_job(engine, "CLI::Noop", queue=queue) for queue in ("", "other")]
    result = run_cli(
        "worker",
        HANDLERS,
        "--burst",
        "--workers",
        "2",
        "--wake-interval",
        "0.1",
        env={"DATABASE_URL": database_url, "QUE_QUEUE": "chosen"},
    )
    assert result.returncode == 0, result.stderr
    left = [row["job_id"] for row in job_rows(engine)]
    assert left == others, f"worked {set(chosen) - set(left)} of the chosen queue {chosen}"


def test_worker_accepts_a_plain_postgresql_url(engine: Engine, database_url: str) -> None:
    add_job(engine, "CLI::Noop", run_at=past())
    url = plain_url(database_url)
    assert url.startswith("postgresql://")
    result = run_cli("worker", HANDLERS, "--burst", "--workers", "1", "--database-url", url)
    assert result.returncode == 0, result.stderr
    assert job_rows(engine) == []


# ---------------------------------------------------------------------------------------------
# worker: signals


def test_sigterm_lets_the_running_job_finish(
    engine: Engine, database_url: str, events: Events, tmp_path: Path
) -> None:
    token = events.token()
    add_job(engine, "CLI::Block", token, 30)
    args = ("--workers", "2", "--wake-interval", "0.1", "--database-url", database_url)
    with background_worker(tmp_path, *args) as worker:
        wait_started(events, token, worker)
        worker.send(signal.SIGTERM)
        wait_for(
            lambda: "SIGTERM received" in worker.stderr,
            timeout=10,
            message="the worker to log the signal",
        )
        assert worker.process.poll() is None  # still finishing the job
        events.release(token)
        assert worker.wait() == 0, worker.stderr
    assert "Traceback" not in worker.stderr
    assert job_rows(engine) == []
    wait_no_lock(engine)


@pytest.mark.parametrize(
    "second", [signal.SIGINT, signal.SIGTERM], ids=["then-SIGINT", "then-SIGTERM"]
)
def test_a_second_signal_stops_at_once_leaving_the_job_intact(
    engine: Engine, database_url: str, events: Events, tmp_path: Path, second: signal.Signals
) -> None:
    token = events.token()
    job_id = add_job(engine, "CLI::Block", token, 30)
    args = ("--workers", "2", "--wake-interval", "0.1", "--database-url", database_url)
    with background_worker(tmp_path, *args) as worker:
        wait_started(events, token, worker)
        worker.send(signal.SIGTERM)
        # Python runs pending handlers in signal-number order: make sure the first was seen.
        wait_for(
            lambda: "SIGTERM received" in worker.stderr,
            timeout=10,
            message="the worker to log the first signal",
        )
        worker.send(second)
        assert worker.wait() == 128 + second, worker.stderr
    rows = job_rows(engine)
    assert [(row["job_id"], row["error_count"], row["last_error"]) for row in rows] == [
        (job_id, 0, None)
    ]
    wait_no_lock(engine)

    # The job is there to be worked again, here by an in-process worker, which first counts
    # the run the process cut short as a crash (a failed attempt, with Que's retry delay).
    worked: list[int] = []

    def record(job: JobContext, *args: object) -> None:
        worked.append(job.job_id)

    assert Worker(engine, {"CLI::Block": record}).work_one()
    assert worked == []
    (row,) = job_rows(engine)
    assert row["error_count"] == 1 and 0 < row["run_in"] <= 4
    assert row["last_error"].startswith("sqlalchemy_que.JobCrashedError: ")
    with engine.begin() as connection:
        connection.execute(text("UPDATE que_jobs SET run_at = now()"))
    assert Worker(engine, {"CLI::Block": record}).work_one()
    assert worked == [job_id]
    assert job_rows(engine) == []


def test_shutdown_timeout_exits_3_naming_the_running_job(
    engine: Engine, database_url: str, events: Events, tmp_path: Path
) -> None:
    token = events.token()
    job_id = add_job(engine, "CLI::Block", token, 30)
    args = (
        "--workers",
        "1",
        "--wake-interval",
        "0.1",
        "--shutdown-timeout",
        "0.5",
        "--database-url",
        database_url,
    )
    with background_worker(tmp_path, *args) as worker:
        wait_started(events, token, worker)
        worker.send(signal.SIGTERM)
        assert worker.wait() == 3, worker.stderr
    assert f"1 job(s) still running: {job_id}" in worker.stderr
    assert "Traceback" not in worker.stderr
    rows = job_rows(engine)
    assert [(row["job_id"], row["error_count"]) for row in rows] == [(job_id, 0)]
    wait_no_lock(engine)


# ---------------------------------------------------------------------------------------------
# errors: one clear line, exit status 1


def test_bad_database_url_is_one_line() -> None:
    commands = (["stats"], ["enqueue", "CLI::Noop"], ["worker", HANDLERS])
    results = run_cli_together(*([*command, "--database-url", "notaurl"] for command in commands))
    for result in results:
        assert_one_line_error(result, "cannot parse the database URL", "'notaurl'")


def test_unreachable_server_is_one_line() -> None:
    url = closed_port_url()
    commands = (["check"], ["worker", HANDLERS, "--burst"])
    for result in run_cli_together(*([*command, "--database-url", url] for command in commands)):
        assert_one_line_error(result, "database error", "127.0.0.1", "refused")


def test_bad_import_path_is_one_line(engine: Engine, database_url: str) -> None:
    cases = {
        "nosuchmodule:x": ("cannot import 'nosuchmodule'",),
        "tests.cli_handlers:missing": ("'tests.cli_handlers'", "no attribute 'missing'"),
        "tests.cli_handlers": ("must look like 'package.module:name'",),
    }
    results = run_cli_together(
        *(["worker", path, "--burst", "--database-url", database_url] for path in cases)
    )
    for needles, result in zip(cases.values(), results, strict=True):
        assert_one_line_error(result, *needles)


def test_worker_without_que_jobs_says_to_migrate(empty_database_url: str) -> None:
    result = run_cli("worker", HANDLERS, "--burst", "--database-url", empty_database_url)
    assert_one_line_error(result, "no que_jobs table", "sqlalchemy-que migrate")


def test_stats_without_que_jobs_says_to_migrate(empty_database_url: str) -> None:
    result = run_cli("stats", "--database-url", empty_database_url)
    assert_one_line_error(result, "que_jobs", "does not exist", "sqlalchemy-que migrate")


def test_no_database_url_is_one_line() -> None:
    result = run_cli("stats")
    assert_one_line_error(result, "--database-url", "DATABASE_URL")


# ---------------------------------------------------------------------------------------------
# demo


def test_demo_on_the_test_database_cleans_up(engine: Engine, database_url: str) -> None:
    result = run_cli("demo", "--jobs", "40", "--workers", "2", "--database-url", database_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("done: 40 jobs"), result.stdout
    assert "Traceback" not in result.stderr
    assert job_rows(engine) == []
    wait_no_lock(engine)


_PROGRESS = re.compile(
    r"done +(\d+)/(\d+) +still queued +(\d+) +\(of which failed once, to be retried: (\d+)\)"
)


def test_demo_progress_adds_up_and_the_summary_counts_retries(
    engine: Engine, database_url: str
) -> None:
    lines: list[str] = []
    jobs = 50
    result = run_demo(normalise_database_url(database_url), jobs=jobs, workers=2, echo=lines.append)
    flaky = sum(1 for index in range(jobs) if index % 10 >= 8)
    progress = [
        tuple(int(group) for group in match.groups())
        for match in map(_PROGRESS.search, lines)
        if match
    ]
    assert progress, lines
    for done, total, queued, to_retry in progress:
        assert (done + queued, total) == (jobs, jobs), lines
        assert to_retry <= queued, lines
    assert any(to_retry for *_, to_retry in progress), "no line showed a job waiting to retry"
    assert progress[-1] == (jobs, jobs, 0, 0), lines
    assert (result.completed, result.failures, result.retried) == (jobs, flaky, flaky)
    summary = lines[-1]
    assert summary.startswith(f"done: {jobs} jobs"), lines
    assert f"including {flaky} that failed once and succeeded when retried" in summary
    assert job_rows(engine) == []


@pytest.mark.slow
def test_demo_ignores_an_exported_database_url(empty_database_url: str) -> None:
    """Only --database-url makes the demo use a database of the user's: with DATABASE_URL
    exported (as for the other commands), it still runs on a throwaway server."""
    result = run_cli(
        "demo", "--jobs", "30", "--workers", "2", env={"DATABASE_URL": empty_database_url}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("starting a throwaway PostgreSQL from "), result.stdout
    assert "\ndone: 30 jobs" in result.stdout, result.stdout
    assert result.stdout.strip().endswith("throwaway PostgreSQL stopped and removed")
    engine = create_engine(empty_database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            tables = connection.execute(
                text("SELECT count(*) FROM pg_class WHERE relname LIKE 'que_jobs%'")
            ).scalar_one()
    finally:
        engine.dispose()
    assert tables == 0


def _runtime_distributions() -> list[metadata.Distribution]:
    """The installed distributions the CLI needs at run time, with the ``binary`` and
    ``embedded`` extras (when installed), found from the package metadata."""
    found: dict[str, metadata.Distribution] = {}
    todo: list[tuple[str, frozenset[str]]] = [("sqlalchemy-que", frozenset({"binary", "embedded"}))]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in done:
            continue
        done.add((canonicalize_name(name), extras))
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional one that is not installed
        found[canonicalize_name(name)] = distribution
        for line in distribution.requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return list(found.values())


def _copy_readable(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(0o755 if os.access(source, os.X_OK) else 0o644)


@pytest.fixture(scope="module")
def site_for_nobody() -> Iterator[Path]:
    """A folder that user ``nobody`` can read, holding the CLI's package and everything it
    imports: wherever the repository and its virtualenv live (a private ``mktemp -d`` clone,
    a home of mode 700), the test does not depend on nobody being able to reach them."""
    import sqlalchemy_que
    from sqlalchemy_que import schema

    site = Path(tempfile.mkdtemp(prefix="sqlalchemy-que-site-"))
    try:
        site.chmod(0o755)
        package = Path(sqlalchemy_que.__file__).resolve().parent
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(package, site / "sqlalchemy_que", ignore=ignore)
        shutil.copytree(
            schema.migrations_path(),
            site / "sqlalchemy_que" / "_migrations",
            ignore=ignore,
            dirs_exist_ok=True,
        )
        for distribution in _runtime_distributions():
            for file in distribution.files or []:
                relative = Path(file)
                if ".." in relative.parts or relative.suffix in (".pyc", ".pth"):
                    continue
                if relative.parts[0] == "sqlalchemy_que":
                    continue  # copied from the source above
                source = Path(str(distribution.locate_file(file)))
                if source.is_file():
                    _copy_readable(source, site / relative)
        for folder, subfolders, _ in os.walk(site):
            for name in subfolders:
                Path(folder, name).chmod(0o755)
        yield site
    finally:
        shutil.rmtree(site, ignore_errors=True)


def _interpreter_for_nobody(site: Path) -> list[str]:
    """A Python of this version that user ``nobody`` can run, with ``site`` on its path: this
    one's base interpreter, else the system's. Skips when nobody can run either (which
    depends on where Python is installed, not on where the repository is)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = getattr(sys, "_base_executable", sys.executable)
    candidates = [base, f"/usr/bin/{version}", f"/usr/local/bin/{version}"]
    tried = []
    for interpreter in dict.fromkeys(candidates):
        command = ["env", f"PYTHONPATH={site}", "PYTHONNOUSERSITE=1", interpreter, "-s"]
        probe = subprocess.run(
            ["runuser", "-u", "nobody", "--", *command, "-c", "import sqlalchemy_que._cli"],
            env={**cli_env(), "HOME": tempfile.gettempdir()},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if probe.returncode == 0:
            return command
        tried.append(f"{interpreter}: {probe.stderr.strip().splitlines()[-1:] or probe.returncode}")
    pytest.skip(f"user nobody can run no Python {version} here ({'; '.join(tried)})")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_demo_on_a_throwaway_postgres_as_an_unprivileged_user(site_for_nobody: Path) -> None:
    command = _interpreter_for_nobody(site_for_nobody)
    main = "from sqlalchemy_que._cli import main; main()"
    env = {**cli_env(), "HOME": tempfile.gettempdir()}
    env.pop("PYTHONPATH")
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", *command, "-c", main, "demo", "--jobs", "20"],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\ndone: 20 jobs" in result.stdout, result.stdout
    assert result.stdout.strip().endswith("throwaway PostgreSQL stopped and removed")


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg2://u@h/d", "postgresql+asyncpg://u@h/d", "mysql://u@h/d"]
)
def test_urls_for_other_drivers_are_refused_naming_them(url: str) -> None:
    with pytest.raises(QueError, match="does not use PostgreSQL with psycopg 3"):
        normalise_database_url(url)


def test_plain_postgres_urls_get_the_psycopg_driver() -> None:
    for url in ("postgres://u@h/d", "postgresql://u@h/d", "postgresql+psycopg://u@h/d"):
        assert normalise_database_url(url).drivername == "postgresql+psycopg"
