"""The shipped Alembic revisions: one head, step by step up and down, idempotence, adoption of
tables that Ruby Que 0.x made, refusal of Que 1.x tables, the same ``pg_dump`` as Ruby's own
migrations, use from an application's own Alembic environment, and the built wheel."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import venv
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    Table,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.pool import NullPool

import sqlalchemy_que
import sqlalchemy_que.schema
from sqlalchemy_que import SchemaError, UnsupportedSchemaError, insert_job
from sqlalchemy_que.schema import VERSION_TABLE, downgrade, migrate_sql
from sqlalchemy_que.testing import find_postgres_bindir
from tests.test_model import EXPECTED_V3, read_shape, table_exists

REPOSITORY = Path(__file__).resolve().parent.parent

# Ruby Que 0.14.3's own migrations, step by step, as they leave the table.
RUBY_STEP_1 = """
CREATE TABLE que_jobs (
    priority    integer     NOT NULL DEFAULT 1,
    run_at      timestamptz NOT NULL DEFAULT now(),
    job_id      bigserial   NOT NULL,
    job_class   text        NOT NULL,
    args        json        NOT NULL DEFAULT '[]'::json,
    error_count integer     NOT NULL DEFAULT 0,
    last_error  text,
    CONSTRAINT que_jobs_pkey PRIMARY KEY (priority, run_at, job_id)
)
"""
RUBY_STEP_2 = "ALTER TABLE que_jobs ALTER COLUMN priority SET DEFAULT 100"
RUBY_STEP_3 = """
ALTER TABLE que_jobs
    DROP CONSTRAINT que_jobs_pkey,
    ALTER COLUMN priority TYPE smallint,
    ADD COLUMN queue text NOT NULL DEFAULT '',
    ADD CONSTRAINT que_jobs_pkey PRIMARY KEY (queue, priority, run_at, job_id)
"""

# Rows as Ruby or Go clients write them: args text with spaces, key order and non-ASCII text
# that a json column keeps verbatim, timestamps to the microsecond, a failed job.
RUBY_ROWS_V1 = """
INSERT INTO que_jobs (priority, run_at, job_class, args, error_count, last_error) VALUES
    (1, '2031-05-06 07:08:09.123456+00', 'SendEmail', '[1, "two" , {"b": 2, "a": 1}]', 0, NULL),
    (100, '2020-01-01 00:00:00.000001+00', 'Billing::ChargeJob', '[ "héllo ☃" ]', 3,
     E'RuntimeError: boom\\n/app/charge.rb:12:in `run''\\n'),
    (-5, now(), 'Old', '[]', 0, NULL)
"""
RUBY_ROWS_V3 = """
INSERT INTO que_jobs (priority, run_at, job_class, args, error_count, last_error, queue) VALUES
    (1, '2031-05-06 07:08:09.123456+00', 'SendEmail', '[1, "two" , {"b": 2, "a": 1}]', 0, NULL,
     ''),
    (100, '2020-01-01 00:00:00.000001+00', 'Billing::ChargeJob', '[ "héllo ☃" ]', 3,
     E'RuntimeError: boom\\n/app/charge.rb:12:in `run''\\n', 'billing'),
    (-5, now(), 'Old', '[]', 0, NULL, 'mail')
"""

# A stand-in for Que 1.x's table (schema version 4): another shape, which must not be touched.
QUE_1X_TABLE = """
CREATE TABLE que_jobs (
    priority    smallint    NOT NULL DEFAULT 100,
    run_at      timestamptz NOT NULL DEFAULT now(),
    id          bigserial   PRIMARY KEY,
    job_class   text        NOT NULL,
    error_count integer     NOT NULL DEFAULT 0,
    last_error_message text,
    queue       text        NOT NULL DEFAULT 'default',
    last_error_backtrace text,
    finished_at timestamptz,
    expired_at  timestamptz,
    args        jsonb       NOT NULL DEFAULT '[]'::jsonb,
    data        jsonb       NOT NULL DEFAULT '{}'::jsonb
);
COMMENT ON TABLE que_jobs IS '4'
"""

SNAPSHOT = text("SELECT *, args::text AS args_text FROM que_jobs ORDER BY job_id")
SNAPSHOT_V1 = text(
    "SELECT priority, run_at, job_id, job_class, args::text, error_count, last_error "
    "FROM que_jobs ORDER BY job_id"
)

_DDL_WORDS = {"CREATE", "ALTER", "DROP", "COMMENT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"}


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures


def ruby_que_table(connection: Connection, version: int, *, comment: bool = True) -> None:
    """Build ``que_jobs`` the way Ruby Que 0.14.3's migrations leave it at ``version``."""
    connection.execute(text(RUBY_STEP_1))
    if comment:
        connection.execute(text("COMMENT ON TABLE que_jobs IS '1'"))
    if version >= 2:
        connection.execute(text(RUBY_STEP_2))
        connection.execute(text("COMMENT ON TABLE que_jobs IS '2'"))
    if version >= 3:
        connection.execute(text(RUBY_STEP_3))
        connection.execute(text("COMMENT ON TABLE que_jobs IS '3'"))


def script_directory() -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(sqlalchemy_que.schema.migrations_path()))
    return ScriptDirectory.from_config(config)


