"""The running job as an ``async def`` handler sees it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from ._errors import QueError
from ._jobs import JobContext

__all__ = ["AsyncJobContext"]


class AsyncJobContext(JobContext):
    """What an ``async def`` handler receives first: a :class:`~sqlalchemy_que.JobContext`
    whose :attr:`connection` is the worker's ``AsyncConnection`` and whose :attr:`session` is
    an ``AsyncSession``, both inside the job's transaction (which commits with the job's
    completion, or rolls back with its failure)::

        @job("SendWelcome")
        async def send_welcome(job: AsyncJobContext, user_id: int) -> None:
            user = await job.session.get(User, user_id)
            user.welcomed = True  # committed with the job's completion
    """

    __slots__ = ("_async_connection", "_async_session", "_open_async_connection")

    def __init__(
        self,
        *,
        connection: AsyncConnection | None = None,
        open_connection: Callable[[], AsyncConnection] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(**fields)
        self._async_connection = connection
        self._open_async_connection = open_connection
        self._async_session: AsyncSession | None = None

    @property
    def connection(self) -> AsyncConnection:  # type: ignore[override]
        """The worker's locked ``AsyncConnection``, inside the job's transaction (which the
        server opens at the handler's first statement)."""
        if self._async_connection is None:
            if self._open_async_connection is None:
                raise QueError("this AsyncJobContext was made without a connection")
            self._async_connection = self._open_async_connection()
        return self._async_connection

    @property
    def touched_database(self) -> bool:
        """True once the handler has asked for :attr:`connection` or :attr:`session`."""
        return self._async_connection is not None and self._open_async_connection is not None

    @property
    def session(self) -> AsyncSession:  # type: ignore[override]
        """An ``AsyncSession`` in a savepoint of the job's transaction: its ``commit()``
        keeps the changes for the job's commit, its ``rollback()`` undoes only them."""
        if self._async_session is None:
            self._async_session = AsyncSession(
                bind=self.connection, join_transaction_mode="create_savepoint"
            )
        return self._async_session

    async def _finish_async_session(self, *, keep: bool) -> None:
        """Flush and release (``keep``) or drop the session's savepoint, then close it."""
        session, self._async_session = self._async_session, None
        if session is not None:
            try:
                if keep:
                    await session.commit()
            finally:
                await session.close()
