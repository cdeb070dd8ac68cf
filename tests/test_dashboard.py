"""The web dashboard: its endpoints through Flask's test client, then the real thing in
headless Chromium (Playwright driving the system's Chromium) against a served app.

The browser tests need Chromium and the playwright package: they are skipped without them on
a developer's machine, and fail in CI (``QUE_REQUIRE_DB_TESTS=1``), where `.ci/run` installs
Debian's ``chromium``.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine, text

from sqlalchemy_que import ConfigurationError, FailJob, JobContext, Worker, admin, locked_job
from sqlalchemy_que.dashboard import create_app, dashboard_blueprint
from sqlalchemy_que.dashboard._sampler import Sampler

from .conftest import wait_for
from .dashboard_browser import chromium, chromium_missing, serving
from .helpers import add_job, future, job_rows, past

FAST: dict[str, Any] = {"refresh_seconds": 0.3, "cache_seconds": 0.1, "sample_seconds": 0.1}

XSS_ARG = "<script>window.__xss = 1</script>"
XSS_IMG = '<img src=x onerror="window.__xss = 2">'
XSS_ERROR = "<script>alert('error')</script>"


def fail_for_good(engine: Engine, job_class: str, message: str, queue: str = "") -> int:
    """A job failed for good through a worker's FailJob; returns its id."""
    job_id = add_job(engine, job_class, XSS_ARG, queue=queue)

    def handler(job: JobContext, *args: Any) -> None:
        raise FailJob(message)

    assert Worker(engine, {job_class: handler}, queue=queue).work_one()
    return job_id


def csrf_token(page: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]*)">', page)
    assert match is not None
    return match[1]


@pytest.fixture
def app(engine: Engine) -> Flask:
    return create_app(engine, **FAST)


@pytest.fixture
def client(app: Flask) -> Any:
    return app.test_client()


# -- pages and JSON, through the test client ------------------------------------------------


def test_the_queues_page_counts_jobs_by_state(engine: Engine, client: Any) -> None:
    fail_for_good(engine, "C", "gone", queue="mail")
    add_job(engine, "A", queue="mail")
    add_job(engine, "A", queue="mail", run_at=past())
    add_job(engine, "A", queue="mail", run_at=future())
    add_job(engine, "B", queue="")
    with locked_job(engine, queue="mail") as lock:
        assert lock is not None
        data = client.get("/api/queues").get_json()
    rows = {
        row["cells"][0]["text"]: [c["text"] for c in row["cells"][1:]]
        for row in data["tables"]["queues"]["rows"]
    }
    # ready, scheduled, working, failed, waiting in all
    assert rows == {"(default)": ["1", "0", "0", "0", "1"], "mail": ["1", "1", "1", "1", "3"]}
    assert data["fields"]["ready"] == "2" and data["fields"]["failed"] == "1"
    links = {
        row["cells"][0]["text"]: row["cells"][0]["href"] for row in data["tables"]["queues"]["rows"]
    }
    assert links == {"(default)": "/jobs?default_queue=1", "mail": "/jobs?queue=mail"}
    page = client.get("/").get_data(as_text=True)
    assert "mail" in page and 'data-field="ready"' in page


def test_counts_past_the_count_limit_are_estimates(engine: Engine) -> None:
    from sqlalchemy_que import insert_many

    with engine.begin() as connection:
        insert_many(connection, "A", ([n] for n in range(300)), queue="big")
        insert_many(connection, "A", ([n] for n in range(100)), queue="big", run_in=3600)
        connection.execute(text("ANALYZE que_jobs"))
    client = create_app(engine, count_limit=50, **FAST).test_client()
    data = client.get("/api/queues").get_json()
    (row,) = data["tables"]["queues"]["rows"]
    ready, scheduled, total = (row["cells"][i]["text"] for i in (1, 2, 5))
    assert total == "~400"  # ANALYZE read the whole (small) table
    assert ready.startswith("~") and scheduled.startswith("~")
    assert 250 <= int(ready[1:]) <= 350
    assert data["fields"]["ready"] == ready


