"""A registry with schedules, for ``sqlalchemy-que schedules tests.schedule_handlers:registry``."""

from __future__ import annotations

from sqlalchemy_que import JobContext, JobRegistry, cron, every

registry = JobRegistry()


@registry.job("Nightly", schedule=cron("30 2 * * *", timezone="Europe/Paris", missed="latest"))
def nightly(job: JobContext) -> None:
    """Runs at 02:30, Paris time."""


registry.schedule("Ping", every(30), args=["hello"])
