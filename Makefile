PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test test-slow test-all demo lint bench clean

setup: $(STAMP)

# Re-install only when the declared dependencies change; safe to re-run.
$(STAMP): setup.py requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24" wheel setuptools
	$(BIN)/pip install -q -c requirements.lock "torch==2.13.0"
	$(BIN)/pip install -q -c requirements.lock -e ".[dev]"
	$(BIN)/pip check
	@touch $(STAMP)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=12 -m "not slow" tests

test-slow: setup
	$(BIN)/python -m pytest -q -m slow tests

test-all: test test-slow

lint: setup
	$(BIN)/ruff check .

demo: setup
	$(BIN)/lida demo

bench: setup
	$(BIN)/python benchmarks/model_speed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