def test_jobs_are_filtered_and_keyset_paged(engine: Engine) -> None:
    ids = [add_job(engine, "A", n, queue="q1") for n in range(5)]
    ids += [add_job(engine, "B", n, queue="q2") for n in range(3)]
    later = add_job(engine, "A", queue="q1", run_at=future())
    client = create_app(engine, page_size=2, **FAST).test_client()

    def all_pages(url: str) -> list[int]:
        seen: list[int] = []
        while url:
            data = client.get(url.replace("/jobs", "/api/jobs", 1)).get_json()
            seen += [int(row["cells"][0]["text"]) for row in data["tables"]["jobs"]["rows"]]
            url = data["links"].get("next")
        return seen

    assert all_pages("/jobs") == [*ids[:5], later, *ids[5:]]
    assert all_pages("/jobs?queue=q2") == ids[5:]
    default = add_job(engine, "C")  # in the default queue, ''
    assert all_pages("/jobs?default_queue=1") == [default]
    assert all_pages("/jobs?queue=") == [default, *ids[:5], later, *ids[5:]]
    assert all_pages("/jobs?queue=&job_class=C") == [default]
    assert all_pages("/jobs?job_class=A&state=scheduled") == [later]
    assert all_pages("/jobs?default_queue=1&state=ready") == [default]
    assert all_pages("/jobs?queue=q1&state=ready") == ids[:5]
    assert client.get("/jobs?state=nope").status_code == 400
    assert client.get("/jobs?after=x&after=1").status_code == 400
    assert client.get("/jobs?after=q&after=1&after=not-a-time&after=1").status_code == 400


def test_a_page_reads_a_bounded_window_then_goes_on(engine: Engine) -> None:
    for n in range(6):
        add_job(engine, "Common", n, queue="w")
    rare = add_job(engine, "Rare", queue="w")
    client = create_app(engine, page_size=2, window=3, **FAST).test_client()
    first = client.get("/api/jobs?job_class=Rare").get_json()
    assert first["tables"]["jobs"]["rows"] == []
    assert "read 3 jobs" in first["fields"]["note"]
    url = first["links"]["next"]
    found: list[int] = []
    while url and not found:
        data = client.get(url.replace("/jobs", "/api/jobs", 1)).get_json()
        found = [int(row["cells"][0]["text"]) for row in data["tables"]["jobs"]["rows"]]
        url = data["links"].get("next")
    assert found == [rare]


def test_one_job_in_full_with_its_error_escaped(engine: Engine, client: Any) -> None:
    job_id = add_job(engine, "Flaky", XSS_ARG, queue="x")

    def flaky(job: JobContext, *args: Any) -> None:
        raise RuntimeError(XSS_ERROR)

    Worker(engine, {"Flaky": flaky}, queue="x").work_one()
    listing = client.get("/jobs?queue=x").get_data(as_text=True)
    (link,) = re.findall(r'href="(/jobs/\d+\?[^"]+)"', listing)
    page = client.get(html.unescape(link)).get_data(as_text=True)
    assert "<script>window" not in page and "<script>alert" not in page
    assert html.escape(XSS_ERROR, quote=False) in page or "&lt;script&gt;alert(" in page
    assert "RuntimeError" in page and "retrying" in page
    # By its id alone (a link typed by hand), and once it is gone.
    assert "RuntimeError" in client.get(f"/jobs/{job_id}").get_data(as_text=True)
    admin.delete(engine, [job_id])
    assert "gone" in client.get(f"/api/jobs/{job_id}").get_json()["fields"]["state"]


