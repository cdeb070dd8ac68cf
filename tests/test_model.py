"""The ``que_jobs`` table our migration creates, read back from PostgreSQL's catalogs and
compared with the Que 0.x contract (section 1), and the model compared with that table through
Alembic's autogenerate.

:func:`read_shape` and :data:`EXPECTED_V3` are also used by ``test_migrations`` to check that
every route to the table (fresh, adopted from Ruby, offline SQL) ends at the same shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, MetaData, Table, Text, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_que
from sqlalchemy_que import QueJob
from sqlalchemy_que.schema import VERSION_TABLE

# ---------------------------------------------------------------------------------------------
# Reading the table's shape from the catalogs


@dataclasses.dataclass(frozen=True)
class TableShape:
    """Everything about ``que_jobs`` that the contract fixes, as PostgreSQL reports it."""

    #: (attnum, name, format_type, NOT NULL, default expression), in physical order.
    columns: list[tuple[int, str, str, bool, str | None]]
    #: (name, contype, definition) of every constraint on the table but NOT NULL (in columns).
    constraints: list[tuple[str, str, str]]
    #: pg_get_indexdef of every index on the table.
    indexes: list[str]
    #: The table comment: Que's schema version.
    comment: str | None
    #: (relkind, relpersistence): an ordinary, logged table.
    kind: tuple[str, str]
    #: The sequence owned by job_id, as pg_get_serial_sequence names it.
    job_id_sequence: str | None
    #: Number of triggers (internal ones included).
    triggers: int


EXPECTED_COLUMNS: list[tuple[int, str, str, bool, str | None]] = [
    (1, "priority", "smallint", True, "100"),
    (2, "run_at", "timestamp with time zone", True, "now()"),
    (3, "job_id", "bigint", True, "nextval('que_jobs_job_id_seq'::regclass)"),
    (4, "job_class", "text", True, None),
    (5, "args", "json", True, "'[]'::json"),
    (6, "error_count", "integer", True, "0"),
    (7, "last_error", "text", False, None),
    (8, "queue", "text", True, "''::text"),
]

EXPECTED_V3 = TableShape(
    columns=EXPECTED_COLUMNS,
    constraints=[("que_jobs_pkey", "p", "PRIMARY KEY (queue, priority, run_at, job_id)")],
    indexes=[
        "CREATE UNIQUE INDEX que_jobs_pkey ON public.que_jobs "
        "USING btree (queue, priority, run_at, job_id)"
    ],
    comment="3",
    kind=("r", "p"),
    job_id_sequence="public.que_jobs_job_id_seq",
    triggers=0,
)

_COLUMNS = text(
    """
    SELECT a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
           pg_get_expr(d.adbin, d.adrelid)
    FROM pg_attribute AS a
    LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = 'que_jobs'::regclass AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attnum
    """
)
# NOT NULL is read from pg_attribute: PostgreSQL 18 also lists it in pg_constraint (contype
# 'n'), where 15 does not.
_CONSTRAINTS = text(
    "SELECT conname, contype::text, pg_get_constraintdef(oid) FROM pg_constraint "
    "WHERE conrelid = 'que_jobs'::regclass AND contype <> 'n' ORDER BY conname"
)
_INDEXES = text(
    "SELECT pg_get_indexdef(indexrelid) FROM pg_index "
    "WHERE indrelid = 'que_jobs'::regclass ORDER BY indexrelid"
)
_TABLE = text(
    "SELECT obj_description(oid, 'pg_class'), relkind::text, relpersistence::text "
    "FROM pg_class WHERE oid = 'que_jobs'::regclass"
)
_SERIAL = text("SELECT pg_get_serial_sequence('que_jobs', 'job_id')")
_TRIGGERS = text("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'que_jobs'::regclass")


def read_shape(connection: Connection) -> TableShape:
    """Read the contract-relevant shape of ``que_jobs`` from the catalogs."""
    columns = [
        (int(num), str(name), str(type_), bool(notnull), default)
        for num, name, type_, notnull, default in connection.execute(_COLUMNS)
    ]
    constraints = [
        (str(name), str(kind), str(definition))
        for name, kind, definition in connection.execute(_CONSTRAINTS)
    ]
    indexes = [str(definition) for (definition,) in connection.execute(_INDEXES)]
    comment, relkind, persistence = connection.execute(_TABLE).one()
    return TableShape(
        columns=columns,
        constraints=constraints,
        indexes=indexes,
        comment=comment,
        kind=(relkind, persistence),
        job_id_sequence=connection.execute(_SERIAL).scalar_one(),
        triggers=int(connection.execute(_TRIGGERS).scalar_one()),
    )


def table_exists(connection: Connection, name: str) -> bool:
    return connection.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar() is not None


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def migrated(empty_database_url: str) -> Iterator[Engine]:
    """A new database on which only :func:`sqlalchemy_que.migrate` has run."""
    engine = create_engine(empty_database_url)
    sqlalchemy_que.migrate(engine)
    yield engine
    engine.dispose()


# ---------------------------------------------------------------------------------------------
# The migrated table against the contract


def test_columns_in_physical_order_with_types_defaults_and_nullability(migrated: Engine) -> None:
    with migrated.connect() as connection:
        columns = read_shape(connection).columns
        # json, not jsonb: json keeps the exact text that was enqueued.
        args_type = connection.execute(
            text(
                "SELECT atttypid::regtype::text FROM pg_attribute "
                "WHERE attrelid = 'que_jobs'::regclass AND attname = 'args'"
            )
        ).scalar_one()
    assert columns == EXPECTED_COLUMNS
    assert [num for num, *_ in columns] == list(range(1, 9))  # no dropped columns in between
    assert args_type == "json"


def test_select_star_returns_the_columns_in_contract_order(migrated: Engine) -> None:
    with migrated.begin() as connection:
        connection.execute(text("INSERT INTO que_jobs (job_class) VALUES ('Ruby::Job')"))
        result = connection.execute(text("SELECT * FROM que_jobs"))
        names = list(result.keys())
        (row,) = result.all()
    assert names == [
        "priority",
        "run_at",
        "job_id",
        "job_class",
        "args",
        "error_count",
        "last_error",
        "queue",
    ]
    assert (row.priority, row.job_id, row.args, row.error_count, row.last_error, row.queue) == (
        100,
        1,
        [],
        0,
        None,
        "",
    )


def test_primary_key_is_que_jobs_pkey_and_the_only_index(migrated: Engine) -> None:
    with migrated.connect() as connection:
        shape = read_shape(connection)
        primary = connection.execute(
            text(
                "SELECT i.indisprimary, i.indisunique, c.relname FROM pg_index AS i "
                "JOIN pg_class AS c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = 'que_jobs'::regclass"
            )
        ).all()
    assert shape.constraints == [
        ("que_jobs_pkey", "p", "PRIMARY KEY (queue, priority, run_at, job_id)")
    ]
    assert [tuple(row) for row in primary] == [(True, True, "que_jobs_pkey")]
    assert shape.indexes == EXPECTED_V3.indexes


def test_table_comment_is_schema_version_3(migrated: Engine) -> None:
    with migrated.connect() as connection:
        assert read_shape(connection).comment == "3"
        assert sqlalchemy_que.schema.schema_version(connection) == 3
        sqlalchemy_que.check_schema(connection)  # accepted as it is


def test_job_id_sequence_is_named_and_owned_by_the_column(migrated: Engine) -> None:
    with migrated.connect() as connection:
        assert read_shape(connection).job_id_sequence == "public.que_jobs_job_id_seq"
        owner = connection.execute(
            text(
                "SELECT d.refobjid::regclass::text, a.attname, d.deptype::text "
                "FROM pg_depend AS d JOIN pg_attribute AS a "
                "  ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid "
                "WHERE d.classid = 'pg_class'::regclass "
                "  AND d.objid = 'que_jobs_job_id_seq'::regclass "
                "  AND d.refclassid = 'pg_class'::regclass"
            )
        ).one()
        sequence = connection.execute(
            text(
                "SELECT data_type::text, start_value, increment_by, cycle FROM pg_sequences "
                "WHERE sequencename = 'que_jobs_job_id_seq'"
            )
        ).one()
        all_sequences = (
            connection.execute(
                text("SELECT relname FROM pg_class WHERE relkind = 'S' ORDER BY relname")
            )
            .scalars()
            .all()
        )
    assert tuple(owner) == ("que_jobs", "job_id", "a")  # OWNED BY que_jobs.job_id, as serial
    assert tuple(sequence) == ("bigint", 1, 1, False)
    assert all_sequences == ["que_jobs_job_id_seq"]


def test_no_triggers_rules_or_extra_objects_on_the_table(migrated: Engine) -> None:
    with migrated.connect() as connection:
        shape = read_shape(connection)
        rules = connection.execute(
            text("SELECT count(*) FROM pg_rewrite WHERE ev_class = 'que_jobs'::regclass")
        ).scalar_one()
    assert shape.triggers == 0
    assert rules == 0
    assert shape.kind == ("r", "p")  # an ordinary logged table, not partitioned or unlogged


def test_the_whole_shape_matches(migrated: Engine) -> None:
    with migrated.connect() as connection:
        assert read_shape(connection) == EXPECTED_V3


# ---------------------------------------------------------------------------------------------
# The model


def test_model_declares_the_contract_table() -> None:
    table = QueJob.__table__
    assert isinstance(table, Table)
    assert table.metadata is sqlalchemy_que.metadata
    # que_jobs, and the library's own tables beside it (never the contract's).
    assert sorted(sqlalchemy_que.metadata.tables) == [
        "que_failed_jobs",
        "que_job_runs",
        "que_jobs",
        "sqlalchemy_que_schedule_ticks",
        "sqlalchemy_que_unique_keys",
    ]
    assert [column.name for column in table.columns] == [name for _, name, *_ in EXPECTED_COLUMNS]
    assert table.primary_key.name == "que_jobs_pkey"
    assert [column.name for column in table.primary_key.columns] == [
        "queue",
        "priority",
        "run_at",
        "job_id",
    ]
    assert table.comment == "3"
    assert not table.indexes
    nullable = {column.name: column.nullable for column in table.columns}
    assert nullable == {name: not notnull for _, name, _, notnull, _ in EXPECTED_COLUMNS}


def _skip_our_version_table(name: str | None, type_: str, parent_names: Any) -> bool:
    return not (type_ == "table" and name == VERSION_TABLE)


def autogenerate_diffs(connection: Connection, target: MetaData | Sequence[MetaData]) -> list[Any]:
    """What ``alembic revision --autogenerate`` would propose, types and server defaults
    compared too, leaving out the standalone version table."""
    context = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "compare_server_default": True,
            "include_name": _skip_our_version_table,
            "target_metadata": target,
        },
    )
    # Alembic takes a sequence of MetaData here just as it does for target_metadata; only the
    # annotation says MetaData.
    return list(compare_metadata(context, target))  # type: ignore[arg-type]


def test_model_has_no_autogenerate_diff_against_the_migrated_table(migrated: Engine) -> None:
    with migrated.connect() as connection:
        assert autogenerate_diffs(connection, sqlalchemy_que.metadata) == []


@pytest.mark.parametrize(
    ("change", "diff_kind"),
    [
        ("COMMENT ON TABLE que_jobs IS '2'", "add_table_comment"),
        ("ALTER TABLE que_jobs ALTER COLUMN args TYPE jsonb", "modify_type"),
        ("ALTER TABLE que_jobs ALTER COLUMN queue DROP DEFAULT", "modify_default"),
        ("ALTER TABLE que_jobs ALTER COLUMN last_error SET NOT NULL", "modify_nullable"),
        ("ALTER TABLE que_jobs ALTER COLUMN priority TYPE integer", "modify_type"),
        ("CREATE INDEX que_jobs_extra ON que_jobs (job_class)", "remove_index"),
    ],
)
def test_autogenerate_comparison_notices_a_drifted_table(
    migrated: Engine, change: str, diff_kind: str
) -> None:
    """The no-diff test above could fail: a table off the contract shows up."""
    with migrated.connect() as connection, connection.begin() as transaction:
        connection.execute(text(change))
        diffs = autogenerate_diffs(connection, sqlalchemy_que.metadata)
        transaction.rollback()
    kinds = [diff[0][0] if isinstance(diff, list) else diff[0] for diff in diffs]
    assert kinds == [diff_kind]


class _AppBase(DeclarativeBase):
    pass


class _AppUser(_AppBase):
    __tablename__ = "app_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(Text)


def test_an_applications_autogenerate_keeps_que_jobs(migrated: Engine) -> None:
    with migrated.connect() as connection:
        both = autogenerate_diffs(connection, [_AppBase.metadata, sqlalchemy_que.metadata])
        app_only = autogenerate_diffs(connection, _AppBase.metadata)
    # With both metadatas, only the application's missing table is proposed.
    assert [(diff[0], diff[1].name) for diff in both] == [("add_table", "app_users")]
    # Without ours, autogenerate would drop our tables: listing both is what prevents it.
    assert sorted((diff[0], diff[1].name) for diff in app_only) == [
        ("add_table", "app_users"),
        ("remove_index", "que_failed_jobs_failed_at"),
        ("remove_table", "que_failed_jobs"),
        ("remove_table", "que_job_runs"),
        ("remove_table", "que_jobs"),
        ("remove_table", "sqlalchemy_que_schedule_ticks"),
        ("remove_table", "sqlalchemy_que_unique_keys"),
    ]
