# The two set-up commands of the README, and the pieces of the second.
#   make demo   a worker pool working sample jobs on a throwaway local PostgreSQL
#   make test   lint, type-check and run the test suite against a real PostgreSQL
#   make test-minimums   the test suite on the declared minimum versions of the dependencies
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck pytest install test-minimums

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
	$(MIN_VENV)/bin/python -m pip freeze --exclude-editable | grep -iE '^(sqlalchemy|psycopg|psycopg-binary|alembic|click|flask|flask-sqlalchemy|flask-migrate)=='
	$(MIN_VENV)/bin/python -m pytest $(PYTEST_ARGS)