def test_failed_jobs_are_listed_most_recent_first(engine: Engine, client: Any) -> None:
    first = fail_for_good(engine, "F", "first")
    second = fail_for_good(engine, "F", "second")
    data = client.get("/api/failed").get_json()
    assert [int(r["cells"][0]["text"]) for r in data["tables"]["failed"]["rows"]] == [
        second,
        first,
    ]
    assert data["tables"]["failed"]["rows"][0]["cells"][-1]["text"].endswith("second")
    page = client.get(f"/jobs/{first}").get_data(as_text=True)
    assert "sqlalchemy_que.FailJob: first" in page and "failed" in page


def test_workers_shows_every_locked_job(engine: Engine, client: Any) -> None:
    job_id = add_job(engine, "Busy", queue="busy")
    assert client.get("/api/workers").get_json()["fields"]["count"] == "0"
    with locked_job(engine, queue="busy") as lock:
        assert lock is not None

        def shown() -> bool:
            rows = client.get("/api/workers").get_json()["tables"]["workers"]["rows"]
            return [row["cells"][1]["text"] for row in rows] == [str(job_id)]

        wait_for(shown, message="the locked job on the workers page")


# -- actions ---------------------------------------------------------------------------------


def post(client: Any, path: str, **form: Any) -> Any:
    token = csrf_token(client.get("/").get_data(as_text=True))
    return client.post(path, data={"csrf_token": token, **form})


def test_retry_and_delete_go_through_admin(engine: Engine, client: Any) -> None:
    later = add_job(engine, "A", run_at=future())
    doomed = add_job(engine, "A")
    response = post(client, "/actions/retry", job_id=later, next="/jobs")
    assert response.status_code == 303 and response.headers["Location"] == "/jobs"
    assert [row["run_in"] <= 0 for row in job_rows(engine)] == [True, True]
    assert post(client, "/actions/delete", job_id=doomed).status_code == 303
    assert [row["job_id"] for row in job_rows(engine)] == [later]
    page = client.get("/").get_data(as_text=True)
    assert f"Deleted job(s) {doomed}." in page


def test_a_locked_job_is_left_alone(engine: Engine, client: Any) -> None:
    job_id = add_job(engine, "A")
    with locked_job(engine) as lock:
        assert lock is not None
        post(client, "/actions/delete", job_id=job_id)
    assert [row["job_id"] for row in job_rows(engine)] == [job_id]
    assert "was left alone: a worker holds it" in client.get("/").get_data(as_text=True)


def test_retry_and_delete_failed_jobs_in_bulk(engine: Engine, client: Any) -> None:
    kept = fail_for_good(engine, "F", "x", queue="other")
    back = [fail_for_good(engine, "F", "x", queue="bulk") for _ in range(2)]
    post(client, "/actions/retry-failed", queue="bulk")
    assert sorted(row["job_id"] for row in job_rows(engine)) == back
    assert admin.counts(engine).failed == 1
    post(client, "/actions/delete-failed", job_class="F")
    assert admin.counts(engine).failed == 0
    assert kept not in [row["job_id"] for row in job_rows(engine)]


def test_a_post_without_the_csrf_token_is_refused(engine: Engine, client: Any) -> None:
    job_id = add_job(engine, "A")
    client.get("/")  # a session with a token exists
    assert client.post("/actions/delete", data={"job_id": job_id}).status_code == 400
    wrong = {"job_id": job_id, "csrf_token": "not-the-token"}
    assert client.post("/actions/delete", data=wrong).status_code == 400
    other = create_app(engine).test_client()  # a token of another session
    token = csrf_token(other.get("/").get_data(as_text=True))
    assert (
        client.post("/actions/delete", data={"job_id": job_id, "csrf_token": token}).status_code
        == 400
    )
    assert len(job_rows(engine)) == 1


def test_bad_job_ids_and_foreign_redirects_are_refused(engine: Engine, client: Any) -> None:
    assert post(client, "/actions/retry", job_id="1; DROP").status_code == 400
    assert post(client, "/actions/retry").status_code == 400
    response = post(client, "/actions/retry", job_id=99, next="//evil.example/")
    assert response.headers["Location"] == "/"


