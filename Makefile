# Parley — one Makefile for the whole workspace. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := python3 -m uv
endif
PY := .venv/bin/python
SERVICES := auth llm jobs gateway
PYTEST_ARGS ?=

.PHONY: help install system-deps run test test-unit test-observability test-integration bench bench-smoke soak lint fmt clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-18s %s\n", $$1, $$2}'

install: ## Create .venv with every service, the kit and the dev tools (from uv.lock)
	@$(UV) --version >/dev/null 2>&1 || { echo "Installing uv (the workspace's package manager) ..."; \
		python3 -m pip install --quiet uv; }
	@# Bytecode compiled once, here, as the images do (UV_COMPILE_BYTECODE): with PYTHONDONTWRITEBYTECODE set, every
	@# process would otherwise compile each module it imports at every start (slower, and ~15% more RSS per process).
	@$(UV) sync --locked --quiet --compile-bytecode
	@$(PY) -m compileall -q -j 0 libs services tools bench

system-deps: ## Install the system tools the tests use (docker-compose, prometheus/promtool, nginx, wrk)
	@command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || \
		{ echo "Installing docker-compose (Debian) for static compose validation ..."; \
		  (apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null) || \
		  echo "warning: could not install docker-compose"; }
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || \
		{ echo "Installing prometheus (Debian: promtool and the server for the live scrape test) ..."; \
		  (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null) || \
		  echo "warning: could not install prometheus"; }
	@command -v nginx >/dev/null 2>&1 && command -v wrk >/dev/null 2>&1 || \
		{ echo "Installing nginx-light and wrk (Debian: the benchmark's floor and load generator) ..."; \
		  (apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx-light wrk >/dev/null) || \
		  echo "warning: could not install nginx/wrk"; }

run: install ## Run the whole platform locally (SQLite, local RabbitMQ, fake provider); Ctrl-C stops it
	@$(PY) -m parley_platform

test: install system-deps ## Run every test: unit, service, integration (real PostgreSQL, RabbitMQ, Redis), deploy checks
	@$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install ## Only the fast tests (no integration tier)
	@$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

test-observability: install system-deps ## Only the observability checks (live Prometheus, dashboards, shipped ECS logs)
	@$(PY) -m pytest tests/integration/test_observability.py $(PYTEST_ARGS)

test-integration: install ## Only tests/integration (the whole platform as real processes)
	@$(PY) -m pytest tests/integration $(PYTEST_ARGS)

bench: install ## Benchmarks (issue #8): nginx + fake provider + the platform on fresh PostgreSQL databases -> bench/results/
	@$(PY) -m bench $(BENCH_ARGS)

bench-smoke: install ## The benchmark harness in about a minute (every scenario, minimal sizes) -> bench/results/tmp/
	@$(PY) -m bench --smoke $(BENCH_ARGS)

soak: install ## Ten minutes of mixed load through the gateway (issue #9): errors, RSS and connection counts -> bench/results/soak/
	@$(PY) -m bench.soak $(SOAK_ARGS)

lint: install ## ruff lint and format check
	@$(PY) -m ruff check .
	@$(PY) -m ruff format --check .

fmt: install ## ruff format and autofix
	@$(PY) -m ruff format .
	@$(PY) -m ruff check --fix .

clean: ## Remove local state (.run: SQLite files, logs, dev secrets) and caches
	rm -rf .run .pytest_cache .ruff_cache
