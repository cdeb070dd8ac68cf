"""The dashboard's pages as plain data: tables of cells, named fields and chart series.

The same data renders the page on the server (Jinja, autoescaped) and refreshes it in the
browser (the page's script fetches it as JSON and writes it with ``textContent``), so a page
is built once, here, and both renderings show the same thing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable
from typing import Any

from ._queries import JobPage, JobRow, QueueCounts

__all__ = ["Cell", "Table", "failed_table", "job_fields", "jobs_table", "queues_table"]

#: Builds a URL of the dashboard: (endpoint, query values) to a path.
UrlFor = Callable[..., str]


@dataclasses.dataclass(frozen=True, slots=True)
class Cell:
    """One cell: its text, and optionally a link and a CSS class."""

    text: str
    href: str | None = None
    cls: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Action:
    """A button that POSTs ``job_id`` to ``url``."""

    label: str
    url: str
    job_id: int
    cls: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    cells: list[Cell]
    actions: list[Action] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class Table:
    columns: list[str]
    rows: list[Row]
    empty: str
    has_actions: bool = False


def as_json(value: Any) -> Any:
    """Tables, rows and cells as JSON-ready dicts (None fields dropped)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: as_json(getattr(value, field.name))
            for field in dataclasses.fields(value)
            if getattr(value, field.name) is not None
        }
    if isinstance(value, list | tuple):
        return [as_json(item) for item in value]
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    return value


def number(value: int, *, capped: bool = False) -> str:
    return f"~{value:,}" if capped else f"{value:,}"


def when(moment: datetime.datetime | None, now: datetime.datetime) -> str:
    """``2026-12-02 10:04:05 UTC (3 min ago)``."""
    if moment is None:
        return ""
    try:
        absolute = moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        seconds = (moment - now).total_seconds()
    except (OverflowError, ValueError):
        return str(moment)
    return f"{absolute} ({ago(seconds)})"


def ago(seconds: float) -> str:
    future, seconds = seconds > 0, abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            break
    else:
        amount = f"{int(seconds)} s"
    return f"in {amount}" if future else f"{amount} ago"


