# Two set-up-and-go targets for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/leukoflow demo --out demo-output

# The dashboard test opens the page in Debian's headless Chromium; install it once if missing.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

chromium:
	@[ -x $(CHROMIUM) ] || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# Two pytest workers, one test file at a time each (module fixtures are built once): most tests
# wait on process start-ups (Python, TensorFlow, Ray, Prefect) with one core busy. One Prefect
# and one moto server serve the whole run; tests/conftest.py keeps the files that share a session
# fixture on one worker and hands out the longest first. docs/testing.md has the timings; the
# ten slowest tests are printed at the end.
test: $(VENV)/.installed-dev chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=10

# Throughput harness (docs/benchmarks.md has the full measurement's options), e.g.
#   make bench BENCH_ARGS="--n 256 --source DIR --join-calibration"
BENCH_ARGS ?=
bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf demo-output .pytest_cache