def test_read_only_hides_actions_and_refuses_them(engine: Engine) -> None:
    fail_for_good(engine, "F", "x")
    job_id = add_job(engine, "A")
    client = create_app(engine, read_only=True, **FAST).test_client()
    for path in ("/", "/jobs", "/failed", f"/jobs/{job_id}"):
        page = client.get(path).get_data(as_text=True)
        assert "data-action" not in page and "read-only" in page
    for action in ("retry", "delete", "retry-failed", "delete-failed"):
        assert client.post(f"/actions/{action}", data={"job_id": job_id}).status_code == 403
    assert len(job_rows(engine)) == 1


# -- mounting --------------------------------------------------------------------------------


def test_mounted_behind_the_apps_authorization(engine: Engine) -> None:
    app = Flask("shop")
    app.secret_key = "test"
    allowed = {"who": "nobody"}

    def authorize() -> object:
        if allowed["who"] == "admin":
            return True
        if allowed["who"] == "visitor":
            from flask import redirect

            return redirect("/login")
        return False

    app.register_blueprint(dashboard_blueprint(engine, authorize=authorize))
    client = app.test_client()
    assert client.get("/que/").status_code == 403
    allowed["who"] = "visitor"
    assert client.get("/que/jobs").headers["Location"] == "/login"
    allowed["who"] = "admin"
    page = client.get("/que/jobs").get_data(as_text=True)
    assert "/que/static/dashboard.js" in page
    with client.get("/que/static/dashboard.js") as script:
        assert script.status_code == 200


def test_mounted_with_flask_sqlalchemy(engine: Engine) -> None:
    from flask_sqlalchemy import SQLAlchemy

    add_job(engine, "A", queue="fsq")
    app = Flask("shop")
    app.config["SQLALCHEMY_DATABASE_URI"] = engine.url.render_as_string(hide_password=False)
    db = SQLAlchemy()
    db.init_app(app)
    app.register_blueprint(dashboard_blueprint(db, read_only=True, url_prefix="/admin/que"))
    try:
        rows = app.test_client().get("/admin/que/api/queues").get_json()["tables"]["queues"]
        assert [row["cells"][0]["text"] for row in rows["rows"]] == ["fsq"]
    finally:
        with app.app_context():
            db.engine.dispose()


def test_actions_need_the_apps_secret_key(engine: Engine) -> None:
    app = Flask("shop")
    app.register_blueprint(dashboard_blueprint(engine))
    app.testing = True
    with pytest.raises(ConfigurationError, match="secret_key"):
        app.test_client().get("/que/")


@pytest.mark.parametrize(
    ("option", "value"),
    [("refresh_seconds", 0), ("page_size", 0), ("window", 1.5), ("count_limit", True)],
)
def test_bad_options_are_refused(engine: Engine, option: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=option):
        dashboard_blueprint(engine, **{option: value})  # type: ignore[arg-type]


def test_the_throughput_rates() -> None:
    import datetime

    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    samples = iter([(start, 10, 5), (start + datetime.timedelta(seconds=2), 30, 9)])
    sampler = Sampler(sample_seconds=1e-9, history_seconds=60)
    for _ in range(2):
        sampler.sample(lambda: next(samples))
    rates = sampler.rates()
    assert [rate for _, rate in rates["enqueued"]] == [10.0]
    assert [rate for _, rate in rates["done"]] == [2.0]
    sampler.sample(lambda: (start + datetime.timedelta(seconds=3), 0, 0))  # stats reset
    assert sampler.rates() == {"enqueued": [], "done": []}


