# The two commands a new user needs: `make run` (the pipeline on the tiny preset) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test run test test-fast bench clean test-tools

# pip compiles each package's bytecode on one core as it installs it (half the install's time);
# compileall does it once at the end on every core. A file or two in site-packages is written for a
# newer Python and fails to compile, under pip too: hence `|| true`.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing later pulls a multi-GB CUDA build.
	$(BIN)/pip install -q --no-compile torch==2.13.0
	# constraints.txt: the versions the tests passed with (pyproject.toml keeps the ranges that work)
	$(BIN)/pip install -q --no-compile -c constraints.txt -e .
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

# The test tools (pytest, ruff, the S3 server, the browser driver, DeepSpeed) only for `make test`.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q --no-compile -c constraints.txt -e '.[test]'
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# The DVC pipeline (dvc.yaml): every stage in order, skipping those whose inputs did not change.
run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

# Debian packages the tests use: chromium for the browser tests (Playwright's own browser download
# cannot work offline), qemu-user to run int8 graphs on an emulated CPU without VNNI.
test-tools:
	@test -x /usr/bin/chromium -a -x /usr/bin/qemu-x86_64 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium qemu-user >/dev/null; }

LINTED := src tests benchmarks space

# One pytest-xdist worker per core, each on cores of its own (tests/conftest.py): much of the suite
# waits on subprocess start-up and servers, not on arithmetic. A worker that runs out of tests takes
# some of the other's (worksteal), so one long file does not leave a core idle at the end.
PYTEST := $(BIN)/pytest -q -n auto --dist worksteal

test: install-test test-tools
	$(BIN)/ruff format --check -q $(LINTED)
	$(BIN)/ruff check -q $(LINTED)
	$(PYTEST)

test-fast: install-test
	$(PYTEST) -m "not slow"

bench: install
	$(BIN)/python benchmarks/cache_throughput.py

clean:
	rm -rf outputs
