"""The dashboard's Flask blueprint: pages, their JSON twins, and the POST actions."""

from __future__ import annotations

import dataclasses
import datetime
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from sqlalchemy_que import ConfigurationError, admin, worker_states

from . import _pages, _queries
from ._sampler import Sampler

__all__ = ["Options", "make_blueprint"]

#: The key of the CSRF token in the Flask session, and the form field and header carrying it.
CSRF_SESSION_KEY = "que_dashboard_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"

#: The most failed jobs one click of "Retry all" retries.
RETRY_ALL_LIMIT = 1000


@dataclasses.dataclass(frozen=True)
class Options:
    """What :func:`make_blueprint` was given (see ``dashboard_blueprint``)."""

    engine: Callable[[], Engine]
    read_only: bool
    authorize: Callable[[], object] | None
    refresh_seconds: float
    page_size: int
    window: int
    count_limit: int
    cache_seconds: float
    sample_seconds: float
    history_seconds: float


#: How many jobs at the front of each queue are looked at for the locked ones.
FRONT_PROBE = 1000


class _Cached:
    """The worker states, read at most every ``seconds`` whatever the number of viewers.

    The locked jobs are looked for among the first jobs of each queue, where workers take
    them; only when some lock is not found there (a job locked far down its queue, or an
    advisory lock that is not a job's) does :func:`sqlalchemy_que.worker_states` read them,
    which costs a pass over que_jobs (it has no index on job_id alone).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.full_reads = 0
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._value: list[Any] = []

    def get(self, connection: Connection) -> list[Any]:
        with self._lock:
            if time.monotonic() - self._at >= self.seconds:
                held = _queries.lock_count(connection)
                states = []
                if held:
                    states = _queries.worker_states_near_the_front(connection, probe=FRONT_PROBE)
                    if len(states) < held:
                        states = worker_states(connection)
                        self.full_reads += 1
                self._value = states
                self._at = time.monotonic()
            return self._value


def _csrf_token() -> str:
    token = session.get(CSRF_SESSION_KEY)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[CSRF_SESSION_KEY] = token
    return token


def _check_csrf() -> None:
    expected = session.get(CSRF_SESSION_KEY)
    given = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    if not isinstance(expected, str) or not hmac.compare_digest(expected, given):
        abort(400, "the CSRF token is missing or wrong: reload the page and try again")


def _queue(source: Any) -> str | None:
    """The queue filter of a query or form: ``queue`` when not empty, else the default
    queue (``''``) with ``default_queue``, else None (every queue)."""
    queue = source.get("queue") or None
    if queue is None and source.get("default_queue"):
        return ""
    return queue


def _optional(name: str) -> str | None:
    value = request.args.get(name)
    return value if value is not None and (value or name == "queue") else None


def _key(name: str, parts: int) -> tuple[str, ...] | None:
    value = request.args.getlist(name)
    if not value:
        return None
    if len(value) != parts:
        abort(400, f"{name} must be given {parts} times, got {len(value)}")
    return tuple(value)


def _bounded_int(name: str) -> int | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        abort(400, f"{name} must be a whole number, got {value!r}")
    if not -(2**63) < number < 2**63:
        abort(400, f"{name} is out of range: {value!r}")
    return number


def _job_ids() -> list[int]:
    values = request.form.getlist("job_id")
    if not values:
        abort(400, "no job_id given")
    ids = []
    for value in values:
        if not value.isdigit() or not 0 < int(value) < 2**63:
            abort(400, f"{value!r} is not a job id (a whole number >= 1)")
        ids.append(int(value))
    return ids


def _back() -> ResponseReturnValue:
    target = request.form.get("next") or ""
    parts = urlsplit(target)
    if not target.startswith("/") or target.startswith("//") or parts.scheme or parts.netloc:
        target = url_for(".queues")
    return redirect(target, code=303)


def _report(verb: str, outcome: admin.Outcome) -> None:
    if outcome.done:
        flash(f"{verb} job(s) {', '.join(map(str, outcome.done))}.", "ok")
    for job_id, pid in outcome.locked.items():
        flash(f"Job {job_id} was left alone: a worker holds it (backend {pid}).", "warning")
    if outcome.missing:
        flash(f"No job {', '.join(map(str, outcome.missing))}: already gone.", "warning")


def make_blueprint(options: Options, *, name: str, url_prefix: str | None) -> Blueprint:
    """The dashboard's blueprint (see ``dashboard_blueprint`` for the options)."""
    blueprint = Blueprint(
        name,
        __name__,
        url_prefix=url_prefix,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )
    cached = _Cached(options.cache_seconds)
    sampler = Sampler(
        sample_seconds=options.sample_seconds, history_seconds=options.history_seconds
    )

    @contextmanager
    def connect() -> Iterator[Connection]:
        with options.engine().connect() as connection:
            yield connection

    def url(endpoint: str, **values: Any) -> str:
        return url_for(endpoint, **{k: v for k, v in values.items() if v is not None})

    @blueprint.before_request
    def check_access() -> ResponseReturnValue | None:
        if not options.read_only and not current_app.secret_key:
            raise ConfigurationError(
                "the que dashboard keeps its CSRF token in the Flask session, which needs "
                "app.secret_key (SECRET_KEY); set one, or mount it with read_only=True"
            )
        if options.authorize is not None:
            verdict = options.authorize()
            if verdict is False or verdict is None:
                abort(403)
            if verdict is not True:
                return verdict  # type: ignore[return-value]  # a response: a redirect to log in
        if request.method == "POST":
            if options.read_only:
                abort(403, "this dashboard is read-only")
            _check_csrf()
        return None

    @blueprint.context_processor
    def common() -> dict[str, Any]:
        token = "" if options.read_only else _csrf_token()
        return {
            "read_only": options.read_only,
            "csrf_token": token,
            "refresh_ms": int(options.refresh_seconds * 1000),
            "api_url": url_for(
                ".api", page=request.endpoint.rsplit(".", 1)[-1] if request.endpoint else ""
            ),
        }

    def now_of(connection: Connection) -> datetime.datetime:
        return datetime.datetime.now(datetime.timezone.utc)

    def queues_data() -> dict[str, Any]:
        with connect() as connection:
            states = cached.get(connection)
            working: dict[str, int] = {}
            for state in states:
                working[state.queue] = working.get(state.queue, 0) + 1
            counts = _queries.queue_counts(
                connection, count_limit=options.count_limit, working=working
            )
            estimate = _queries.table_estimate(connection)
            sampler.sample(lambda: _queries.table_counters(connection))
        totals = {
            "ready": sum(c.ready for c in counts),
            "scheduled": sum(c.scheduled for c in counts),
            "working": sum(c.working for c in counts),
            "failed": sum(c.failed for c in counts),
        }
        capped = any(c.capped for c in counts)
        fields = {
            name: _pages.number(value, capped=capped and name in ("ready", "scheduled"))
            for name, value in totals.items()
        }
        fields["estimate"] = f"about {estimate:,}" if estimate > 0 else "not estimated yet"
        return {
            "tables": {"queues": _pages.queues_table(counts, url)},
            "fields": fields,
            "chart": sampler.rates(),
        }

    def jobs_data() -> dict[str, Any]:
        state = _optional("state")
        if state == "failed":
            abort(400, "failed jobs are listed on the failed page")
        if state is not None and state not in _queries.WAITING_STATES:
            abort(400, f"state must be one of {', '.join(_queries.WAITING_STATES)}, got {state!r}")
        queue, job_class = _queue(request.args), _optional("job_class")
        after = _key("after", 4)
        with connect() as connection:
            try:
                page = _queries.job_page(
                    connection,
                    queue=queue,
                    job_class=job_class,
                    state=state,
                    after=after,
                    page_size=options.page_size,
                    window=options.window,
                )
            except DBAPIError as error:  # a key that PostgreSQL cannot read
                if after is None:
                    raise
                abort(400, f"bad paging key {list(after)!r}: {type(error).__name__}")
            now = now_of(connection)
        filters = {**_pages.queue_args(queue), "job_class": job_class, "state": state}
        return _listing(
            "jobs",
            _pages.jobs_table(page, url, now, read_only=options.read_only),
            page,
            url(".jobs", **filters, after=list(page.next_key) if page.next_key else None),
        )

    def failed_data() -> dict[str, Any]:
        queue, job_class = _queue(request.args), _optional("job_class")
        before = _key("before", 2)
        with connect() as connection:
            try:
                page = _queries.failed_page(
                    connection,
                    queue=queue,
                    job_class=job_class,
                    before=before,
                    page_size=options.page_size,
                    window=options.window,
                )
            except DBAPIError as error:
                if before is None:
                    raise
                abort(400, f"bad paging key {list(before)!r}: {type(error).__name__}")
            now = now_of(connection)
        filters = {**_pages.queue_args(queue), "job_class": job_class}
        return _listing(
            "failed",
            _pages.failed_table(page, url, now, read_only=options.read_only),
            page,
            url(".failed", **filters, before=list(page.next_key) if page.next_key else None),
        )

    def _listing(
        name: str, table: _pages.Table, page: _queries.JobPage, next_url: str
    ) -> dict[str, Any]:
        note = ""
        if page.exhausted:
            note = f"This page read {options.window:,} jobs to find these; the next page reads on."
        return {
            "tables": {name: table},
            "fields": {"shown": f"{len(page.jobs):,}", "note": note},
            "links": {"next": next_url if page.next_key else None},
        }

    def job_data(job_id: int) -> dict[str, Any]:
        queue, run_at = request.args.get("queue"), request.args.get("run_at") or None
        priority = _bounded_int("priority")
        with connect() as connection:
            try:
                job = _queries.find_job(
                    connection, job_id, queue=queue, priority=priority, run_at=run_at
                )
            except DBAPIError:
                abort(400, f"bad run_at {run_at!r}")
            if job is None and (queue is None or priority is None):
                # Opened by its id alone (typed by hand): admin.get_job reads que_jobs by id,
                # which has no index of its own (see docs/dashboard.md).
                info = admin.get_job(connection, job_id)
                if info is not None:
                    job = _queries.find_job(
                        connection, job_id, queue=info.queue, priority=info.priority
                    )
            now = now_of(connection)
        return {"fields": _pages.job_fields(job, now), "job": job}

    def workers_data() -> dict[str, Any]:
        with connect() as connection:
            states = cached.get(connection)
            now = now_of(connection)
        return {
            "tables": {"workers": _pages.workers_table(states, url, now)},
            "fields": {"count": f"{len(states):,}"},
        }

    pages: dict[str, Callable[..., dict[str, Any]]] = {
        "queues": queues_data,
        "jobs": jobs_data,
        "failed": failed_data,
        "workers": workers_data,
        "job": job_data,
    }

    def render(page: str, data: dict[str, Any], **context: Any) -> str:
        return render_template(
            f"que_dashboard/{page}.html",
            page=page,
            data=data,
            args=request.args,
            **context,
        )

    @blueprint.get("/")
    def queues() -> ResponseReturnValue:
        return render("queues", queues_data())

    @blueprint.get("/jobs")
    def jobs() -> ResponseReturnValue:
        return render("jobs", jobs_data(), states=_queries.WAITING_STATES)

    @blueprint.get("/failed")
    def failed() -> ResponseReturnValue:
        return render("failed", failed_data())

    @blueprint.get("/workers")
    def workers() -> ResponseReturnValue:
        return render("workers", workers_data())

    @blueprint.get("/jobs/<int:job_id>")
    def job(job_id: int) -> ResponseReturnValue:
        return render("job", job_data(job_id), job_id=job_id)

    @blueprint.get("/api/<page>")
    def api(page: str) -> ResponseReturnValue:
        if page not in pages or page == "job":
            abort(404)
        return jsonify(_pages.as_json(pages[page]()))

    @blueprint.get("/api/jobs/<int:job_id>")
    def api_job(job_id: int) -> ResponseReturnValue:
        data = job_data(job_id)
        return jsonify({"fields": data["fields"]})

    @blueprint.post("/actions/retry")
    def retry() -> ResponseReturnValue:
        with options.engine().begin() as connection:
            _report("Retried", admin.retry(connection, _job_ids()))
        return _back()

    @blueprint.post("/actions/delete")
    def delete() -> ResponseReturnValue:
        with options.engine().begin() as connection:
            _report("Deleted", admin.delete(connection, _job_ids()))
        return _back()

    @blueprint.post("/actions/retry-failed")
    def retry_failed() -> ResponseReturnValue:
        queue, job_class = _queue(request.form), request.form.get("job_class") or None
        with options.engine().begin() as connection:
            ids = _queries.failed_ids(
                connection, queue=queue, job_class=job_class, limit=RETRY_ALL_LIMIT
            )
            if ids:
                _report("Retried", admin.retry(connection, ids))
            else:
                flash("No failed job to retry.", "warning")
        return _back()

    @blueprint.post("/actions/delete-failed")
    def delete_failed() -> ResponseReturnValue:
        queue, job_class = _queue(request.form), request.form.get("job_class") or None
        with options.engine().begin() as connection:
            cleared = admin.clear(connection, queue=queue, job_class=job_class, failed=True)
        flash(f"Deleted {cleared.deleted:,} failed job(s).", "ok")
        return _back()

    return blueprint
