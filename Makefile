# sagaplatform: `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
QUEUES ?= orchestrator,inventory,payments,orders,shipping,notifications
CONCURRENCY ?= 4
PYTEST_ARGS ?=
# Every process of this host (web, workers and their pool children, beat) writes its metric
# samples here; /metrics merges them (docs/OPERATIONS.md, "Metrics").
PROMETHEUS_MULTIPROC_DIR ?= $(CURDIR)/var/prometheus
export PROMETHEUS_MULTIPROC_DIR
# pytest-xdist workers for `make test-fast` (each with its own test databases); 0: in the pytest process.
TEST_WORKERS ?= auto
# Bytecode is cached (__pycache__/, ignored by git) even where the environment says not to:
# without it every process (each xdist worker, each worker or server a test starts) compiles
# the project again, 0.35 s of CPU each here, and pytest rewrites every test module's asserts.
unexport PYTHONDONTWRITEBYTECODE

.DEFAULT_GOAL := help
.PHONY: help install install-dev run test test-fast lint format bench bench-styles bench-feed bench-search ramp simulate audit web worker workers beat setup migrations clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.run-deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	@touch $@

$(VENV)/.dev-deps: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	@touch $@ $(VENV)/.run-deps

install: $(VENV)/.run-deps ## Create the virtualenv and install the pinned runtime dependencies

install-dev: $(VENV)/.dev-deps ## Install the runtime and development dependencies

setup: install ## Create (PostgreSQL) and migrate every service database
	$(BIN)/python manage.py setup_databases

run: setup ## Set up and serve the platform with demo data on http://127.0.0.1:$(PORT) (embedded by default)
	$(BIN)/python manage.py seed_demo
	$(BIN)/python manage.py serve --port $(PORT)

# The whole suite: the fast tier on TEST_WORKERS xdist workers; then the slow tiers (real processes,
# browsers) on as many, each worker with its own databases, Redis database and var/
# (tests/xdist_env.py), the browser tests together on one (one stack, one Chromium); then the
# `serial` tests (the chaos tier, the simulations) in one process, one at a time: they restart
# PostgreSQL, time recoveries, or open most of its connections. With PYTEST_ARGS (a path, `-m e2e`,
# `-k ...`), one run in one process of what they select.
test: install-dev ## Run the whole suite (on PostgreSQL + Redis + real workers when reachable)
	@eval "$$($(BIN)/python -m tests.services)" && \
	if [ -n "$(PYTEST_ARGS)" ]; then $(BIN)/python -m pytest $(PYTEST_ARGS); else \
	  $(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS); fast=$$?; \
	  $(BIN)/python -m pytest -m "slow and not serial" -n $(TEST_WORKERS) --dist loadgroup; slow=$$?; \
	  $(BIN)/python -m pytest -m serial; serial=$$?; \
	  echo "make test: fast tier exit $$fast, slow tiers exit $$slow, serial tests exit $$serial"; \
	  [ $$fast -eq 0 ] && [ $$slow -eq 0 ] && [ $$serial -eq 0 ]; fi

