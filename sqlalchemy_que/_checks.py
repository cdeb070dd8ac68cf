"""The checks on a job's fields, shared by enqueueing and by job declarations.

Both :mod:`sqlalchemy_que.enqueue` and :mod:`sqlalchemy_que.jobs` use these, so neither needs
the other to check a field (the arguments' checks live in :mod:`sqlalchemy_que._json`). Each
check returns the value it accepts, or raises :class:`~sqlalchemy_que.InvalidJobError` naming
the field and the value, before anything is sent.
"""

from __future__ import annotations

import datetime
import math

from ._errors import InvalidJobError

SMALLINT_MIN, SMALLINT_MAX = -32768, 32767

#: The longest ``queue`` and ``job_class``, in characters. The queue is part of the primary
#: key, whose index entries PostgreSQL limits to about 2,700 bytes: 500 characters are at
#: most 2,000 bytes of UTF-8, which leaves room for the rest of the key. ``job_class`` has the
#: same limit: it names a job (a class name), it is not a place for data.
MAX_NAME_LENGTH = 500

_UTC = datetime.timezone.utc

#: The earliest and latest ``run_at`` accepted (both included). Python's ``datetime`` stops at
#: the years 1 and 9999: a time within a day of those, written in one time zone, cannot be
#: read back in another (the database sends ``run_at`` in its session's time zone), and a row
#: that cannot be read blocks its whole queue. The range keeps centuries of margin.
RUN_AT_MIN = datetime.datetime(1900, 1, 1, tzinfo=_UTC)
RUN_AT_MAX = datetime.datetime(9000, 1, 1, tzinfo=_UTC)

#: The longest ``run_in``: a hundred years, which keeps ``now() + run_in`` inside the range.
RUN_IN_MAX = datetime.timedelta(days=36525)


class JobDefaults:
    """What enqueueing needs to know of a declared job: its name and default fields.

    :class:`~sqlalchemy_que.JobDefinition` derives from it, so that :func:`~sqlalchemy_que.
    enqueue` can take a definition without importing :mod:`sqlalchemy_que.jobs` (which
    imports enqueue).
    """

    __slots__ = ()

    name: str
    queue: str | None
    priority: int | None
    run_at: datetime.datetime | None
    run_in: datetime.timedelta | float | None


def check_text(
    field: str, value: object, *, allow_empty: bool, max_length: int = MAX_NAME_LENGTH
) -> str:
    """Return ``value`` if it is text PostgreSQL's ``text`` holds, at most ``max_length``
    characters long."""
    if not isinstance(value, str):
        raise InvalidJobError(
            f"{field} must be a str, got {value!r} of type {type(value).__name__}"
        )
    if not allow_empty and not value:
        raise InvalidJobError(f"{field} must be a non-empty str naming the job, got {value!r}")
    if len(value) > max_length:
        reason = (
            "it is part of que_jobs' primary key, whose index entries PostgreSQL limits"
            if field == "queue"
            else "it names a job; pass data as the job's arguments"
        )
        raise InvalidJobError(
            f"{field} {value[:40]!r}... is {len(value)} characters long; at most {max_length} "
            f"are allowed ({reason})"
        )
    if "\x00" in value:
        raise InvalidJobError(f"{field} {value!r} contains a NUL character, which text cannot hold")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Found here, not by the driver halfway through a COPY that aborts the transaction.
        raise InvalidJobError(
            f"{field} {value!r} is not valid UTF-8 text (lone surrogate)"
        ) from None
    return value


def check_job_class(value: object) -> str:
    """Return ``value`` if it is a valid ``job_class``."""
    return check_text("job_class", value, allow_empty=False)


def check_queue(value: object) -> str:
    """Return ``value`` if it is a valid queue name (``''`` is the default queue)."""
    return check_text("queue", value, allow_empty=True)


def check_priority(priority: object) -> int:
    """Return ``priority`` if it is an int in PostgreSQL's smallint range, else raise."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidJobError(
            f"priority must be an int, got {priority!r} of type {type(priority).__name__}"
        )
    if not SMALLINT_MIN <= priority <= SMALLINT_MAX:
        raise InvalidJobError(
            f"priority {priority} is outside the smallint range "
            f"{SMALLINT_MIN}..{SMALLINT_MAX} (lower numbers run first; the default is 100)"
        )
    return priority


def check_run_at(run_at: object) -> datetime.datetime:
    """Return ``run_at`` if it is an aware datetime within :data:`RUN_AT_MIN` ..
    :data:`RUN_AT_MAX`."""
    if not isinstance(run_at, datetime.datetime):
        raise InvalidJobError(
            f"run_at must be a timezone-aware datetime, got {run_at!r} "
            f"of type {type(run_at).__name__}"
        )
    if run_at.tzinfo is None or run_at.utcoffset() is None:
        raise InvalidJobError(
            f"run_at {run_at.isoformat()} has no time zone; pass an aware datetime such as "
            "datetime.now(timezone.utc) + timedelta(minutes=5)"
        )
    # Compared, not converted: converting datetime.min at +03:00 to UTC would overflow.
    if not RUN_AT_MIN <= run_at <= RUN_AT_MAX:
        raise InvalidJobError(
            f"run_at {run_at.isoformat()} is outside {RUN_AT_MIN:%Y-%m-%d} .. "
            f"{RUN_AT_MAX:%Y-%m-%d} UTC, the range every client can read back in any time "
            "zone; leave run_at out to run the job now, or pick a time inside the range"
        )
    return run_at


def check_run_in(run_in: object) -> datetime.timedelta:
    """Return ``run_in`` (a ``timedelta``, or seconds as an int or float) as a ``timedelta``
    if it is finite, not negative and at most :data:`RUN_IN_MAX`."""
    if isinstance(run_in, datetime.timedelta):
        delay = run_in
    elif isinstance(run_in, int | float) and not isinstance(run_in, bool):
        if not math.isfinite(run_in):
            raise InvalidJobError(f"run_in must be a finite number of seconds, got {run_in!r}")
        if abs(run_in) > RUN_IN_MAX.total_seconds():  # before timedelta() could overflow
            raise _run_in_too_long(run_in)
        delay = datetime.timedelta(seconds=run_in)
    else:
        raise InvalidJobError(
            f"run_in must be a datetime.timedelta or a number of seconds, got {run_in!r} "
            f"of type {type(run_in).__name__}"
        )
    if delay < datetime.timedelta(0):
        raise InvalidJobError(f"run_in must not be negative, got {run_in!r}")
    if delay > RUN_IN_MAX:
        raise _run_in_too_long(run_in)
    return delay


def _run_in_too_long(run_in: object) -> InvalidJobError:
    return InvalidJobError(
        f"run_in {run_in!r} is longer than {RUN_IN_MAX.days} days (100 years); "
        "pass run_at for a fixed time far ahead"
    )


def check_schedule(
    run_at: object, run_in: object
) -> tuple[datetime.datetime | None, datetime.timedelta | None]:
    """Check ``run_at`` and ``run_in``, of which at most one may be given (not None)."""
    if run_at is not None and run_in is not None:
        raise InvalidJobError(
            f"give run_at or run_in, not both (got run_at={run_at!r} and run_in={run_in!r})"
        )
    return (
        None if run_at is None else check_run_at(run_at),
        None if run_in is None else check_run_in(run_in),
    )
