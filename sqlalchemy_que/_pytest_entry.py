"""The ``pytest11`` entry point: only options, and the opt-in.

Installing sqlalchemy-que makes pytest load this module in every project, so it adds
nothing but the plugin's options; the fixtures come with
:mod:`sqlalchemy_que.pytest_plugin`, loaded only when a project asks for it
(``-p sqlalchemy_que.pytest_plugin``, ``pytest_plugins = ["sqlalchemy_que.pytest_plugin"]``
in a conftest, or ``que_plugin = true`` in its pytest configuration).
"""

from __future__ import annotations

import pytest

PLUGIN = "sqlalchemy_que.pytest_plugin"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "sqlalchemy-que", "sqlalchemy-que (with -p sqlalchemy_que.pytest_plugin)"
    )
    group.addoption(
        "--que-database-url",
        dest="que_database_url",
        default=None,
        help="the PostgreSQL the que_* fixtures use (its jobs tables are migrated); default: "
        "$QUE_TEST_DATABASE_URL, else a throwaway server for the test session",
    )
    parser.addini("que_database_url", "the PostgreSQL the que_* fixtures use", default="")
    parser.addini(
        "que_plugin",
        "load sqlalchemy_que.pytest_plugin (its que_* fixtures)",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getini("que_plugin"):
        config.pluginmanager.import_plugin(PLUGIN)
