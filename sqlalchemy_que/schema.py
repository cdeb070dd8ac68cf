"""Creating, adopting and checking the ``que_jobs`` table with Alembic.

The library ships its Alembic revisions (branch label ``que``) inside the package. Apply them
on their own, with a version table of their own (``sqlalchemy_que_version``) that never meets
the application's::

    import sqlalchemy_que
    sqlalchemy_que.migrate(engine)

or from the command line: ``sqlalchemy-que migrate --database-url URL`` (``--sql`` prints the
SQL instead). An application's own Alembic autogenerate must then leave our tables alone: pass
:func:`include_object` to ``context.configure`` in its ``env.py`` (the Flask extension does this
for Flask-Migrate by itself).

An application may instead include our revisions in its own Alembic environment, naming them
as a package resource in its ``alembic.ini`` (so that no site-packages path is written down)::

    [alembic]
    script_location = %(here)s/migrations
    path_separator = newline
    revision_environment = true
    version_locations =
        %(here)s/migrations/versions
        sqlalchemy_que:_migrations/versions

with ``process_revision_directives=`` :func:`process_revision_directives` in its ``env.py``, so
that its new revisions go on its own branch and into its own folder, and runs
``alembic upgrade heads``. A ``que_jobs`` table that Ruby Que or que-go already made at schema
version 3 is adopted as it is; a Que 1.x/2.x table is refused.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import coerce_resource_to_filename
from sqlalchemy import Connection, Engine, Table, text

from ._errors import SchemaError, UnsupportedSchemaError
from ._model import FAILED_TABLE_NAME, RUNS_TABLE_NAME, SCHEMA_VERSION, TABLE_NAME
from ._tables import SCHEDULE_TICKS, UNIQUE_KEYS

if TYPE_CHECKING:
    from alembic.operations.ops import MigrationScript
    from sqlalchemy.schema import SchemaItem

__all__ = [
    "VERSION_TABLE",
    "check_schema",
    "include_object",
    "migrate",
    "migrate_sql",
    "migrations_path",
    "process_revision_directives",
    "schema_version",
    "version_location",
]

#: The version table of the standalone migrations, apart from the application's own.
VERSION_TABLE = "sqlalchemy_que_version"

#: The sequence of ``que_jobs.job_id``. The name is part of Que's schema: Que 1.x's upgrade
#: renames the sequence by this name.
_SEQUENCE_NAME = "que_jobs_job_id_seq"

# What an application's autogenerate must neither drop nor create.
_OUR_TABLES = frozenset(
    {TABLE_NAME, VERSION_TABLE, FAILED_TABLE_NAME, RUNS_TABLE_NAME, UNIQUE_KEYS, SCHEDULE_TICKS}
)

# Serialises concurrent standalone migrations (two workers starting at once). The two-int form
# keeps it out of the one-bigint key space that job locks use.
_MIGRATION_LOCK = text("SELECT pg_advisory_xact_lock(20837, 1)")

_READ_VERSION = text(
    "SELECT obj_description(c.oid, 'pg_class') FROM pg_class AS c WHERE c.oid = to_regclass(:table)"
)


def migrations_path() -> Path:
    """The folder of the shipped Alembic environment (its ``env.py`` and ``versions/``).

    In an installed wheel it sits inside the package; in a source checkout it is the
    repository's top-level ``migrations/`` folder.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError(  # pragma: no cover - a broken installation
        f"sqlalchemy-que's migrations are missing from {here}; reinstall the package"
    )


def version_location() -> str:
    """The absolute path of our revisions: the folder that an application's Alembic
    ``version_locations`` names as ``sqlalchemy_que:_migrations/versions`` (in an installed
    wheel)."""
    return str(migrations_path() / "versions")


def _config(*, output: TextIO | None = None) -> Config:
    config = Config(output_buffer=output) if output is not None else Config()
    config.set_main_option("script_location", str(migrations_path()))
    config.set_main_option("version_table", VERSION_TABLE)
    return config


def migrate(bind: Engine | Connection, *, revision: str = "heads") -> None:
    """Bring the database's ``que_jobs`` table up to ``revision`` (default: the newest).

    Creates the table, or adopts one that Ruby Que or que-go made at version 3, and records
    the revision in ``sqlalchemy_que_version``. Given an Engine it commits its own
    transaction; given a Connection it runs in the caller's transaction and does not commit.

    :raises UnsupportedSchemaError: when ``que_jobs`` is a Que 1.x/2.x table.
    :raises SchemaError: when ``que_jobs`` is something else this library cannot adopt.
    """
    _run_standalone(bind, command.upgrade, revision)


