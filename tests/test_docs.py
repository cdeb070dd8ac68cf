"""The documentation's code runs: every ```python block of README.md and docs/*.md is
executed, page by page, in order, in one namespace holding ``database_url`` (a fresh, empty
database for each page). Blocks fenced ```py are fragments shown for reading only (an
``env.py`` excerpt, say); ```console and ```ini blocks are not Python.

docs/api.md must match what docs/api_reference.py generates from the docstrings.
"""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(page: Path) -> list[str]:
    return PYTHON_BLOCK.findall(page.read_text(encoding="utf-8"))


def test_the_documentation_has_code_to_run() -> None:
    with_code = [page.name for page in PAGES if python_blocks(page)]
    assert {"README.md", "quickstart.md", "enqueueing.md", "jobs.md", "workers.md"} <= set(
        with_code
    )


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_every_python_block_of_the_page_runs(page: Path, empty_database_url: str) -> None:
    namespace: dict[str, object] = {"database_url": empty_database_url, "__name__": "docs"}
    try:
        for number, block in enumerate(python_blocks(page), start=1):
            # dont_inherit: the block must not see this file's __future__ imports.
            code = compile(block, f"{page.name} (python block {number})", "exec", dont_inherit=True)
            exec(code, namespace)  # noqa: S102  (our own documentation)
    finally:
        for value in namespace.values():
            if isinstance(value, Engine):  # a page need not dispose of its engine
                value.dispose()


def test_the_api_reference_is_up_to_date() -> None:
    generated = runpy.run_path(str(ROOT / "docs" / "api_reference.py"))["render"]()
    current = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert current == generated, "run: python docs/api_reference.py > docs/api.md"


def test_every_relative_link_in_the_docs_points_to_a_file() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert broken == []


def test_the_readme_names_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme
    assert "make test" in readme
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    # CI runs the README's test command as one of its make steps.
    assert (
        re.search(r"^step test(\s|$)", ci, re.MULTILINE) and 'make --no-print-directory "$1"' in ci
    )
    assert re.search(r"^test:", makefile, re.MULTILINE)
    assert re.search(r"^demo:", makefile, re.MULTILINE)
    assert (
        subprocess.run([sys.executable, "-c", "import sqlalchemy_que._cli"], check=False).returncode
        == 0
    )