def head_revision() -> str:
    (head,) = script_directory().get_heads()
    return head


def recorded_revisions(connection: Connection, table: str = VERSION_TABLE) -> list[str]:
    if not table_exists(connection, table):
        return []
    rows = connection.execute(text(f"SELECT version_num FROM {table} ORDER BY version_num"))
    return list(rows.scalars())


def sequence_exists(connection: Connection) -> bool:
    return table_exists(connection, "que_jobs_job_id_seq")


def captured_statements(engine: Engine) -> list[str]:
    """Every SQL statement ``engine`` sends from now on (appended as they go)."""
    statements: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        statements.append(statement)

    return statements


def changing(statements: list[str]) -> list[str]:
    """The statements that change schema or data."""
    return [s for s in statements if s.split(None, 1)[0].upper() in _DDL_WORDS]


@pytest.fixture
def empty_engine(empty_database_url: str) -> Iterator[Engine]:
    engine = create_engine(empty_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def new_database(database_url: str) -> Iterator[Callable[[], str]]:
    """A factory of new, empty databases on the test server (dropped after the test), for
    tests that need more than one."""
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    names: list[str] = []

    def make() -> str:
        name = f"que_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        names.append(name)
        return make_url(database_url).set(database=name).render_as_string(hide_password=False)

    yield make
    with admin.connect() as connection:
        for name in names:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


# ---------------------------------------------------------------------------------------------
# The revisions


def test_one_head_labelled_que() -> None:
    script = script_directory()
    heads = script.get_heads()
    assert len(heads) == 1
    head = script.get_revision(heads[0])
    assert head is not None
    assert "que" in head.branch_labels
    assert script.get_current_head() == heads[0]
    (via_label,) = script.get_revisions("que@head")
    assert via_label is not None
    assert via_label.revision == heads[0]
    # Every revision belongs to the one branch, down to a single base.
    revisions = list(script.walk_revisions())
    assert len(script.get_bases()) == 1
    assert all("que" in rev.branch_labels for rev in revisions)
    # The folder an application adds to its version_locations is where the revisions are.
    assert {Path(rev.path).parent for rev in revisions} == {
        Path(sqlalchemy_que.schema.version_location())
    }


def test_revisions_do_not_import_the_live_model() -> None:
    files = sorted(Path(sqlalchemy_que.schema.version_location()).glob("*.py"))
    assert files
    for path in files:
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
        ours = {name for name in imported if name.split(".")[0] == "sqlalchemy_que"}
        assert ours <= {"sqlalchemy_que._errors"}, f"{path.name} imports {sorted(ours)}"


def test_upgrade_and_downgrade_step_by_step(empty_engine: Engine) -> None:
    script = script_directory()
    upward = list(reversed(list(script.walk_revisions("base", "heads"))))
    for step in upward:
        sqlalchemy_que.migrate(empty_engine, revision=step.revision)
        with empty_engine.connect() as connection:
            assert recorded_revisions(connection) == [step.revision]
    with empty_engine.connect() as connection:
        assert read_shape(connection) == EXPECTED_V3

    for step in reversed(upward):
        with empty_engine.connect() as connection:
            assert recorded_revisions(connection) == [step.revision]
        downgrade(empty_engine, revision="-1")
        expected = [] if step.down_revision is None else [str(step.down_revision)]
        with empty_engine.connect() as connection:
            assert recorded_revisions(connection) == expected
    with empty_engine.connect() as connection:
        assert not table_exists(connection, "que_jobs")
        assert not sequence_exists(connection)
        leftovers = (
            connection.execute(
                text(
                    "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                    "AND relkind <> 'i' AND relname <> :version_table"
                ),
                {"version_table": VERSION_TABLE},
            )
            .scalars()
            .all()
        )
    assert leftovers == []

    # And back up again from nothing.
    sqlalchemy_que.migrate(empty_engine)
    with empty_engine.connect() as connection:
        assert read_shape(connection) == EXPECTED_V3


def test_downgrade_refuses_while_jobs_exist(empty_engine: Engine) -> None:
    sqlalchemy_que.migrate(empty_engine)
    with empty_engine.begin() as connection:
        insert_job(connection, "SendEmail", 1)
        insert_job(connection, "SendEmail", 2)
    with pytest.raises(SchemaError, match=r"2 job\(s\)"):
        downgrade(empty_engine)
    with empty_engine.connect() as connection:
        assert read_shape(connection) == EXPECTED_V3
        assert connection.execute(text("SELECT count(*) FROM que_jobs")).scalar_one() == 2
        assert recorded_revisions(connection) == [head_revision()]

    with empty_engine.begin() as connection:
        connection.execute(text("DELETE FROM que_jobs"))
    downgrade(empty_engine)  # allowed once the jobs are gone
    with empty_engine.connect() as connection:
        assert not table_exists(connection, "que_jobs")


def test_downgrade_refuses_while_failed_jobs_exist(empty_engine: Engine) -> None:
    sqlalchemy_que.migrate(empty_engine)
    with empty_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO que_failed_jobs (priority, run_at, job_id, job_class, args, "
                "error_count, queue, reason) VALUES (100, now(), 1, 'A', '[]', 16, '', 'error')"
            )
        )
    with pytest.raises(SchemaError, match=r"que_failed_jobs still holds 1 failed job\(s\)"):
        downgrade(empty_engine)
    with empty_engine.connect() as connection:
        assert recorded_revisions(connection) == [head_revision()]
        assert table_exists(connection, "que_failed_jobs")
        assert table_exists(connection, "que_job_runs")
    with empty_engine.begin() as connection:
        connection.execute(text("DELETE FROM que_failed_jobs"))
    downgrade(empty_engine)
    with empty_engine.connect() as connection:
        assert not table_exists(connection, "que_failed_jobs")
        assert not table_exists(connection, "que_job_runs")
        assert not table_exists(connection, "que_jobs")


