"""Write docs/api.md from the public docstrings.

Run ``python docs/api_reference.py > docs/api.md`` after changing a public docstring; the test
suite fails while docs/api.md differs from what this prints.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from typing import Any

#: (module, names) in the order they appear; None means the module's ``__all__``.
SECTIONS: list[tuple[str, str, list[str] | None]] = [
    ("sqlalchemy_que", "The package", None),
    (
        "sqlalchemy_que.schema",
        "Schema and migrations (sqlalchemy_que.schema)",
        [
            "schema_version",
            "migrations_path",
            "version_location",
            "downgrade",
            "migrate_sql",
            "include_object",
            "process_revision_directives",
            "VERSION_TABLE",
        ],
    ),
    ("sqlalchemy_que.admin", "Operations (sqlalchemy_que.admin)", None),
    ("sqlalchemy_que.testing", "Testing (sqlalchemy_que.testing)", None),
    ("sqlalchemy_que.pytest_plugin", "pytest plugin (sqlalchemy_que.pytest_plugin)", ["Drain"]),
    ("sqlalchemy_que.flask", "Flask (sqlalchemy_que.flask)", None),
    ("sqlalchemy_que.dashboard", "Web dashboard (sqlalchemy_que.dashboard)", None),
    ("sqlalchemy_que.asyncio", "asyncio (sqlalchemy_que.asyncio)", None),
]


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _signature(name: str, obj: Any) -> str:
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def _own_methods(cls: type) -> Iterator[tuple[str, Any]]:
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        if name == "__init__":
            continue  # the class signature shows it
        if isinstance(member, property):
            yield name, member
        elif inspect.isfunction(member) or isinstance(member, staticmethod | classmethod):
            yield name, getattr(cls, name)


def _entry(name: str, obj: Any) -> list[str]:
    lines: list[str] = []
    if inspect.isclass(obj):
        kind = "exception" if issubclass(obj, BaseException) else "class"
        lines += [f"### {kind} `{_signature(name, obj)}`", ""]
        if _doc(obj):
            lines += ["```text", _doc(obj), "```", ""]
        for method_name, member in _own_methods(obj):
            if isinstance(member, property):
                lines += [
                    f"- property `{method_name}`"
                    + (f": {_doc(member).splitlines()[0]}" if _doc(member) else "")
                ]
            else:
                first = _doc(member).split("\n\n")[0].replace("\n", " ")
                lines += [
                    f"- `{_signature(method_name, member)}`" + (f": {first}" if first else "")
                ]
        lines.append("")
    elif callable(obj):
        lines += [f"### `{_signature(name, obj)}`", ""]
        if _doc(obj):
            lines += ["```text", _doc(obj), "```", ""]
    else:
        lines += [f"### `{name}` = `{obj!r}`", ""]
    return lines


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `docs/api_reference.py`; do not edit by hand.",
        "",
        "The public API is the names below: the package's own, and those of the modules",
        "`sqlalchemy_que.schema`, `.admin`, `.testing`, `.pytest_plugin`, `.flask`,",
        "`.dashboard` and `.asyncio`. Modules whose names begin with an underscore are internal",
        "and may change in any release; loggers keep their names (`sqlalchemy_que.worker`, ...).",
        "",
    ]
    for module_name, title, names in SECTIONS:
        module = importlib.import_module(module_name)
        lines += [f"## {title}", ""]
        if _doc(module):
            lines += [_doc(module).split("\n\n")[0].replace("\n", " "), ""]
        for name in names if names is not None else list(module.__all__):
            lines += _entry(name, getattr(module, name))
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