def test_the_chart_samples_the_tables_counters(engine: Engine, client: Any) -> None:
    client.get("/api/queues")
    with engine.begin() as connection:
        connection.execute(text("SELECT 1"))
    ids = [add_job(engine, "A", n) for n in range(20)]
    admin.delete(engine, ids)
    engine.dispose()  # the backends that wrote report their counters as they exit

    def sampled() -> bool:
        points = client.get("/api/queues").get_json()["chart"]
        return any(v > 0 for _, v in points["enqueued"]) and any(v > 0 for _, v in points["done"])

    wait_for(sampled, timeout=20, message="the chart to show rows in and out")


def test_sqlalchemy_que_web_serves_the_dashboard(database_url: str, engine: Engine) -> None:
    import urllib.request

    add_job(engine, "A", queue="cli")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sqlalchemy_que",
            "web",
            "--database-url",
            database_url,
            "--port",
            "0",
            "--read-only",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
        assert match is not None, line
        with urllib.request.urlopen(match[1] + "api/queues", timeout=10) as response:  # noqa: S310
            assert b'"cli"' in response.read()
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


# -- in headless Chromium --------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = chromium_missing()
    if missing is not None:
        if os.environ.get("QUE_REQUIRE_DB_TESTS") == "1":
            pytest.fail(f"the dashboard's browser tests must run here: {missing}")
        pytest.skip(missing)
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(10_000)
    dialogs: list[str] = []

    def answer(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", answer)
    page.dialogs = dialogs
    yield page
    context.close()


@pytest.fixture
def served(app: Flask) -> Iterator[str]:
    with serving(app) as base:
        yield base


def test_browser_pages_render_with_real_jobs(engine: Engine, page: Any, served: str) -> None:
    from playwright.sync_api import expect

    job_id = add_job(engine, "SendEmail", 42, queue="mail")
    failed = fail_for_good(engine, "Charge", "card declined", queue="billing")
    page.goto(served + "/")
    expect(page.locator("#table-queues")).to_contain_text("mail")
    expect(page.locator("#chart svg")).to_be_visible()
    page.click("text=Jobs")
    expect(page.locator("#table-jobs")).to_contain_text("SendEmail")
    page.click(f"#table-jobs a:text-is('{job_id}')")
    expect(page.locator("h1")).to_have_text(f"Job {job_id}")
    expect(page.locator('[data-field="args"]')).to_contain_text("42")
    page.click("text=Failed")
    expect(page.locator("#table-failed")).to_contain_text("card declined")
    page.click(f"#table-failed a:text-is('{failed}')")
    expect(page.locator('[data-field="last_error"]')).to_contain_text(
        "sqlalchemy_que.FailJob: card declined\n"
    )
    with locked_job(engine, queue="mail") as lock:
        assert lock is not None
        page.click("text=Workers")
        expect(page.locator("#table-workers")).to_contain_text("SendEmail")
    expect(page.locator("#table-workers")).to_contain_text("No job is being worked")


def test_browser_retry_and_delete_change_the_database(
    engine: Engine, page: Any, served: str
) -> None:
    from playwright.sync_api import expect

    later = add_job(engine, "Later", run_at=future())
    doomed = add_job(engine, "Doomed")
    page.goto(served + "/jobs")
    page.click(f"button[data-action=retry][data-job-id='{later}']")
    expect(page.locator(".flashes")).to_contain_text(f"Retried job(s) {later}.")
    assert [row["run_in"] <= 0 for row in job_rows(engine) if row["job_id"] == later] == [True]
    page.click(f"button[data-action=delete][data-job-id='{doomed}']")
    expect(page.locator(".flashes")).to_contain_text(f"Deleted job(s) {doomed}.")
    assert page.dialogs == ["Delete?"]
    assert [row["job_id"] for row in job_rows(engine)] == [later]
    failed = fail_for_good(engine, "F", "x", queue="f")
    page.goto(served + "/failed")
    page.click(f"button[data-action=retry][data-job-id='{failed}']")
    expect(page.locator(".flashes")).to_contain_text(f"Retried job(s) {failed}.")
    assert admin.counts(engine).failed == 0


def test_browser_job_data_is_inert_text(engine: Engine, page: Any, served: str) -> None:
    from playwright.sync_api import expect

    job_id = add_job(engine, XSS_IMG, XSS_ARG, queue=XSS_ARG)
    failed = fail_for_good(engine, "Evil", XSS_ERROR)
    for path in ("/", "/jobs", f"/jobs/{failed}", "/failed"):
        page.goto(served + path)
        expect(page.locator("#refreshed")).to_contain_text("updated")  # the script rendered it
    page.goto(served + "/jobs")
    expect(page.locator("#table-jobs")).to_contain_text(XSS_ARG)
    expect(page.locator("#table-jobs")).to_contain_text(XSS_IMG)
    expect(page.locator("#refreshed")).to_contain_text("updated")
    page.goto(served + f"/jobs/{failed}")
    expect(page.locator('[data-field="last_error"]')).to_contain_text(XSS_ERROR)
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.locator("main script, main img").count() == 0
    assert page.dialogs == []
    assert job_id


def test_browser_read_only_hides_and_refuses(engine: Engine, page: Any) -> None:
    job_id = add_job(engine, "A")
    with serving(create_app(engine, read_only=True, **FAST)) as base:
        page.goto(base + "/jobs")
        from playwright.sync_api import expect

        expect(page.locator("#table-jobs")).to_contain_text(str(job_id))
        assert page.locator("button[data-action]").count() == 0
        status = page.evaluate(
            """async (id) => (await fetch("/actions/delete", {method: "POST",
                body: new URLSearchParams({job_id: id})})).status""",
            str(job_id),
        )
    assert status == 403
    assert len(job_rows(engine)) == 1


def test_browser_post_without_the_token_is_refused(engine: Engine, page: Any, served: str) -> None:
    job_id = add_job(engine, "A")
    page.goto(served + "/jobs")
    status = page.evaluate(
        """async (id) => (await fetch("/actions/delete", {method: "POST",
            body: new URLSearchParams({job_id: id})})).status""",
        str(job_id),
    )
    assert status == 400
    assert len(job_rows(engine)) == 1


def test_browser_refreshes_counts_without_reloading(engine: Engine, page: Any, served: str) -> None:
    from playwright.sync_api import expect

    page.goto(served + "/")
    expect(page.locator('[data-field="ready"]')).to_have_text("0")
    page.evaluate("window.__same_page = true")
    add_job(engine, "A", queue="fresh")
    expect(page.locator('[data-field="ready"]')).to_have_text("1")
    expect(page.locator("#table-queues")).to_contain_text("fresh")
    assert page.evaluate("window.__same_page") is True  # no reload


def test_workers_are_found_near_the_front_and_far_down(
    engine: Engine, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy_que import insert_many
    from sqlalchemy_que.dashboard import _queries, _views

    monkeypatch.setattr(_views, "FRONT_PROBE", 10)  # the last job is beyond: a full read

    with engine.begin() as connection:
        insert_many(connection, "Deep", ([n] for n in range(30)), queue="deep")
    with engine.connect() as connection:
        first, last = connection.execute(
            text("SELECT min(job_id), max(job_id) FROM que_jobs WHERE queue = 'deep'")
        ).one()
    with engine.connect() as holder:
        holder.execute(
            text("SELECT pg_advisory_lock(:a), pg_advisory_lock(:b)"), {"a": first, "b": last}
        )
        holder.commit()
        try:
            with engine.connect() as connection:
                near = _queries.worker_states_near_the_front(connection, probe=10)
            assert [state.job_id for state in near] == [first]

            def both_shown() -> bool:
                rows = client.get("/api/workers").get_json()["tables"]["workers"]["rows"]
                return sorted(int(row["cells"][1]["text"]) for row in rows) == [first, last]

            wait_for(both_shown, message="both locked jobs on the workers page")
        finally:
            holder.execute(text("SELECT pg_advisory_unlock_all()"))
            holder.commit()