def test_migrate_twice_changes_nothing_the_second_time(empty_engine: Engine) -> None:
    statements = captured_statements(empty_engine)
    sqlalchemy_que.migrate(empty_engine)
    first_run = changing(statements)
    assert any(s.lstrip().startswith("CREATE TABLE que_jobs") for s in first_run)
    with empty_engine.begin() as connection:
        job_id = insert_job(connection, "SendEmail", 1)
        oid = connection.execute(text("SELECT 'que_jobs'::regclass::oid")).scalar_one()
        before = connection.execute(SNAPSHOT).all()

    statements.clear()
    sqlalchemy_que.migrate(empty_engine)
    assert statements  # it did look
    assert changing(statements) == []
    with empty_engine.connect() as connection:
        assert connection.execute(text("SELECT 'que_jobs'::regclass::oid")).scalar_one() == oid
        assert connection.execute(SNAPSHOT).all() == before
        assert before[0].job_id == job_id
        assert recorded_revisions(connection) == [head_revision()]


def test_concurrent_migrations_wait_for_each_other(empty_engine: Engine) -> None:
    """Two processes starting at once on an empty database: one creates, the other then
    finds the table made. The migration lock is held here until both are waiting on it."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sqlalchemy_que.migrate(empty_engine)
        except BaseException as error:  # handed to the test thread below
            errors.append(error)

    waiting = text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND classid = 20837 AND objid = 1 AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    threads = [threading.Thread(target=run) for _ in range(2)]
    with empty_engine.connect() as holder, empty_engine.connect() as observer:
        holder.execute(text("SELECT pg_advisory_xact_lock(20837, 1)"))
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while observer.execute(waiting).scalar_one() < 2:
            observer.rollback()  # a fresh snapshot of pg_locks each time
            assert time.monotonic() < deadline, "the migrations never queued on the lock"
            time.sleep(0.01)
        holder.rollback()  # releases the lock: they go one after the other
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert errors == []
    with empty_engine.connect() as connection:
        assert read_shape(connection) == EXPECTED_V3
        assert recorded_revisions(connection) == [head_revision()]


def test_migrate_inside_the_callers_transaction_rolls_back_with_it(empty_engine: Engine) -> None:
    with empty_engine.connect() as connection:
        transaction = connection.begin()
        sqlalchemy_que.migrate(connection)
        assert table_exists(connection, "que_jobs")
        transaction.rollback()
    with empty_engine.connect() as connection:
        assert not table_exists(connection, "que_jobs")
        assert not table_exists(connection, VERSION_TABLE)


def test_offline_sql_creates_the_same_table(empty_engine: Engine) -> None:
    sql = migrate_sql()
    assert "CREATE TABLE que_jobs" in sql
    assert "COMMENT ON TABLE que_jobs IS '3'" in sql
    assert VERSION_TABLE in sql
    assert head_revision() in sql
    with empty_engine.connect() as connection:
        # The printed script carries its own BEGIN/COMMIT: run it as a reviewer would.
        connection.exec_driver_sql(sql)
        connection.commit()
    with empty_engine.connect() as connection:
        assert read_shape(connection) == EXPECTED_V3
        assert recorded_revisions(connection) == [head_revision()]


# ---------------------------------------------------------------------------------------------
# Adopting tables made by Ruby Que


def test_adopts_a_ruby_version_3_table_without_touching_a_row(empty_engine: Engine) -> None:
    with empty_engine.begin() as connection:
        ruby_que_table(connection, 3)
        connection.execute(text(RUBY_ROWS_V3))
    with empty_engine.connect() as connection:
        before = connection.execute(SNAPSHOT).all()
        physical = connection.execute(
            text("SELECT xmin::text, ctid::text FROM que_jobs ORDER BY job_id")
        ).all()
        shape = read_shape(connection)
    assert shape == EXPECTED_V3
    assert len(before) == 3

    statements = captured_statements(empty_engine)
    sqlalchemy_que.migrate(empty_engine)
    touching_que_jobs = [s for s in changing(statements) if "que_jobs" in s]
    assert touching_que_jobs == []

    with empty_engine.connect() as connection:
        after = connection.execute(SNAPSHOT).all()
        assert after == before
        assert [row.args_text for row in after] == [
            '[1, "two" , {"b": 2, "a": 1}]',
            '[ "héllo ☃" ]',
            "[]",
        ]
        assert (
            connection.execute(
                text("SELECT xmin::text, ctid::text FROM que_jobs ORDER BY job_id")
            ).all()
            == physical
        )  # not even rewritten
        assert read_shape(connection) == EXPECTED_V3
        assert recorded_revisions(connection) == [head_revision()]
        sqlalchemy_que.check_schema(connection)

    # The sequence carries on from Ruby's last job_id.
    with empty_engine.begin() as connection:
        assert insert_job(connection, "AfterAdoption") == max(row.job_id for row in before) + 1


@pytest.mark.parametrize(
    ("version", "comment"),
    [(1, False), (1, True), (2, True)],
    ids=["version-1-without-comment", "version-1-comment-1", "version-2"],
)
def test_brings_an_older_ruby_table_to_version_3(
    empty_engine: Engine, version: int, comment: bool
) -> None:
    with empty_engine.begin() as connection:
        ruby_que_table(connection, version, comment=comment)
        connection.execute(text(RUBY_ROWS_V1))
    with empty_engine.connect() as connection:
        assert sqlalchemy_que.schema.schema_version(connection) == version
        with pytest.raises(SchemaError, match=f"version {version}"):
            sqlalchemy_que.check_schema(connection)
        before = connection.execute(SNAPSHOT_V1).all()

    sqlalchemy_que.migrate(empty_engine)

    with empty_engine.connect() as connection:
        assert read_shape(connection) == EXPECTED_V3
        assert connection.execute(SNAPSHOT_V1).all() == before
        queues = connection.execute(text("SELECT DISTINCT queue FROM que_jobs")).scalars().all()
        assert queues == [""]
        assert recorded_revisions(connection) == [head_revision()]
        sqlalchemy_que.check_schema(connection)
    with empty_engine.begin() as connection:
        assert insert_job(connection, "AfterAdoption") == max(row.job_id for row in before) + 1


def test_refuses_a_que_1x_table_and_leaves_it_alone(empty_engine: Engine) -> None:
    with empty_engine.begin() as connection:
        connection.execute(text(QUE_1X_TABLE))
        connection.execute(
            text("INSERT INTO que_jobs (job_class, args) VALUES ('NewQue', '[1, {\"a\": 2}]')")
        )
    catalog = text(
        "SELECT attnum, attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'que_jobs'::regclass AND attnum > 0 ORDER BY attnum"
    )
    rows = text("SELECT *, args::text FROM que_jobs ORDER BY id")
    with empty_engine.connect() as connection:
        columns_before = connection.execute(catalog).all()
        rows_before = connection.execute(rows).all()

    with pytest.raises(UnsupportedSchemaError, match="version 4") as refused:
        sqlalchemy_que.migrate(empty_engine)
    assert refused.value.version == 4

    with empty_engine.connect() as connection:
        assert connection.execute(catalog).all() == columns_before
        assert connection.execute(rows).all() == rows_before
        assert sqlalchemy_que.schema.schema_version(connection) == 4
        assert not table_exists(connection, VERSION_TABLE)
        with pytest.raises(UnsupportedSchemaError, match="version 4") as checked:
            sqlalchemy_que.check_schema(connection)
        assert checked.value.version == 4


def test_check_schema_without_a_table_says_how_to_fix_it(empty_engine: Engine) -> None:
    with empty_engine.connect() as connection:
        assert sqlalchemy_que.schema.schema_version(connection) == 0
        with pytest.raises(SchemaError, match="sqlalchemy-que migrate") as missing:
            sqlalchemy_que.check_schema(connection)
    assert not isinstance(missing.value, UnsupportedSchemaError)
    assert "que_jobs" in str(missing.value)


def test_refuses_to_create_que_jobs_beside_a_leftover_sequence_of_its_name(
    empty_engine: Engine,
) -> None:
    """CREATE TABLE would name job_id's sequence que_jobs_job_id_seq1 when the name is taken:
    a table Que's upgrade cannot rename, that check_schema must not pass."""
    with empty_engine.begin() as connection:
        connection.execute(text("CREATE SEQUENCE que_jobs_job_id_seq START 42"))
    with pytest.raises(SchemaError, match=r"sequence named que_jobs_job_id_seq already exists"):
        sqlalchemy_que.migrate(empty_engine)
    with empty_engine.connect() as connection:
        assert not table_exists(connection, "que_jobs")
        assert not table_exists(connection, "que_jobs_job_id_seq1")
        assert not table_exists(connection, VERSION_TABLE)
        # The leftover is left as it was.
        assert connection.execute(text("SELECT last_value FROM que_jobs_job_id_seq")).scalar() == 42

    with empty_engine.begin() as connection:
        connection.execute(text("DROP SEQUENCE que_jobs_job_id_seq"))
    sqlalchemy_que.migrate(empty_engine)  # as the error says: drop it, migrate again
    with empty_engine.connect() as connection:
        assert read_shape(connection) == EXPECTED_V3
        sqlalchemy_que.check_schema(connection)


