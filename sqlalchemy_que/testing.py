"""A throwaway PostgreSQL for tests, demos and benchmarks.

:func:`temporary_postgres` starts a private PostgreSQL cluster from the server binaries
installed on the machine (``initdb``, ``pg_ctl``), listening on a free port of 127.0.0.1, and
removes it afterwards. Run as root, it runs the server as an unprivileged user (``postgres`` if
that user exists, else ``nobody``), because PostgreSQL refuses to run as root::

    from sqlalchemy import create_engine
    from sqlalchemy_que.testing import temporary_postgres

    with temporary_postgres() as url:
        engine = create_engine(url)
        ...

:func:`test_database_url` is what the test suite uses to find a server: the
``QUE_TEST_DATABASE_URL`` environment variable when set, else a PostgreSQL container through
testcontainers when a Docker engine answers, else :func:`temporary_postgres`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from .errors import QueError

__all__ = [
    "PostgresNotFoundError",
    "find_postgres_bindir",
    "temporary_postgres",
    "test_database_url",
]

#: Settings for a throwaway cluster: durability is not needed, speed is.
_FAST_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


class PostgresNotFoundError(QueError):
    """No PostgreSQL server binaries (``initdb`` and ``pg_ctl``) were found on this machine."""


def find_postgres_bindir() -> Path:
    """Return the folder holding ``initdb`` and ``pg_ctl``.

    Looked for, in order: ``$QUE_PG_BINDIR``; ``initdb`` on ``PATH``; ``pg_config --bindir``;
    the newest ``/usr/lib/postgresql/*/bin`` (Debian, Ubuntu); ``/usr/pgsql-*/bin`` (RHEL).

    :raises PostgresNotFoundError: when none of them has the binaries.
    """
    candidates: list[Path] = []
    if os.environ.get("QUE_PG_BINDIR"):
        candidates.append(Path(os.environ["QUE_PG_BINDIR"]))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))

    def version_key(path: str) -> tuple[int, ...]:
        digits = "".join(ch if ch.isdigit() else " " for ch in path).split()
        return tuple(int(d) for d in digits)

    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin"):
        candidates.extend(
            Path(p) for p in sorted(glob.glob(pattern), key=version_key, reverse=True)
        )
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PostgresNotFoundError(
        "no PostgreSQL server binaries found (looked for initdb and pg_ctl in $QUE_PG_BINDIR, "
        "PATH, pg_config --bindir and /usr/lib/postgresql/*/bin); install the server package "
        "(Debian: apt-get install postgresql) or pass a database URL"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as, or None when not running as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresNotFoundError(
        "running as root and neither a 'postgres' nor a 'nobody' user exists to run the server"
    )


@contextlib.contextmanager
def temporary_postgres(
    *, bindir: Path | None = None, settings: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Start a private PostgreSQL cluster and yield its SQLAlchemy URL; remove it on exit.

    The URL names the ``postgres`` database and superuser, with trust authentication on
    127.0.0.1 only.

    :param bindir: the folder of ``initdb`` and ``pg_ctl``; default :func:`find_postgres_bindir`.
    :param settings: server settings added to (or overriding) the fast, non-durable defaults
        (``fsync=off``, ``synchronous_commit=off``, ``max_connections=200``...).
    :raises PostgresNotFoundError: when no server binaries are found.
    :raises QueError: when the cluster cannot be created or started (the server log is quoted).
    """
    bindir = bindir or find_postgres_bindir()
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="sqlalchemy-que-pg-"))
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    sockets.mkdir()
    run_as: dict[str, object] = {}
    if user is not None:
        for path in (root, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = {**os.environ, "LC_ALL": "C", "PGTZ": "UTC"}
    if user is not None:
        env["HOME"] = str(root)

    def run(*argv: str) -> None:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            timeout=120,
            **run_as,  # type: ignore[call-overload]
        )
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise QueError(
                f"{Path(argv[0]).name} failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}{tail}"
            )

    started = False
    try:
        run(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        options = {**_FAST_SETTINGS, **(settings or {})}
        for attempt in range(3):
            port = _free_port()
            server_options = " ".join(
                [f"-p {port}", "-c listen_addresses=127.0.0.1", f"-k {sockets}"]
                + [f"-c {key}={value}" for key, value in options.items()]
            )
            try:
                run(
                    str(bindir / "pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-o",
                    server_options,
                )
            except QueError:
                if attempt == 2:
                    raise
                continue
            started = True
            break
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            with contextlib.suppress(QueError, subprocess.SubprocessError):
                run(str(bindir / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data))
        shutil.rmtree(root, ignore_errors=True)


def _docker_answers() -> bool:
    """True when a Docker engine answers ``GET /_ping`` within a couple of seconds.

    Only the usual local Unix socket (or a ``unix://`` ``DOCKER_HOST``) is probed; a remote
    ``tcp://`` engine is taken at its word and tried by testcontainers itself.
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return bool(host)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(host.removeprefix("unix://"))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.") and b" 200 " in reply


@contextlib.contextmanager
def test_database_url() -> Iterator[str]:
    """Yield the URL of a PostgreSQL server for the test suite.

    In order: ``$QUE_TEST_DATABASE_URL``; a testcontainers PostgreSQL when a Docker engine
    answers; a :func:`temporary_postgres` cluster. Never skips: when none can be had it raises.
    """
    url = os.environ.get("QUE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg") as container:
            yield container.get_connection_url()
        return
    with temporary_postgres() as url:
        yield url
