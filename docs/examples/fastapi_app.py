"""A FastAPI app on an AsyncEngine that enqueues a job in the request's own transaction.

``POST /signups`` creates a user and enqueues ``SendWelcome`` in one ``AsyncSession``
transaction: both commit, or neither (``?fail=1`` rolls the request back after the enqueue).
The job is worked by a :class:`~sqlalchemy_que.WorkerPool` started in the app's lifespan on
a sync engine of the same database; its handler marks the user welcomed through
``job.session``, in the transaction that also deletes the job.

Run it with ``DATABASE_URL=postgresql+psycopg://... uvicorn docs.examples.fastapi_app:app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, HTTPException
from sqlalchemy import Engine, String, create_engine, make_url
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_que import JobContext, JobRegistry, WorkerPool

jobs = JobRegistry()


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "fastapi_example_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200))
    welcomed: Mapped[bool] = mapped_column(default=False)


@jobs.job("SendWelcome", queue="mail")
def send_welcome(job: JobContext, user_id: int) -> None:
    user = job.session.get(User, user_id)
    if user is None:  # deleted meanwhile: nothing to send
        return
    user.welcomed = True  # committed with the job's completion


def create_app(database_url: str, *, workers: int = 2) -> FastAPI:
    """The app on ``database_url`` (a ``postgresql+psycopg://`` URL), with a worker pool of
    ``workers`` threads in its lifespan (0: no pool)."""
    url = make_url(database_url).set(drivername="postgresql+psycopg")
    async_engine = create_async_engine(url)
    sessions = async_sessionmaker(async_engine, expire_on_commit=False)
    sync_engine: Engine = create_engine(url)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        Base.metadata.create_all(sync_engine)
        pool = None
        if workers:
            pool = WorkerPool(sync_engine, jobs, queue="mail", workers=workers, wake_interval=0.5)
            await asyncio.to_thread(pool.start)  # off the loop: it connects and checks
        try:
            yield
        finally:
            if pool is not None:
                await asyncio.to_thread(pool.shutdown, timeout=30)  # lets running jobs end
            await async_engine.dispose()
            sync_engine.dispose()

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
