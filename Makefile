# Everything sets itself up: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One stamp per set of extras: `make demo` installs only the product and the demo extra.
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test

.PHONY: all install demo test test-fast lint bench clean

all: test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[demo]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[demo,test]'
	touch $@ $(DEMO_STAMP)

install: $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/relay demo

lint: $(TEST_STAMP)
	$(BIN)/ruff check relay gateway relay_dev tests
	$(BIN)/ruff format --check relay gateway relay_dev tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -ra $(PYTEST_ARGS)

test-fast: $(TEST_STAMP)
	$(BIN)/pytest -q -x -m "not slow and not interop" $(PYTEST_ARGS)

bench: $(TEST_STAMP)
	$(BIN)/python -m tests.bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
