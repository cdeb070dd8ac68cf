"""The operations commands (``jobs``, ``job``, ``retry``, ``delete``, ``clear``, ``cancel``,
``purge-failed``), each a thin shell over one function of :mod:`sqlalchemy_que.admin`, added
to both ``sqlalchemy-que`` and ``flask que``.

Each command says what it left alone: a job a worker holds is never touched (it is named,
with the holding backend's pid), and the command then exits with status 1, as it does for an
id found nowhere.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import click
from sqlalchemy import Engine

from . import admin

__all__ = ["add_admin_commands", "parse_duration"]

#: Given a command's extra options (``database_url`` for ``sqlalchemy-que``), a context
#: manager that yields the Engine to work on and turns errors into one clear line.
EngineFor = Callable[[dict[str, Any]], AbstractContextManager[Engine]]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(value: str) -> datetime.timedelta:
    """``"90"``, ``"90s"``, ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"`` as a timedelta.

    :raises click.BadParameter: naming the value.
    """
    match = _DURATION.match(value)
    if match is None:
        raise click.BadParameter(
            f"{value!r} is not a duration; use a number with s, m, h, d or w (7d, 12h, 0)",
            param_hint="--older-than",
        )
    return datetime.timedelta(seconds=float(match[1]) * _UNITS[match[2] or "s"])


def _job_ids(values: Iterable[str]) -> list[int]:
    ids = []
    for value in values:
        if not value.isdigit() or int(value) < 1:
            raise click.BadParameter(f"{value!r} is not a job id (a whole number >= 1)")
        ids.append(int(value))
    return ids


def _default(value: object) -> str:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    raise TypeError(repr(value))


def _as_dict(info: admin.JobInfo) -> dict[str, Any]:
    return {name: getattr(info, name) for name in admin.JobInfo.__slots__}


def _report(outcome: admin.Outcome, verb: str) -> None:
    """Say what was done and what was left alone; exit 1 when anything was left."""
    for job_id in outcome.done:
        click.echo(f"job {job_id}: {verb}")
    for job_id, pid in outcome.locked.items():
        holder = f"backend pid {pid}" if pid is not None else "another session"
        click.echo(f"job {job_id}: held by a worker ({holder}); left alone", err=True)
    for job_id in outcome.missing:
        click.echo(f"job {job_id}: no such job", err=True)
    if outcome.locked or outcome.missing:
        sys.exit(1)


def add_admin_commands(
    group: click.Group, *, options: Callable[[Any], Any], engine_for: EngineFor
) -> None:
    """Add the operations commands to ``group``; ``options`` decorates each with the
    group's own options (such as ``--database-url``)."""

    @group.command("jobs")
    @options
    @click.option("--queue", default=None, help="Only this queue.")
    @click.option("--job-class", default=None, help="Only this job_class.")
    @click.option("--errored", is_flag=True, help="Only jobs that failed at least once.")
    @click.option("--scheduled", is_flag=True, help="Only jobs due later.")
    @click.option("--failed", is_flag=True, help="List the failed jobs instead.")
    @click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def jobs_command(
        queue: str | None,
        job_class: str | None,
        errored: bool,
        scheduled: bool,
        failed: bool,
        limit: int,
        as_json: bool,
        **extra: Any,
    ) -> None:
        """List jobs (waiting, or with --failed the failed ones), with their last error."""
        with engine_for(extra) as engine:
            infos = admin.list_jobs(
                engine,
                queue=queue,
                job_class=job_class,
                errored=errored,
                scheduled=scheduled,
                failed=failed,
                limit=limit,
            )
        if as_json:
            click.echo(json.dumps([_as_dict(i) for i in infos], default=_default, indent=2))
            return
        header = ("job_id", "state", "queue", "job_class", "errors", "run_at", "last_error")
        rows = [
            (
                str(i.job_id),
                i.state if i.reason is None else f"{i.state} ({i.reason})",
                repr(i.queue),
                i.job_class,
                str(i.error_count),
                i.run_at.isoformat(timespec="seconds"),
                (i.first_error_line or "")[:80],
            )
            for i in infos
        ]
        widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
        for line in (header, *rows):
            click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if not rows:
            click.echo("(no jobs)")

    @group.command("job")
    @options
    @click.argument("job_id")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def job_command(job_id: str, as_json: bool, **extra: Any) -> None:
        """Show one job in full (waiting or failed), its whole last_error included."""
        (number,) = _job_ids([job_id])
        with engine_for(extra) as engine:
            info = admin.get_job(engine, number)
        if info is None:
            click.echo(f"job {number}: no such job", err=True)
            sys.exit(1)
        if as_json:
            click.echo(json.dumps(_as_dict(info), default=_default, indent=2))
            return
        for name, value in _as_dict(info).items():
            if name == "last_error" or value is None:
                continue
            shown = json.dumps(value) if name == "args" else value
            click.echo(f"{name}: {shown}")
        if info.last_error is not None:
            click.echo("last_error:")
            for line in info.last_error.splitlines():
                click.echo(f"  {line}")

    @group.command("retry")
    @options
    @click.argument("job_ids", nargs=-1, required=True)
    def retry_command(job_ids: tuple[str, ...], **extra: Any) -> None:
        """Run jobs now; a failed job goes back into que_jobs with its attempts reset.
        Jobs a worker holds are left alone."""
        ids = _job_ids(job_ids)
        with engine_for(extra) as engine:
            outcome = admin.retry(engine, ids)
        _report(outcome, "due now")

    @group.command("delete")
    @options
    @click.argument("job_ids", nargs=-1, required=True)
    def delete_command(job_ids: tuple[str, ...], **extra: Any) -> None:
        """Delete jobs, waiting or failed. Jobs a worker holds are left alone (cancel them)."""
        ids = _job_ids(job_ids)
        with engine_for(extra) as engine:
            outcome = admin.delete(engine, ids)
        _report(outcome, "deleted")

    @group.command("clear")
    @options
    @click.option("--queue", default=None, help="Only this queue.")
    @click.option("--job-class", default=None, help="Only this job_class.")
    @click.option("--failed", is_flag=True, help="Clear the failed jobs instead.")
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    def clear_command(
        queue: str | None, job_class: str | None, failed: bool, yes: bool, **extra: Any
    ) -> None:
        """Delete every job matching the filters (all of que_jobs without any). Jobs a
        worker holds are left alone."""
        what = "failed jobs" if failed else "jobs"
        scope = "".join(
            [
                f" of queue {queue!r}" if queue is not None else "",
                f" of job_class {job_class!r}" if job_class is not None else "",
            ]
        )
        if not yes:
            table = "que_failed_jobs" if failed else "que_jobs"
            click.confirm(f"Delete every {what[:-1]}{scope} in {table}?", abort=True)
        with engine_for(extra) as engine:
            cleared = admin.clear(engine, queue=queue, job_class=job_class, failed=failed)
        click.echo(f"deleted {cleared.deleted} {'failed ' if failed else ''}job(s)")
        if cleared.locked:
            click.echo(f"left {cleared.locked} job(s) a worker holds", err=True)

    @group.command("cancel")
    @options
    @click.argument("job_id")
    def cancel_command(job_id: str, **extra: Any) -> None:
        """Cancel a job: a waiting one is failed at once; a running one is asked to stop
        (job.cancel_requested) and failed as cancelled when its handler returns."""
        (number,) = _job_ids([job_id])
        with engine_for(extra) as engine:
            result = admin.cancel(engine, number)
        if result == "missing":
            click.echo(f"job {number}: no such job", err=True)
            sys.exit(1)
        if result == "cancelled":
            click.echo(f"job {number}: cancelled (moved to the failed jobs)")
        else:
            click.echo(
                f"job {number}: held by a worker, not touched; cancel requested from its "
                "handler (job.cancel_requested)"
            )

    @group.command("purge-failed")
    @options
    @click.option(
        "--older-than",
        required=True,
        help="Purge failed jobs that failed longer ago than this: 7d, 12h, 30m, 0 for all.",
    )
    def purge_command(older_than: str, **extra: Any) -> None:
        """Delete failed jobs for good."""
        age = parse_duration(older_than)
        with engine_for(extra) as engine:
            count = admin.purge_failed(engine, older_than=age)
        click.echo(f"purged {count} failed job(s)")
