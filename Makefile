# Every target installs what it needs into .venv; re-running is quick when
# pyproject.toml has not changed (the install is skipped by a stamp file).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=
# Test processes (pytest-xdist), each taking whole files: 0 runs the suite in this process.
TEST_WORKERS ?= 2

.PHONY: install test demo bench lint clean clean-workspace

install: $(STAMP)

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# pip byte-compiles what it installs on one core (about a minute here); compileall does the
# same on every core. The .pyc files matter: this environment may set PYTHONDONTWRITEBYTECODE,
# so a module without one would be compiled again in every process that imports it.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev]'
	$(BIN)/python -m compileall -qq -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
	@touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/chestxpert demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layers.py

# Build and tool caches only: the workspace (.chestxpert: sweeps, the MLflow database,
# reports, prepared data) is never touched by `clean`.
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info

# Deletes the workspace, after stopping its services. Explicit on purpose:
# `make clean-workspace CONFIRM=yes`.
clean-workspace:
	@if [ "$(CONFIRM)" != "yes" ]; then \
	  echo "this deletes .chestxpert (sweeps, MLflow runs, reports, prepared data);"; \
	  echo "run: make clean-workspace CONFIRM=yes"; exit 2; fi
	@if [ -x $(BIN)/chestxpert ]; then $(BIN)/chestxpert down; fi
	rm -rf .chestxpert
