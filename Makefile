# Everything sets itself up: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One stamp per set of extras: `make demo` installs only the product and the demo extra.
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
# The OHIF viewer's dist (`relay viewer install`: pinned version and hash, not committed),
# in the platform's data dir; made again when the pin changes.
VIEWER_STAMP := $(VENV)/.installed-viewer

.PHONY: all install demo test test-fast test-portable lint bench clean

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

$(VIEWER_STAMP): relay/workstation/viewer/pin.py | $(DEMO_STAMP)
	$(BIN)/relay viewer install
	touch $@

install: $(TEST_STAMP) $(VIEWER_STAMP)

demo: $(DEMO_STAMP) $(VIEWER_STAMP)
	$(BIN)/relay demo

lint: $(TEST_STAMP)
	$(BIN)/ruff check relay gateway relay_dev tests
	$(BIN)/ruff format --check relay gateway relay_dev tests
	$(BIN)/mypy

test: lint $(VIEWER_STAMP)
	$(BIN)/pytest -q -ra $(PYTEST_ARGS)
	$(MAKE) test-portable

# The workstation's and enrollment's tests again, in processes that look like the
# radiologist's Windows PC: no uvloop, no SIGHUP, no loop signal handlers, no chmod in
# our code (tests/portable/sitecustomize.py; child processes inherit it).
PORTABLE_TESTS := tests/workstation tests/trust/test_enroll.py tests/trust/test_renewal.py \
	tests/ops/test_portable.py tests/ops/test_control.py tests/e2e/test_enrollment_e2e.py \
	tests/e2e/test_forwarding_e2e.py

test-portable: $(TEST_STAMP)
	RELAY_PORTABLE_LANE=1 PYTHONPATH=tests/portable $(BIN)/pytest -q -ra -p no:cacheprovider \
		$(PYTEST_ARGS) $(wildcard $(PORTABLE_TESTS))

test-fast: $(TEST_STAMP)
	$(BIN)/pytest -q -x -m "not slow and not interop" $(PYTEST_ARGS)

bench: $(TEST_STAMP) $(VIEWER_STAMP)
	$(BIN)/python -m tests.bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
