"""A FastAPI app on an AsyncEngine that enqueues a job in the request's own transaction.

``POST /signups`` creates a user and enqueues ``SendWelcome`` in one ``AsyncSession``
transaction: both commit, or neither (``?fail=1`` rolls the request back after the enqueue).
The job is worked by an :class:`~sqlalchemy_que.AsyncWorkerPool` started in the app's
lifespan, on the app's own event loop and AsyncEngine; its ``async def`` handler marks the
user welcomed through ``job.session`` (an ``AsyncSession``), in the transaction that also
deletes the job.

Run it with ``DATABASE_URL=postgresql+psycopg://... uvicorn docs.examples.fastapi_app:app``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, HTTPException
from sqlalchemy import String, make_url
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_que import AsyncJobContext, AsyncWorkerPool, JobRegistry

jobs = JobRegistry()


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "fastapi_example_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200))
    welcomed: Mapped[bool] = mapped_column(default=False)


@jobs.job("SendWelcome", queue="mail")
async def send_welcome(job: AsyncJobContext, user_id: int) -> None:
    user = await job.session.get(User, user_id)
    if user is None:  # deleted meanwhile: nothing to send
        return
    user.welcomed = True  # committed with the job's completion


def create_app(database_url: str, *, concurrency: int = 4) -> FastAPI:
    """The app on ``database_url`` (a ``postgresql+psycopg://`` URL), with an async worker
    pool running up to ``concurrency`` jobs at once in its lifespan (0: no pool)."""
    url = make_url(database_url).set(drivername="postgresql+psycopg")
    async_engine = create_async_engine(url, pool_size=concurrency + 5)
    sessions = async_sessionmaker(async_engine, expire_on_commit=False)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with async_engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        try:
            if not concurrency:
                yield
                return
            # Jobs run as tasks on this loop; leaving the block lets running jobs finish
            # for up to 30 s, then cancels them (rolled back and released, rows intact).
            async with AsyncWorkerPool(
                async_engine,
                jobs,
                queue="mail",
                concurrency=concurrency,
                wake_interval=0.5,
                shutdown_timeout=30,
            ):
                yield
        finally:
            await async_engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/signups")
    async def sign_up(email: str, fail: bool = False) -> dict[str, int]:
        async with sessions() as session, session.begin():
            user = User(email=email)
            session.add(user)
            await session.flush()
            session.add(send_welcome.enqueue(user.id))  # a QueJob, inserted with the user
            if fail:  # leaving the block with an error rolls back the user and the job
                raise HTTPException(status_code=400, detail="refused")
        return {"user_id": user.id}

    @app.get("/users/{user_id}")
    async def show_user(user_id: int) -> dict[str, object]:
        async with sessions() as session:
            user = await session.get(User, user_id)
            if user is None:
                raise HTTPException(status_code=404)
            return {"email": user.email, "welcomed": user.welcomed}

    return app


def app_from_environment(getenv: Callable[[str], str | None] = os.environ.get) -> FastAPI:
    url = getenv("DATABASE_URL")
    if not url:
        raise SystemExit("set DATABASE_URL to a postgresql+psycopg:// URL")
    return create_app(url)
