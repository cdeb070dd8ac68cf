"""``db.session`` inside a Flask job handler: Flask-SQLAlchemy's routing, the job's transaction.

Flask-SQLAlchemy's Session picks an Engine for each model by its ``__bind_key__``
(``SQLALCHEMY_BINDS``). In a handler, :func:`job_session` makes a Session of ``db.session``'s
own class whose routing is kept, with one change: what it routes to the default bind (the
queue's database) goes to the job's connection, inside the job's transaction, so it commits
with the job's completion. Every other bind gets a connection of its own engine, with a
transaction that this module begins and ends: the Session works in savepoints of it (as it
does in the job's transaction), and it is committed when the job's writes are kept, right
before the worker commits the job's transaction, or rolled back when the job fails.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, cast

from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.session import Session as FlaskSession
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from ._jobs import JobContext

__all__ = ["job_session"]


class _JobSession(FlaskSession):
    """Flask-SQLAlchemy's routing, with the default bind on the job's connection."""

    _que_job: JobContext
    _que_queue_engine: Engine | None
    _que_binds: dict[Engine, Connection]

    def get_bind(
        self,
        mapper: Any | None = None,
        clause: Any | None = None,
        bind: Engine | Connection | None = None,
        **kwargs: Any,
    ) -> Engine | Connection:
        chosen = super().get_bind(mapper=mapper, clause=clause, bind=bind, **kwargs)
        if isinstance(chosen, Connection):
            return chosen  # given explicitly (bind_arguments={"bind": ...})
        if chosen is self._que_queue_engine:
            return self._que_job.connection
        connection = self._que_binds.get(chosen)
        if connection is None:
            # A transaction of ours, so that the Session works in savepoints of it as in the
            # job's: its commit() and rollback() mean the same on every bind.
            connection = chosen.connect()
            try:
                connection.begin()
            except BaseException:
                connection.close()
                raise
            if not self._que_binds:
                self._que_job._on_finish(self._que_finish_binds)
            self._que_binds[chosen] = connection
        return connection

    def _que_finish_binds(self, keep: bool) -> None:
        """Commit (``keep``) or roll back the other binds' transactions, in the order they
        were first used; after a failed commit, the rest are rolled back."""
        connections = list(self._que_binds.values())
        self._que_binds.clear()
        try:
            for connection in connections:
                transaction = connection.get_transaction()
                if keep and transaction is not None:
                    transaction.commit()
        finally:
            for connection in connections:
                with contextlib.suppress(Exception):
                    connection.close()  # rolls back what was not committed


#: One subclass of each ``db.session`` class (the sessionmaker's, which carries the events
#: that Flask-SQLAlchemy and the synchronous mode listen for).
_classes: weakref.WeakKeyDictionary[sessionmaker[Any], type[_JobSession]] = (
    weakref.WeakKeyDictionary()
)


def job_session(db: SQLAlchemy, job: JobContext) -> Session:
    """A Session of ``db.session``'s class for ``job``'s handler, also its ``job.session``.

    Call it in an application context of the app (Flask-SQLAlchemy's engines are the app's).
    The job's connection (and transaction) is opened only when the Session first needs the
    default bind.
    """
    factory = db.session.session_factory
    session_class = _classes.get(factory)
    if session_class is None:
        base = factory.class_
        if issubclass(base, _JobSession):
            session_class = base
        else:
            session_class = cast(
                type[_JobSession], type(f"Job{base.__name__}", (_JobSession, base), {})
            )
        _classes[factory] = session_class
    options = {**factory.kw, "join_transaction_mode": "create_savepoint"}
    options.pop("bind", None)  # routed by get_bind
    session = session_class(**options)
    session._que_job = job
    # The queue's database is the default bind: the engine of db.engine.
    session._que_queue_engine = db.engines.get(None)
    session._que_binds = {}
    job._session = session
    return session
