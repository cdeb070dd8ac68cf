"""The FastAPI example of ``docs/examples/fastapi_app.py``, driven through httpx's ASGI
transport with the app's lifespan: a request's user and job commit together or not at all, and
the async worker's handler writes through ``job.session`` (an AsyncSession)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
from fastapi import FastAPI
from sqlalchemy import Engine, text

from docs.examples.fastapi_app import Base, create_app

from .helpers import job_rows


def serve(app: FastAPI, requests: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    """Run ``requests`` against ``app`` inside its lifespan (startup and shutdown)."""

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                await requests(client)

    asyncio.run(main())


def test_a_signup_commits_the_user_and_the_job_which_the_worker_completes(
    database_url: str, engine: Engine
) -> None:
    async def requests(client: httpx.AsyncClient) -> None:
        response = await client.post("/signups", params={"email": "ada@example.com"})
        assert response.status_code == 200
        user_id = response.json()["user_id"]
        deadline = time.monotonic() + 10
        while not (await client.get(f"/users/{user_id}")).json()["welcomed"]:
            assert time.monotonic() < deadline, "the worker did not mark the user welcomed"
            await asyncio.sleep(0.02)  # polling a condition, with a deadline

    try:
        serve(create_app(database_url), requests)
        assert job_rows(engine) == []  # deleted in the transaction that welcomed the user
    finally:
        Base.metadata.drop_all(engine)


def test_a_rolled_back_request_leaves_neither_user_nor_job(
    database_url: str, engine: Engine
) -> None:
    async def requests(client: httpx.AsyncClient) -> None:
        response = await client.post("/signups", params={"email": "bob@example.com", "fail": 1})
        assert response.status_code == 400
        assert job_rows(engine) == []
        with engine.connect() as connection:
            users = connection.execute(text("SELECT count(*) FROM fastapi_example_users"))
            assert users.scalar_one() == 0
        ok = await client.post("/signups", params={"email": "eve@example.com"})
        assert ok.status_code == 200
        assert [row["job_class"] for row in job_rows(engine)] == ["SendWelcome"]

    try:
        serve(create_app(database_url, concurrency=0), requests)
    finally:
        Base.metadata.drop_all(engine)