def test_a_sequence_elsewhere_on_the_search_path_does_not_stop_migrate(
    empty_engine: Engine,
) -> None:
    """Only the schema where CREATE TABLE makes the sequence matters."""
    with empty_engine.begin() as connection:
        connection.execute(text("CREATE SCHEMA other"))
        connection.execute(text("CREATE SEQUENCE other.que_jobs_job_id_seq"))
        connection.execute(text("SET search_path TO public, other"))
        sqlalchemy_que.migrate(connection)
        assert read_shape(connection) == EXPECTED_V3


def test_check_schema_refuses_a_job_id_sequence_of_another_name(empty_engine: Engine) -> None:
    # What migrate made before it refused: the table, with its sequence named ..._seq1.
    with empty_engine.begin() as connection:
        connection.execute(text("CREATE SEQUENCE que_jobs_job_id_seq"))
        ruby_que_table(connection, 3)
    with empty_engine.connect() as connection:
        assert connection.execute(
            text("SELECT pg_get_serial_sequence('que_jobs', 'job_id')")
        ).scalar_one() == ("public.que_jobs_job_id_seq1")
        with pytest.raises(SchemaError, match=r"'que_jobs_job_id_seq1', not 'que_jobs_job_id_seq'"):
            sqlalchemy_que.check_schema(connection)

    # The fix the error names works.
    with empty_engine.begin() as connection:
        connection.execute(text("DROP SEQUENCE que_jobs_job_id_seq"))
        connection.execute(
            text("ALTER SEQUENCE que_jobs_job_id_seq1 RENAME TO que_jobs_job_id_seq")
        )
    with empty_engine.connect() as connection:
        sqlalchemy_que.check_schema(connection)


