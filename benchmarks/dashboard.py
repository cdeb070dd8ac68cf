"""The dashboard on a big table: each endpoint's time with 1,000,000 jobs, and the screenshots.

::

    python -m benchmarks.dashboard                        # 1,000,000 jobs, a table of timings
    python -m benchmarks.dashboard --rows 100000 --database-url postgresql://localhost/x
    python -m benchmarks.dashboard --screenshots docs     # docs/dashboard-*.png from real data

The jobs are COPYed with :func:`sqlalchemy_que.insert_many`: 70% ready in queue ``mail``,
20% scheduled an hour ahead in ``search``, 10% ready in the default queue, and 1,000 jobs
failed for good by a worker. Four jobs are held by a session (as four busy workers would hold
them), so the worker states read que_jobs. Then ``VACUUM ANALYZE``, as autovacuum leaves a big
table, and each endpoint is requested through Flask's test client (the worker states are read
afresh each time: no cache). The screenshots come from a live run: a pool working jobs that
take a while, a producer enqueueing, failures with real tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Engine, create_engine, text

import sqlalchemy_que
from sqlalchemy_que import FailJob, JobContext, Worker, WorkerPool, insert_many
from sqlalchemy_que._cli import normalise_database_url
from sqlalchemy_que.dashboard import create_app
from sqlalchemy_que.testing import temporary_postgres

FAILED = 1_000
LOCKED = 4


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[Engine]:
    with contextlib.ExitStack() as stack:
        if url is None:
            url = stack.enter_context(temporary_postgres())
        engine = create_engine(normalise_database_url(url), pool_size=10)
        stack.callback(engine.dispose)
        sqlalchemy_que.migrate(engine)
        yield engine


def _fail(engine: Engine, queue: str, count: int, message: str) -> None:
    with engine.begin() as connection:
        insert_many(
            connection, "ChargeCard", ([n, {"amount": n * 100}] for n in range(count)), queue=queue
        )

    def charge(job: JobContext, order: int, details: dict[str, int]) -> None:
        raise FailJob(f"{message} (order {order})")

    Worker(engine, {"ChargeCard": charge}, queue=queue).run(burst=True)


def fill(engine: Engine, rows: int) -> None:
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM que_jobs"))
        connection.execute(text("DELETE FROM que_failed_jobs"))
    started = time.monotonic()
    with engine.begin() as connection:
        insert_many(
            connection,
            "SendEmail",
            ([n, {"template": "welcome"}] for n in range(rows * 7 // 10)),
            queue="mail",
        )
        insert_many(
            connection, "Reindex", ([n] for n in range(rows * 2 // 10)), queue="search", run_in=3600
        )
        insert_many(connection, "Bill", ([n] for n in range(rows - rows * 9 // 10)))
    print(f"COPY of {rows:,} jobs: {time.monotonic() - started:.1f} s", file=sys.stderr)
    _fail(engine, "billing", FAILED, "card declined")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE que_jobs"))
        connection.execute(text("VACUUM ANALYZE que_failed_jobs"))


def _timed(call: Callable[[], Any], repeat: int) -> tuple[float, float]:
    call()  # warm: the first request also compiles the templates
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


def measure(engine: Engine, repeat: int) -> list[tuple[str, float, float]]:
    app = create_app(engine, cache_seconds=1e-6, sample_seconds=1e-6)
    client = app.test_client()
    with engine.connect() as connection:
        job = connection.execute(
            text(
                "SELECT job_id, queue, priority, run_at::text FROM que_jobs "
                "WHERE queue = 'mail' ORDER BY priority, run_at, job_id OFFSET 5000 LIMIT 1"
            )
        ).one()
        far = connection.execute(
            text(
                "SELECT job_id FROM que_jobs WHERE queue = 'search' "
                "ORDER BY priority DESC, run_at DESC, job_id DESC LIMIT 1"
            )
        ).scalar_one()
        failed = connection.execute(text("SELECT job_id FROM que_failed_jobs LIMIT 1")).scalar_one()
    job_id, queue, priority, run_at = job
    results = []

    def get(path: str) -> Callable[[], Any]:
        def call() -> None:
            response = client.get(path)
            assert response.status_code == 200, (path, response.status_code)
            response.close()

        return call

    def after_pages(count: int) -> str:
        url = "/jobs?queue=mail"
        for _ in range(count):
            url = client.get(url.replace("/jobs", "/api/jobs", 1)).get_json()["links"]["next"]
        return url.replace("/jobs", "/api/jobs", 1)

    endpoints = [
        ("queues page (/)", "/"),
        ("queues data (/api/queues)", "/api/queues"),
        ("jobs, first page (/api/jobs)", "/api/jobs"),
        ("jobs of a queue, 20th page", after_pages(20)),
        ("jobs, state=scheduled", "/api/jobs?state=scheduled"),
        ("jobs, job_class matching nothing (a whole window read)", "/api/jobs?job_class=Nope"),
        (
            "one job, by the dashboard's link",
            f"/api/jobs/{job_id}?"
            + urlencode({"queue": queue, "priority": priority, "run_at": run_at}),
        ),
        (
            "one job, run_at moved since the link (queue and priority)",
            f"/api/jobs/{far}?queue=search&priority=100",
        ),
        ("one job, by its id alone (typed by hand)", f"/api/jobs/{far}"),
        ("one failed job", f"/api/jobs/{failed}"),
        (f"workers, {LOCKED} jobs locked (/api/workers)", "/api/workers"),
        ("failed jobs (/api/failed)", "/api/failed"),
    ]
    with engine.connect() as holder:
        ids = (
            holder.execute(
                text(
                    "SELECT job_id FROM que_jobs WHERE queue = 'mail' "
                    "ORDER BY priority, run_at, job_id LIMIT :n"
                ),
                {"n": LOCKED},
            )
            .scalars()
            .all()
        )
        for locked in ids:
            holder.execute(text("SELECT pg_advisory_lock(:id)"), {"id": locked})
        holder.commit()
        try:
            for name, path in endpoints:
                results.append((name, *_timed(get(path), repeat)))
        finally:
            holder.execute(text("SELECT pg_advisory_unlock_all()"))
            holder.commit()
    # The actions go through sqlalchemy_que.admin, which finds jobs by id.
    token_page = client.get("/").get_data(as_text=True)
    token = token_page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    retried = iter(range(10_000, 10_000 + repeat + 1))

    def retry() -> None:
        with engine.connect() as connection:
            target = connection.execute(
                text(
                    "SELECT job_id FROM que_jobs WHERE queue = 'search' "
                    "ORDER BY priority, run_at, job_id OFFSET :n LIMIT 1"
                ),
                {"n": next(retried)},
            ).scalar_one()
        response = client.post("/actions/retry", data={"job_id": target, "csrf_token": token})
        assert response.status_code == 303

    results.append(("action: retry one job (POST, admin.retry)", *_timed(retry, repeat)))
    return results


def report(rows: int, results: list[tuple[str, float, float]], repeat: int) -> str:
    lines = [
        f"{rows:,} jobs in que_jobs, {FAILED:,} in que_failed_jobs; median and slowest of "
        f"{repeat} requests, in ms",
        "",
        "| endpoint | median | slowest |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {median:.1f} | {worst:.1f} |" for name, median, worst in results]
    return "\n".join(lines)


# -- screenshots ------------------------------------------------------------------------------


def screenshots(engine: Engine, folder: Path, seconds: float) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.dashboard_browser import chromium, serving

    with engine.begin() as connection:
        connection.execute(text("DELETE FROM que_jobs"))
        connection.execute(text("DELETE FROM que_failed_jobs"))
    _fail(engine, "billing", 3, "card declined by the issuer")
    # The backtraces name files relative to the checkout, not where this machine keeps it.
    root = str(Path(__file__).resolve().parent.parent) + "/"
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE que_failed_jobs SET last_error = replace(last_error, :root, '')"),
            {"root": root},
        )

    rng = random.Random(7)  # noqa: S311  (made-up work, not secrets)

    def send_email(job: JobContext, user_id: int, options: dict[str, str]) -> None:
        time.sleep(rng.uniform(0.2, 1.5))

    def resize(job: JobContext, image: str) -> None:
        time.sleep(rng.uniform(0.1, 0.4))
        if image.endswith("7.png"):
            raise OSError(f"cannot identify image file {image!r}")

    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            with engine.begin() as connection:
                burst = rng.randint(2, 12)
                insert_many(
                    connection,
                    "SendEmail",
                    ([n + i, {"template": "welcome"}] for i in range(burst)),
                    queue="mail",
                )
                insert_many(
                    connection,
                    "ResizeImage",
                    ([f"uploads/{n + i}.png"] for i in range(3)),
                    queue="images",
                )
                n += burst
            stop.wait(rng.uniform(0.3, 1.0))

    with engine.begin() as connection:
        insert_many(connection, "Reindex", ([n] for n in range(40)), queue="search", run_in=600)
    producer = threading.Thread(target=produce)
    pool = WorkerPool(
        engine,
        {"SendEmail": send_email, "ResizeImage": resize},
        queues=["mail", "images"],
        workers=4,
    )
    app = create_app(engine, refresh_seconds=2, sample_seconds=3, page_size=12)
    folder.mkdir(parents=True, exist_ok=True)
    with serving(app) as base, chromium() as browser:
        pool.start()
        producer.start()
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        try:
            page.goto(base + "/")
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:  # the chart fills as the page refreshes
                page.wait_for_timeout(1000)
            page.screenshot(path=str(folder / "dashboard-queues.png"), full_page=True)
            page.goto(base + "/jobs?queue=images")
            page.screenshot(path=str(folder / "dashboard-jobs.png"), full_page=True)
            page.goto(base + "/workers")
            page.wait_for_selector("#table-workers td.num")
            page.screenshot(path=str(folder / "dashboard-workers.png"), full_page=True)
            page.goto(base + "/failed")
            page.screenshot(path=str(folder / "dashboard-failed.png"), full_page=True)
            page.click("#table-failed td.num a")
            page.screenshot(path=str(folder / "dashboard-job.png"), full_page=True)
        finally:
            stop.set()
            producer.join()
            pool.shutdown(timeout=10)
    for name in ("queues", "jobs", "workers", "failed", "job"):
        print(folder / f"dashboard-{name}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--database-url", help="default: a throwaway local PostgreSQL")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--screenshots", type=Path, help="save the pages' PNGs in this folder")
    parser.add_argument("--seconds", type=float, default=60, help="of live data before them")
    options = parser.parse_args(argv)
    logging.getLogger("sqlalchemy_que").setLevel(logging.CRITICAL)  # the failures are wanted
    with _database(options.database_url) as engine:
        if options.screenshots is not None:
            screenshots(engine, options.screenshots, options.seconds)
            return
        fill(engine, options.rows)
        print(report(options.rows, measure(engine, options.repeat), options.repeat))


if __name__ == "__main__":
    main()