test-fast: install-dev ## The fast tier: every test that starts no process or browser (-m "not slow"), on TEST_WORKERS xdist workers
	@eval "$$($(BIN)/python -m tests.services)" && $(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: install-dev ## Lint, check formatting, type-check (mypy), check migrations and saga definition versions (needs the database)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/python manage.py check --database default

format: install-dev ## Fix lint findings and format the code
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

BENCH_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/sagabench
BENCH_REDIS_URL ?= redis://127.0.0.1:6379/14
# One order at a time: the latency of each style's shape, not of queueing.
STYLES_ARGS ?= -n 20 -c 1 --latency-ms 50
# The benchmarks measure production's configuration: debug off (no query log kept per statement).
BENCH_ENV = DJANGO_DEBUG=$${DJANGO_DEBUG:-0} DJANGO_SECRET_KEY=$${DJANGO_SECRET_KEY:-bench-only-not-a-secret-0123456789abcdefghij}
bench: install-dev ## Benchmark orders/s and latency against a bare Celery chain (PostgreSQL + Redis; BENCH_ARGS="-n 500 -c 32")
	@export DATABASE_URL=$(BENCH_DATABASE_URL) REDIS_URL=$(BENCH_REDIS_URL) $(BENCH_ENV) && \
	  $(BIN)/python manage.py setup_databases --recreate >/dev/null && $(BIN)/python manage.py bench $(BENCH_ARGS)

bench-styles: install-dev ## Latency of the four transaction styles, 50 ms added per service (STYLES_ARGS)
	@export DATABASE_URL=$(BENCH_DATABASE_URL) REDIS_URL=$(BENCH_REDIS_URL) $(BENCH_ENV) && \
	  $(BIN)/python manage.py setup_databases --recreate >/dev/null && $(BIN)/python manage.py bench --styles $(STYLES_ARGS)

FEED_ARGS ?= --rates 100,1000,10000 --seconds 5
bench-feed: install-dev ## The live feed: events/s from commit to a painted dashboard, delay p50/p95 (headless Chromium)
	@export DATABASE_URL=$(BENCH_DATABASE_URL) REDIS_URL=$(BENCH_REDIS_URL) && \
	  $(BIN)/python manage.py setup_databases --recreate >/dev/null && $(BIN)/python manage.py bench_feed $(FEED_ARGS)

BENCH_SEARCH_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/sagasearch
SEARCH_ARGS ?=
bench-search: install-dev ## Operators' search over 10,000 stored sagas: median/p95 per query kind (a fresh PostgreSQL DB; SEARCH_ARGS)
	@export DATABASE_URL=$(BENCH_SEARCH_DATABASE_URL) && unset REDIS_URL && \
	  $(BIN)/python manage.py setup_databases --recreate >/dev/null && $(BIN)/python manage.py bench_search $(SEARCH_ARGS)

RAMP_ARGS ?=
ramp: install-dev ## Load ramp over HTTP (5-80 orders/s, 15 s each): accepted, refused, 5xx, p50/p99, outcomes (PostgreSQL + Redis; RAMP_ARGS)
	@export DATABASE_URL=$(BENCH_DATABASE_URL) REDIS_URL=$(BENCH_REDIS_URL) && \
	  $(BIN)/python manage.py setup_databases --recreate >/dev/null && $(BIN)/python manage.py ramp $(RAMP_ARGS)

simulate: install ## Simulate orders under faults, then audit (SIM_ARGS="-n 1000 --failure-rate 0.2")
	$(BIN)/python manage.py simulate $(SIM_ARGS)

audit: install ## Check the cross-service invariants (exit 1 on any violation)
	$(BIN)/python manage.py audit

web: install ## Production: serve HTTP/websockets only (needs DATABASE_URL and REDIS_URL)
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	$(BIN)/python manage.py serve --host $${HOST:-127.0.0.1} --port $(PORT)

worker: install ## Production: a Celery worker for QUEUES (default: all queues)
	$(BIN)/celery -A sagaplatform worker -Q $(QUEUES) -c $(CONCURRENCY) -n worker-$$$$@%h --loglevel INFO

workers: install ## Production: one Celery worker per service queue, in the foreground
	@trap 'kill 0' INT TERM; for q in $$(echo $(QUEUES) | tr , ' '); do \
	  $(BIN)/celery -A sagaplatform worker -Q $$q -c 2 -n $$q@%h --loglevel INFO & done; wait

beat: install ## Production: Celery beat, which schedules the sweeper
	@mkdir -p var
	$(BIN)/celery -A sagaplatform beat -s var/celerybeat-schedule --loglevel INFO

migrations: install-dev ## Make migrations for every app
	$(BIN)/python manage.py makemigrations

clean: ## Remove the embedded databases and caches (keeps the virtualenv)
	rm -rf var .pytest_cache .ruff_cache .mypy_cache test-artifacts