def downgrade(bind: Engine | Connection, *, revision: str = "base") -> None:
    """Step the standalone migrations back down to ``revision`` (default: remove everything).

    Refuses to drop ``que_jobs`` while it holds jobs.
    """
    _run_standalone(bind, command.downgrade, revision)


def _run_standalone(
    bind: Engine | Connection, action: Callable[[Config, str], None], revision: str
) -> None:
    """Run an Alembic command on our own environment, in the caller's transaction (a
    Connection) or in one of its own (an Engine), serialised with other migrations."""
    if isinstance(bind, Engine):
        with bind.begin() as connection:
            _run_standalone(connection, action, revision)
        return
    bind.execute(_MIGRATION_LOCK)
    config = _config()
    config.attributes["connection"] = bind
    action(config, revision)


def migrate_sql(*, revision: str = "heads") -> str:
    """The SQL that :func:`migrate` would run on an empty database, for offline review."""
    output = io.StringIO()
    command.upgrade(_config(output=output), revision, sql=True)
    return output.getvalue()


def schema_version(bind: Connection) -> int:
    """The Que schema version of ``que_jobs`` as Que reads it: 0 when there is no table, 1
    for a table without a comment, else the number in the comment.

    :raises SchemaError: when the comment is not a number.
    """
    row = bind.execute(_READ_VERSION, {"table": TABLE_NAME}).first()
    if row is None:
        return 0
    comment = row[0]
    if comment is None:
        return 1
    try:
        return int(comment)
    except ValueError:
        raise SchemaError(
            f"{TABLE_NAME} has the table comment {comment!r}, which is not a Que schema version"
        ) from None


def _head_revisions() -> set[str]:
    return set(ScriptDirectory.from_config(_config()).get_heads())


# The sequence that job_id owns (as a serial column does), by its name and whether it lives
# in the table's schema: what pg_get_serial_sequence finds, without its error for a table
# that has no job_id column.
_READ_JOB_ID_SEQUENCE = text(
    """
    SELECT s.relname, s.relnamespace = t.relnamespace AS same_schema
    FROM pg_class AS t
    JOIN pg_attribute AS a ON a.attrelid = t.oid AND a.attname = 'job_id'
    JOIN pg_depend AS d
        ON d.refclassid = 'pg_class'::regclass AND d.refobjid = t.oid
        AND d.refobjsubid = a.attnum AND d.classid = 'pg_class'::regclass
        AND d.deptype IN ('a', 'i')
    JOIN pg_class AS s ON s.oid = d.objid AND s.relkind = 'S'
    WHERE t.oid = to_regclass(:table)
    """
)


def _check_sequence(bind: Connection) -> None:
    row = bind.execute(_READ_JOB_ID_SEQUENCE, {"table": TABLE_NAME}).first()
    if row is None:
        raise SchemaError(
            f"{TABLE_NAME}.job_id has no sequence of its own; Que's schema gives it the "
            f"sequence {_SEQUENCE_NAME} (a bigserial column). This table was not made by Que's "
            "or sqlalchemy-que's migrations"
        )
    if row.relname != _SEQUENCE_NAME or not row.same_schema:
        raise SchemaError(
            f"{TABLE_NAME}.job_id draws from the sequence {row.relname!r}, not "
            f"{_SEQUENCE_NAME!r} in the table's schema, the name Que's schema gives it (Que "
            f"1.x's upgrade renames it by that name). Rename it: ALTER SEQUENCE {row.relname} "
            f"RENAME TO {_SEQUENCE_NAME} (after dropping or renaming what holds that name now)"
        )


def check_schema(bind: Connection) -> None:
    """Raise unless ``que_jobs`` is a Que 0.x version 3 table that workers can use.

    When the standalone version table exists it must be at the newest revision too.

    :raises UnsupportedSchemaError: for a Que 1.x/2.x table.
    :raises SchemaError: for a missing table or one at an older version, with the command
        that fixes it; for a ``job_id`` whose sequence is not named ``que_jobs_job_id_seq``.
    """
    version = schema_version(bind)
    fix = "run `sqlalchemy-que migrate` (or sqlalchemy_que.migrate(engine))"
    if version == 0:
        raise SchemaError(f"there is no {TABLE_NAME} table in this database; {fix}")
    if 4 <= version <= 7:
        raise UnsupportedSchemaError(
            f"{TABLE_NAME} is at Que schema version {version} (Que 1.x/2.x); sqlalchemy-que "
            f"works Que 0.x tables (version {SCHEMA_VERSION}) only",
            version=version,
        )
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{TABLE_NAME} is at Que schema version {version}, not {SCHEMA_VERSION}; {fix}"
        )
    _check_sequence(bind)
    context = MigrationContext.configure(bind, opts={"version_table": VERSION_TABLE})
    current = set(context.get_current_heads())
    if current and current != _head_revisions():
        raise SchemaError(
            f"the sqlalchemy-que migrations are at {sorted(current)}, not at the newest "
            f"{sorted(_head_revisions())}; {fix}"
        )