def short_args(args: Any, limit: int = 120) -> str:
    text = json.dumps(args, ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(error: str | None) -> str:
    return "" if not error else error.split("\n", 1)[0][:200]


def queue_args(queue: str | None) -> dict[str, str]:
    """The query arguments naming a queue filter: the default queue (``''``) is
    ``default_queue=1``, since an empty ``queue`` field means every queue."""
    if queue is None:
        return {}
    return {"queue": queue} if queue else {"default_queue": "1"}


def queue_label(queue: str) -> str:
    return queue if queue else "(default)"


def queues_table(counts: list[QueueCounts], url: UrlFor) -> Table:
    rows = []
    for queue in counts:

        def link(state: str, value: int, *, capped: bool = False, q: QueueCounts = queue) -> Cell:
            if state == "failed":
                href = url(".failed", **queue_args(q.queue))
            else:
                href = url(".jobs", **queue_args(q.queue), state=state)
            return Cell(number(value, capped=capped), href, "num")

        rows.append(
            Row(
                [
                    Cell(
                        queue_label(queue.queue), url(".jobs", **queue_args(queue.queue)), "queue"
                    ),
                    link("ready", queue.ready, capped=queue.capped),
                    link("scheduled", queue.scheduled, capped=queue.capped),
                    link("working", queue.working),
                    link("failed", queue.failed),
                    Cell(number(queue.total, capped=queue.capped), None, "num"),
                ]
            )
        )
    return Table(
        ["queue", "ready", "scheduled", "working", "failed", "waiting in all"],
        rows,
        "No jobs in any queue.",
    )


def job_url(job: JobRow, url: UrlFor) -> str:
    if job.state == "failed":
        return url(".job", job_id=job.job_id)
    return url(
        ".job", job_id=job.job_id, queue=job.queue, priority=job.priority, run_at=job.run_at_key
    )


def _job_actions(job: JobRow, url: UrlFor, read_only: bool) -> list[Action]:
    if read_only:
        return []
    return [
        Action("Retry", url(".retry"), job.job_id),
        Action("Delete", url(".delete"), job.job_id, "danger"),
    ]


def jobs_table(page: JobPage, url: UrlFor, now: datetime.datetime, *, read_only: bool) -> Table:
    rows = [
        Row(
            [
                Cell(str(job.job_id), job_url(job, url), "num"),
                Cell(queue_label(job.queue), None, "queue"),
                Cell(job.job_class, None, "mono"),
                Cell(job.state, None, f"state state-{job.state}"),
                Cell(str(job.priority), None, "num"),
                Cell(when(job.run_at, now)),
                Cell(str(job.error_count), None, "num"),
                Cell(short_args(job.args), None, "mono args"),
                Cell(first_line(job.last_error), None, "error"),
            ],
            _job_actions(job, url, read_only),
        )
        for job in page.jobs
    ]
    columns = ["id", "queue", "job_class", "state", "priority", "run_at", "errors", "args"]
    return Table([*columns, "last error"], rows, "No jobs match.", has_actions=not read_only)


def failed_table(page: JobPage, url: UrlFor, now: datetime.datetime, *, read_only: bool) -> Table:
    rows = [
        Row(
            [
                Cell(str(job.job_id), job_url(job, url), "num"),
                Cell(queue_label(job.queue), None, "queue"),
                Cell(job.job_class, None, "mono"),
                Cell(when(job.failed_at, now)),
                Cell(job.reason or "", None, "state state-failed"),
                Cell(str(job.error_count), None, "num"),
                Cell(short_args(job.args), None, "mono args"),
                Cell(first_line(job.last_error), None, "error"),
            ],
            _job_actions(job, url, read_only),
        )
        for job in page.jobs
    ]
    columns = ["id", "queue", "job_class", "failed_at", "reason", "errors", "args"]
    return Table([*columns, "last error"], rows, "No failed jobs.", has_actions=not read_only)


def workers_table(states: list[Any], url: UrlFor, now: datetime.datetime) -> Table:
    rows = []
    for state in states:
        job_link = url(".job", job_id=state.job_id, queue=state.queue, priority=state.priority)
        started = state.pg_transaction_started_at or state.pg_state_changed_at
        rows.append(
            Row(
                [
                    Cell(str(state.pg_backend_pid), None, "num"),
                    Cell(str(state.job_id), job_link, "num"),
                    Cell(queue_label(state.queue), None, "queue"),
                    Cell(state.job_class, None, "mono"),
                    Cell(short_args(_decoded(state.args)), None, "mono args"),
                    Cell(state.pg_state or "", None, "state"),
                    Cell(when(started, now)),
                    Cell("yes" if state.pg_waiting_on_lock else "no"),
                    Cell((state.pg_last_query or "")[:200], None, "mono query"),
                ]
            )
        )
    return Table(
        [
            "backend pid",
            "job",
            "queue",
            "job_class",
            "args",
            "session state",
            "since",
            "waiting on a lock",
            "last query",
        ],
        rows,
        "No job is being worked right now.",
    )


def _decoded(args: str) -> Any:
    try:
        return json.loads(args)
    except ValueError:
        return args


def job_fields(job: JobRow | None, now: datetime.datetime) -> dict[str, str]:
    """The named fields of the job page (``data-field`` in the template)."""
    if job is None:
        return {"state": "gone: completed, deleted, or never there"}
    fields = {
        "state": job.state
        + (f" (by backend {job.locked_by})" if job.locked_by is not None else ""),
        "queue": queue_label(job.queue),
        "job_class": job.job_class,
        "priority": str(job.priority),
        "run_at": when(job.run_at, now),
        "error_count": str(job.error_count),
        "args": json.dumps(job.args, ensure_ascii=False, indent=2),
        "last_error": job.last_error or "(none)",
    }
    if job.failed_at is not None:
        fields["failed_at"] = when(job.failed_at, now)
        fields["reason"] = job.reason or ""
    return fields
