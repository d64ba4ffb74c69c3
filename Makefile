# The two commands a new user needs: `make run` (the pipeline on the tiny preset) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test test-fast bench clean test-tools

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing later pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# constraints.txt: the versions the tests passed with (pyproject.toml keeps the ranges that work)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The DVC pipeline (dvc.yaml): every stage in order, skipping those whose inputs did not change.
run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

# Debian packages the tests use: chromium for the browser tests (Playwright's own browser download
# cannot work offline), qemu-user to run int8 graphs on an emulated CPU without VNNI.
test-tools:
	@test -x /usr/bin/chromium -a -x /usr/bin/qemu-x86_64 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium qemu-user >/dev/null; }

LINTED := src tests benchmarks space

test: install test-tools
	$(BIN)/ruff format --check -q $(LINTED)
	$(BIN)/ruff check -q $(LINTED)
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/cache_throughput.py

clean:
	rm -rf outputs
