"""The public surface: which modules and names users import, and what they look like."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
import re
from pathlib import Path

import sqlalchemy_que

#: The modules a user imports; every other module of the package is internal (``_name``).
PUBLIC_MODULES = {
    "sqlalchemy_que.admin",
    "sqlalchemy_que.asyncio",
    "sqlalchemy_que.dashboard",
    "sqlalchemy_que.flask",
    "sqlalchemy_que.pytest_plugin",
    "sqlalchemy_que.schema",
    "sqlalchemy_que.testing",
}

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _modules() -> set[str]:
    package = Path(sqlalchemy_que.__file__).parent
    return {f"sqlalchemy_que.{info.name}" for info in pkgutil.iter_modules([str(package)])}


def test_only_the_documented_modules_are_public() -> None:
    public = {name for name in _modules() if not name.rsplit(".", 1)[1].startswith("_")}
    assert public == PUBLIC_MODULES


def test_every_exported_name_resolves_and_none_is_private() -> None:
    for module_name in ["sqlalchemy_que", *sorted(PUBLIC_MODULES)]:
        module = importlib.import_module(module_name)
        exported = module.__all__
        assert exported == sorted(set(exported), key=exported.index), module_name
        for name in exported:
            assert not name.startswith("_"), f"{module_name}.{name}"
            assert hasattr(module, name), f"{module_name}.{name} is in __all__ but missing"


def test_errors_show_as_members_of_the_package() -> None:
    errors = [
        value
        for value in vars(sqlalchemy_que).values()
        if inspect.isclass(value) and issubclass(value, BaseException)
    ]
    assert len(errors) >= 10
    for error in errors:
        assert error.__module__ == "sqlalchemy_que", error
        assert issubclass(error, sqlalchemy_que.QueError), error


def test_the_version_comes_from_the_package_metadata() -> None:
    assert sqlalchemy_que.__version__ == importlib.metadata.version("sqlalchemy-que")


def test_docs_never_send_users_to_an_internal_module() -> None:
    """Examples and prose name public modules only (``_migrations`` is a folder Alembic
    reads, not a module to import)."""
    internal = re.compile(r"sqlalchemy_que\._(?!migrations\b)\w+")
    offenders = []
    for page in [*DOCS.glob("*.md"), DOCS.parent / "README.md", *DOCS.glob("examples/*.py")]:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if internal.search(line):
                offenders.append(f"{page.name}:{number}: {line.strip()}")
    assert offenders == []