def test_check_schema_refuses_a_job_id_without_its_sequence(empty_engine: Engine) -> None:
    with empty_engine.begin() as connection:
        ruby_que_table(connection, 3)
        connection.execute(text("ALTER SEQUENCE que_jobs_job_id_seq OWNED BY NONE"))
    with empty_engine.connect() as connection:
        with pytest.raises(SchemaError, match=r"que_jobs.job_id has no sequence of its own"):
            sqlalchemy_que.check_schema(connection)
        # check_schema only reads: the caller's transaction is still usable.
        assert connection.execute(text("SELECT 1")).scalar_one() == 1


# ---------------------------------------------------------------------------------------------
# pg_dump: ours and Ruby's are the same table


def schema_dump(url: str) -> str:
    libpq_url = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    result = subprocess.run(
        [
            str(find_postgres_bindir() / "pg_dump"),
            "--schema-only",
            "-t",
            "que_jobs",
            "-t",
            "que_jobs_job_id_seq",
            f"--dbname={libpq_url}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # pg_dump 15.14+ brackets the script with \restrict <random key>: differs on every run.
    return "\n".join(
        line
        for line in result.stdout.splitlines()
        if not line.startswith(("\\restrict ", "\\unrestrict "))
    )


def test_pg_dump_matches_ruby_ques_own_migrations(new_database: Callable[[], str]) -> None:
    ours_url, ruby_url = new_database(), new_database()
    ours = create_engine(ours_url)
    ruby = create_engine(ruby_url)
    try:
        sqlalchemy_que.migrate(ours)
        with ruby.begin() as connection:
            ruby_que_table(connection, 3)
    finally:
        ours.dispose()
        ruby.dispose()

    ours_dump, ruby_dump = schema_dump(ours_url), schema_dump(ruby_url)
    assert "CREATE TABLE public.que_jobs" in ours_dump
    assert "COMMENT ON TABLE public.que_jobs IS '3';" in ours_dump
    assert "CREATE SEQUENCE public.que_jobs_job_id_seq" in ours_dump
    assert "OWNED BY public.que_jobs.job_id" in ours_dump
    assert VERSION_TABLE not in ours_dump
    assert ours_dump.splitlines() == ruby_dump.splitlines()


# ---------------------------------------------------------------------------------------------
# Inside an application's own Alembic environment

APP_ENV = """
from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

engine = create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=NullPool)
try:
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()
finally:
    engine.dispose()
"""

APP_MAKO = '''"""${message}"""
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade():
    ${upgrades if upgrades else "pass"}


def downgrade():
    ${downgrades if downgrades else "pass"}
'''

APP_REVISION_ID = "0a1b2c3d4e5f"
APP_REVISION = f'''"""The application's users."""
import sqlalchemy as sa
from alembic import op

revision = "{APP_REVISION_ID}"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "app_users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.Text, nullable=False),
    )


def downgrade():
    op.drop_table("app_users")
'''


def application_alembic(root: Path, url: str) -> Config:
    """A minimal Alembic project of an application, including our revisions."""
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(textwrap.dedent(APP_ENV), encoding="utf-8")
    (root / "script.py.mako").write_text(APP_MAKO, encoding="utf-8")
    (root / "versions" / f"{APP_REVISION_ID}_app_users.py").write_text(
        APP_REVISION, encoding="utf-8"
    )
    config = Config()
    config.set_main_option("script_location", str(root))
    config.set_main_option("path_separator", "os")
    config.set_main_option(
        "version_locations",
        os.pathsep.join([str(root / "versions"), sqlalchemy_que.schema.version_location()]),
    )
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def test_in_an_applications_alembic_environment(
    tmp_path: Path, empty_database_url: str, empty_engine: Engine
) -> None:
    config = application_alembic(tmp_path / "migrations", empty_database_url)
    assert sorted(ScriptDirectory.from_config(config).get_heads()) == sorted(
        [APP_REVISION_ID, head_revision()]
    )

    command.upgrade(config, "heads")
    with empty_engine.connect() as connection:
        assert table_exists(connection, "app_users")
        assert read_shape(connection) == EXPECTED_V3
        assert recorded_revisions(connection, "alembic_version") == sorted(
            [APP_REVISION_ID, head_revision()]
        )
        assert not table_exists(connection, VERSION_TABLE)

    command.downgrade(config, "que@base")
    with empty_engine.connect() as connection:
        assert not table_exists(connection, "que_jobs")
        assert not sequence_exists(connection)
        assert table_exists(connection, "app_users")
        assert recorded_revisions(connection, "alembic_version") == [APP_REVISION_ID]
        assert not table_exists(connection, VERSION_TABLE)


HOOKED_ENV = APP_ENV.replace(
    "target_metadata=None",
    "target_metadata=None,\n"
    "        process_revision_directives=sqlalchemy_que.schema.process_revision_directives",
).replace(
    "from alembic import context", "from alembic import context\nimport sqlalchemy_que.schema"
)


def hooked_alembic(root: Path, url: str, *, app_revision: bool) -> Config:
    """:func:`application_alembic` with the hook in env.py, run for every revision."""
    config = application_alembic(root, url)
    (root / "env.py").write_text(textwrap.dedent(HOOKED_ENV), encoding="utf-8")
    if not app_revision:
        (root / "versions" / f"{APP_REVISION_ID}_app_users.py").unlink()
    config.set_main_option("revision_environment", "true")
    return config


def new_revision(config: Config, **options: Any) -> Script:
    before = {rev.revision for rev in ScriptDirectory.from_config(config).walk_revisions()}
    script = command.revision(config, message="next", **options)
    assert isinstance(script, Script)
    assert script.revision not in before
    return script


def test_the_hook_puts_an_applications_revisions_on_its_own_branch(
    tmp_path: Path, empty_database_url: str
) -> None:
    ours = sorted(Path(sqlalchemy_que.schema.version_location()).glob("*.py"))

    # No revision of the application's own yet: a new base, in its folder (not on ours).
    config = hooked_alembic(tmp_path / "fresh", empty_database_url, app_revision=False)
    first = new_revision(config)
    assert Path(first.path).parent == tmp_path / "fresh" / "versions"
    assert first.down_revision is None
    # Then on the application's own head, though ours is a head too.
    second = new_revision(config)
    assert Path(second.path).parent == tmp_path / "fresh" / "versions"
    assert second.down_revision == first.revision
    # --head base without --version-path: the hook names the application's folder.
    other_base = new_revision(config, head="base")
    assert Path(other_base.path).parent == tmp_path / "fresh" / "versions"
    assert other_base.down_revision is None
    # Two heads of the application's own: Alembic asks which, as it would without the hook.
    with pytest.raises(CommandError, match="Multiple heads"):
        command.revision(config, message="which head?")
    # --head is kept.
    on_first = new_revision(config, head=first.revision, splice=True)
    assert on_first.down_revision == first.revision
    assert sorted(Path(sqlalchemy_que.schema.version_location()).glob("*.py")) == ours


def test_the_hook_refuses_an_environment_without_a_folder_of_the_applications_own(
    tmp_path: Path, empty_database_url: str
) -> None:
    config = hooked_alembic(tmp_path / "ours_only", empty_database_url, app_revision=False)
    config.set_main_option("version_locations", sqlalchemy_que.schema.version_location())
    ours = sorted(Path(sqlalchemy_que.schema.version_location()).glob("*.py"))
    with pytest.raises(SchemaError, match="no versions folder of its own"):
        command.revision(config, message="nowhere")
    assert sorted(Path(sqlalchemy_que.schema.version_location()).glob("*.py")) == ours


# An application's env.py for autogenerate, as docs/alembic.md shows it; the test hands it the
# target metadata and the filter through config.attributes.
AUTOGENERATE_ENV = """
from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

config = context.config
engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=NullPool)
try:
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=config.attributes["target_metadata"],
            include_object=config.attributes["include_object"],
        )
        with context.begin_transaction():
            context.run_migrations()
finally:
    engine.dispose()
"""


def autogenerate(root: Path, url: str, target_metadata: object, include_object: object) -> str:
    """``alembic revision --autogenerate`` in a new application environment at ``root``
    (without our revisions); the text of the revision written."""
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(AUTOGENERATE_ENV, encoding="utf-8")
    (root / "script.py.mako").write_text(APP_MAKO, encoding="utf-8")
    config = Config()
    config.set_main_option("script_location", str(root))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["target_metadata"] = target_metadata
    config.attributes["include_object"] = include_object
    script = command.revision(config, message="users", autogenerate=True)
    assert isinstance(script, Script)
    return Path(script.path).read_text(encoding="utf-8")


def app_users_metadata() -> MetaData:
    metadata = MetaData()
    Table("app_users", metadata, Column("id", Integer, primary_key=True))
    return metadata


@pytest.mark.parametrize("with_our_metadata", [False, True], ids=["app-metadata", "both"])
def test_an_applications_autogenerate_with_the_filter_leaves_our_tables_alone(
    tmp_path: Path, empty_database_url: str, empty_engine: Engine, with_our_metadata: bool
) -> None:
    sqlalchemy_que.migrate(empty_engine)
    app_metadata = app_users_metadata()
    target = [app_metadata, sqlalchemy_que.metadata] if with_our_metadata else app_metadata

    unfiltered = autogenerate(tmp_path / "unfiltered", empty_database_url, target, None)
    assert "op.drop_table('sqlalchemy_que_version')" in unfiltered  # what the filter is for

    revision = autogenerate(
        tmp_path / "filtered", empty_database_url, target, sqlalchemy_que.schema.include_object
    )
    assert "op.create_table('app_users'" in revision
    assert "que_jobs" not in revision
    assert VERSION_TABLE not in revision


def test_the_filter_keeps_an_application_from_creating_our_tables(
    tmp_path: Path, empty_database_url: str
) -> None:
    """An application that lists our metadata but has not migrated yet: autogenerate must not
    create que_jobs itself (our migrations do, with the exact shape)."""
    target = [app_users_metadata(), sqlalchemy_que.metadata]
    revision = autogenerate(
        tmp_path / "env", empty_database_url, target, sqlalchemy_que.schema.include_object
    )
    assert "op.create_table('app_users'" in revision
    assert "que_jobs" not in revision


# ---------------------------------------------------------------------------------------------
# The wheel

MIGRATE_FROM_WHEEL = """
import sys
from sqlalchemy import create_engine
import sqlalchemy_que

print(sqlalchemy_que.__file__)
print(sqlalchemy_que.schema.migrations_path())
engine = create_engine(sys.argv[1])
sqlalchemy_que.migrate(engine)
engine.dispose()
"""


def build_wheel(outdir: Path) -> Path:
    """Build the wheel in an isolated environment, or without isolation when that cannot be
    set up (no package index reachable)."""
    base = [sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir), str(REPOSITORY)]
    result = subprocess.run(base, capture_output=True, text=True, timeout=540, check=False)
    if result.returncode != 0:
        result = subprocess.run(
            [*base, "--no-isolation"], capture_output=True, text=True, timeout=300, check=False
        )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = outdir.glob("sqlalchemy_que-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's wheel, built once for the tests of this module that need it."""
    return build_wheel(tmp_path_factory.mktemp("dist"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_wheel_ships_the_migrations_and_migrates(
    tmp_path: Path, wheel: Path, empty_database_url: str, empty_engine: Engine
) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        extracted = tmp_path / "site"
        archive.extractall(extracted)
    assert "sqlalchemy_que/py.typed" in names
    assert "sqlalchemy_que/_migrations/env.py" in names
    for asset in (
        "static/dashboard.js",
        "static/dashboard.css",
        "templates/que_dashboard/jobs.html",
    ):
        assert f"sqlalchemy_que/dashboard/{asset}" in names
    revision_files = sorted(p.name for p in (REPOSITORY / "migrations" / "versions").glob("*.py"))
    assert revision_files
    for name in revision_files:
        assert f"sqlalchemy_que/_migrations/versions/{name}" in names

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", MIGRATE_FROM_WHEEL, empty_database_url],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(extracted)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    module_file, migrations = result.stdout.splitlines()[:2]
    assert Path(module_file) == extracted / "sqlalchemy_que" / "__init__.py"
    assert Path(migrations) == extracted / "sqlalchemy_que" / "_migrations"
    with empty_engine.connect() as connection:
        assert read_shape(connection) == EXPECTED_V3
        assert recorded_revisions(connection) == [head_revision()]


def test_the_minimum_constraints_pin_every_declared_floor() -> None:
    """constraints/minimums.txt, which `make test-minimums` installs, pins each floor that the
    package declares for its dependencies and its flask and binary extras, and nothing lower."""
    pins: dict[str, Version] = {}
    for line in (REPOSITORY / "constraints" / "minimums.txt").read_text("utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    declared = importlib.metadata.requires("sqlalchemy-que")
    assert declared is not None
    floors: dict[str, Version] = {}
    for requirement in map(Requirement, declared):
        marker = requirement.marker
        if marker is None or any(
            marker.evaluate({"extra": extra}) for extra in ("flask", "binary")
        ):
            (floor,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
            floors[canonicalize_name(requirement.name)] = Version(floor)
            if "binary" in requirement.extras:
                floors["psycopg-binary"] = Version(floor)
    assert {"sqlalchemy", "psycopg", "psycopg-binary", "alembic", "click", "flask"} <= set(floors)
    assert {name: pins.get(name) for name in floors} == floors


# ---------------------------------------------------------------------------------------------
# docs/alembic.md's recipe, from the wheel installed in a new virtual environment

DOCS_ALEMBIC = REPOSITORY / "docs" / "alembic.md"

APP_MODELS = """
from sqlalchemy import ForeignKey
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
"""

APP_MODELS_ORDERS = """

class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
"""


def fenced_block(page: Path, language: str, first_line: str | None = None) -> str:
    """The first ```language block of ``page`` (the first that starts with ``first_line``)."""
    pattern = re.compile(rf"^```{language}\n(.*?)^```$", re.DOTALL | re.MULTILINE)
    for block in pattern.findall(page.read_text(encoding="utf-8")):
        if first_line is None or block.startswith(first_line):
            return str(block)
    raise AssertionError(f"no ```{language} block starting {first_line!r} in {page.name}")


def venv_with_the_wheel(root: Path, wheel: Path) -> Path:
    """A new virtual environment with the wheel installed by pip; its dependencies (and
    Alembic's command line) come from the test run's own site-packages, listed in a .pth
    file, where the checkout's editable install cannot take effect. Returns its python."""
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    (Path(site_packages) / "test_run_dependencies.pth").write_text(
        "\n".join(sysconfig_paths()) + "\n", encoding="utf-8"
    )
    return python


def sysconfig_paths() -> list[str]:
    import sysconfig

    return sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})


def revision_fields(path: Path) -> dict[str, object]:
    """The module-level ``revision``/``down_revision``/``branch_labels`` of a revision file."""
    fields: dict[str, object] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    fields[target.id] = ast.literal_eval(node.value)
    return fields


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_documented_alembic_recipe_from_the_installed_wheel(
    tmp_path: Path, wheel: Path, empty_database_url: str, empty_engine: Engine
) -> None:
    python = venv_with_the_wheel(tmp_path / "venv", wheel)
    app = tmp_path / "app"
    app.mkdir()

    def run(*args: str) -> str:
        result = subprocess.run(
            [str(python), *args],
            cwd=app,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"{args}:\n{result.stdout}{result.stderr}"
        return result.stdout + result.stderr

    # The package really is the wheel's, installed in the new environment.
    installed = Path(run("-c", "import sqlalchemy_que; print(sqlalchemy_que.__file__)").strip())
    assert installed.parent.parent == Path(
        run("-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    )
    ours = installed.parent / "_migrations" / "versions"
    shipped = sorted(path.name for path in ours.glob("*.py"))

    # An application as `alembic init` makes it, then set up as docs/alembic.md says.
    run("-m", "alembic", "init", "migrations")
    ini = fenced_block(DOCS_ALEMBIC, "ini", "[alembic]")
    url = empty_database_url.replace("%", "%%")
    ini = re.sub(r"^sqlalchemy\.url = .*$", f"sqlalchemy.url = {url}", ini, flags=re.MULTILINE)
    generated = (app / "alembic.ini").read_text(encoding="utf-8")
    logging_sections = generated[generated.index("[post_write_hooks]") :]
    (app / "alembic.ini").write_text(ini + "\n" + logging_sections, encoding="utf-8")
    env_py = fenced_block(DOCS_ALEMBIC, "py", "# migrations/env.py")
    (app / "migrations" / "env.py").write_text(env_py, encoding="utf-8")
    (app / "myapp").mkdir()
    (app / "myapp" / "__init__.py").write_text("", encoding="utf-8")
    (app / "myapp" / "models.py").write_text(APP_MODELS, encoding="utf-8")
    versions = app / "migrations" / "versions"

    # Our revisions are found, through the package resource.
    assert f"{head_revision()} (que) (head)" in run("-m", "alembic", "heads")
    run("-m", "alembic", "upgrade", "heads")
    with empty_engine.connect() as connection:
        assert read_shape(connection) == EXPECTED_V3
        assert recorded_revisions(connection, "alembic_version") == [head_revision()]
        assert not table_exists(connection, VERSION_TABLE)

    # The application's first revision: its own base, in its own folder.
    run("-m", "alembic", "revision", "--autogenerate", "-m", "users")
    (users,) = versions.glob("*.py")
    text_of_users = users.read_text(encoding="utf-8")
    assert "op.create_table('users'" in text_of_users
    assert "que_jobs" not in text_of_users
    assert revision_fields(users)["down_revision"] is None
    assert sorted(path.name for path in ours.glob("*.py")) == shipped
    run("-m", "alembic", "upgrade", "heads")

    # The next ones go on the application's own head, in its own folder.
    with (app / "myapp" / "models.py").open("a", encoding="utf-8") as models:
        models.write(APP_MODELS_ORDERS)
    run("-m", "alembic", "revision", "--autogenerate", "-m", "orders")
    run("-m", "alembic", "upgrade", "heads")
    run("-m", "alembic", "revision", "-m", "by hand")  # no autogenerate: the hook runs too
    revisions = {revision_fields(path)["revision"]: path for path in versions.glob("*.py")}
    assert len(revisions) == 3
    by_parent = {revision_fields(path)["down_revision"]: rid for rid, path in revisions.items()}
    orders = by_parent[revision_fields(users)["revision"]]
    by_hand = by_parent[orders]
    assert "op.create_table('orders'" in revisions[orders].read_text(encoding="utf-8")
    assert sorted(path.name for path in ours.glob("*.py")) == shipped

    run("-m", "alembic", "upgrade", "heads")
    with empty_engine.connect() as connection:
        assert {"users", "orders"} <= set(
            connection.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
        )
        assert recorded_revisions(connection, "alembic_version") == sorted(
            [str(by_hand), head_revision()]
        )

    # Ours alone come off, and go back on.
    run("-m", "alembic", "downgrade", "que@base")
    with empty_engine.connect() as connection:
        assert not table_exists(connection, "que_jobs")
        assert table_exists(connection, "orders")
    run("-m", "alembic", "upgrade", "heads")
    with empty_engine.connect() as connection:
        assert read_shape(connection) == EXPECTED_V3