def include_object(
    object_: SchemaItem,
    name: str | None,
    type_: str,
    reflected: bool,
    compare_to: SchemaItem | None,
) -> bool:
    """An ``include_object`` filter for an application's Alembic autogenerate: False for
    sqlalchemy-que's tables (``que_jobs``, ``que_failed_jobs``, ``que_job_runs``,
    ``sqlalchemy_que_unique_keys``, ``sqlalchemy_que_schedule_ticks``,
    ``sqlalchemy_que_version``) and everything on them, True for the rest.

    With it, autogenerate neither drops our tables (they are not in the application's
    metadata) nor creates them (when ``sqlalchemy_que.metadata`` is in ``target_metadata``):
    our migrations own them. In ``env.py``::

        context.configure(connection=connection, target_metadata=target_metadata,
                          include_object=sqlalchemy_que.schema.include_object)

    To combine it with a filter of the application's own, call both::

        def include_object(object_, name, type_, reflected, compare_to):
            return sqlalchemy_que.schema.include_object(
                object_, name, type_, reflected, compare_to
            ) and my_filter(object_, name, type_, reflected, compare_to)

    :class:`sqlalchemy_que.flask.Que` sets it on Flask-Migrate by itself.
    """
    if type_ == "table":
        return name not in _OUR_TABLES
    table = getattr(object_, "table", None)  # a column, an index or a constraint
    return not (isinstance(table, Table) and table.name in _OUR_TABLES)


def process_revision_directives(
    context: MigrationContext, revision: object, directives: list[MigrationScript]
) -> None:
    """A ``process_revision_directives`` hook for an application that includes our revisions
    in its own Alembic environment: its new revisions go on its own branch and into its own
    versions folder, never onto ours.

    Without it, ``alembic revision`` bases a new revision on the only head there is (ours,
    before the application has a revision of its own), stacks it on our branch and writes it
    into our folder inside the installed package; once the application has a revision of its
    own, it asks for ``--head``. With it, a revision made without ``--head`` is based on the
    application's own head, or starts a branch of its own at ``base`` in the first of the
    application's ``version_locations`` that is not ours. A ``--head`` given on the command
    line is kept, and so are several application heads (Alembic then asks for one, or a
    merge). Set ``revision_environment = true`` in ``alembic.ini`` so that ``alembic
    revision`` without ``--autogenerate`` runs it too. In ``env.py``::

        context.configure(...,
                          process_revision_directives=sqlalchemy_que.schema.process_revision_directives)

    An application with a hook of its own calls this one from it first.

    :raises SchemaError: when a revision would start at ``base`` and every version location
        is ours (the application's own folder is missing from ``version_locations``).
    """
    script = context.script
    if script is None:  # pragma: no cover - Alembic always passes its ScriptDirectory
        return
    ours = {rev.revision for rev in ScriptDirectory.from_config(_config()).walk_revisions()}
    if not ours & {rev.revision for rev in script.walk_revisions()}:
        return  # our revisions are not part of this environment: nothing to keep apart
    app_heads = [head for head in script.get_heads() if head not in ours]
    for directive in directives:
        if directive.head in (None, "head"):  # no --head was given
            if len(app_heads) == 1:
                directive.head = app_heads[0]
            elif not app_heads:
                directive.head = "base"
        if directive.head == "base" and directive.version_path is None:
            directive.version_path = _application_version_location(script)


def _application_version_location(script: ScriptDirectory) -> str:
    """The first of the environment's version locations that is not our own."""
    ours = Path(version_location()).resolve()
    for location in script.version_locations:
        path = Path(coerce_resource_to_filename(str(location))).resolve()
        if path != ours:
            return str(path)
    raise SchemaError(
        f"the Alembic environment {script.dir} has no versions folder of its own beside "
        f"sqlalchemy-que's ({ours}): list the application's own first in version_locations, "
        "so that its revisions are not written into the installed package"
    )
