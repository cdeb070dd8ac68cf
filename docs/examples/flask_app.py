"""A small Flask + Flask-SQLAlchemy app whose requests enqueue jobs with their own data.

``POST /signup`` creates a user and enqueues ``SendWelcomeEmail`` for it in the request's
transaction: both rows are committed together. ``POST /signups`` creates several users and
their jobs, and fails (400) on the first bad address after adding the earlier ones: nothing is
committed, neither users nor jobs. The job's handler writes through ``db.session``, and that
write is committed with the job's completion::

    flask --app "docs.examples.flask_app:create_app('postgresql+psycopg://localhost/app')" \\
        que migrate
    flask --app "docs.examples.flask_app:create_app('postgresql+psycopg://localhost/app')" \\
        que worker

(``db.create_all()`` in an app context creates the ``users`` table.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import Blueprint, Flask, abort, current_app, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_que import JobContext, JobRegistry
from sqlalchemy_que.flask import Que

#: How mail is sent: ``send_mail(to, subject)``; raising means the mail was not sent.
SendMail = Callable[[str, str], None]


class Base(DeclarativeBase):
    pass


class User(Base):
    # A plain declarative model: it type-checks, which ``class User(db.Model)`` does not
    # under mypy; Flask-SQLAlchemy's db.session and db.create_all() work with it the same.
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    welcomed: Mapped[bool] = mapped_column(default=False)


db = SQLAlchemy(metadata=Base.metadata)
jobs = JobRegistry()
que = Que(db=db, handlers=jobs)
signup_views = Blueprint("signup", __name__)


@jobs.job("SendWelcomeEmail", priority=10)
def send_welcome_email(job: JobContext, user_id: int) -> None:
    """Mark the user welcomed and send the mail. Committed with the job's deletion; if
    sending raises, ``welcomed`` is rolled back and the job retried later."""
    user = db.session.get(User, user_id)
    if user is None:  # deleted since: nothing to do
        return
    user.welcomed = True
    db.session.commit()  # flushes only: the worker commits with the job's DELETE
    send_mail: SendMail = current_app.extensions["send_mail"]
    send_mail(user.email, "Welcome!")


def print_mail(to: str, subject: str) -> None:
    print(f"mail to {to}: {subject}")


def _add_user(email: str) -> User:
    if "@" not in email:
        abort(400, f"not an email address: {email!r}")
    user = User(email=email)
    db.session.add(user)
    db.session.flush()  # assigns user.id
    db.session.add(send_welcome_email.enqueue(user.id))
    return user


@signup_views.post("/signup")
def signup() -> tuple[dict[str, Any], int]:
    user = _add_user(request.get_json()["email"])
    db.session.commit()  # the user and its job, together
    return {"id": user.id}, 201


@signup_views.post("/signups")
def signups() -> tuple[dict[str, Any], int]:
    users = [_add_user(email) for email in request.get_json()["emails"]]
    db.session.commit()  # not reached when an address is bad: nothing is committed
    return {"ids": [user.id for user in users]}, 201


def create_app(
    database_url: str,
    *,
    send_mail: SendMail = print_mail,
    config: Mapping[str, Any] | None = None,
) -> Flask:
    """The app on ``database_url`` (``postgresql+psycopg://...``); ``config`` adds to or
    overrides the defaults (``QUE_WORKER_COUNT``, ``SQLALCHEMY_ENGINE_OPTIONS``...)."""
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        # One connection per worker thread for the whole of each job, and room for the rest.
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 5, "pool_pre_ping": True},
        QUE_WORKER_COUNT=2,
    )
    app.config.update(config or {})
    app.extensions["send_mail"] = send_mail
    db.init_app(app)
    que.init_app(app)
    app.register_blueprint(signup_views)
    return app
