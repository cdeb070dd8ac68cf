"""Alembic environment for applying sqlalchemy-que's revisions on their own.

Used by :func:`sqlalchemy_que.migrate` and ``sqlalchemy-que migrate``. An application that
includes our revisions in its own Alembic environment (``version_locations``) uses its own
``env.py`` instead and never runs this one.
"""

from __future__ import annotations

from alembic import context

config = context.config
version_table = config.get_main_option("version_table") or "sqlalchemy_que_version"

if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or "postgresql://",
        literal_binds=True,
        version_table=version_table,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes["connection"]
    context.configure(connection=connection, version_table=version_table)
    with context.begin_transaction():
        context.run_migrations()
