# Two commands for a new user (see README): `make demo` runs the main job end to end on generated phantom data,
# `make test` runs the linters, the type checker and the whole test suite. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= outputs/demo

.PHONY: demo test test-fast lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/chexseg demo --out $(DEMO_OUT)

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# The unit tests only (no Ray cluster, S3 server or slow test): a minute or two while editing. CI runs `make test`.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not cluster and not s3 and not slow"

clean:
	rm -rf $(VENV) outputs .pytest_cache .mypy_cache .ruff_cache
