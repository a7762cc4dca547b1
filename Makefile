# `make serve` and `make test` are all a newcomer needs: both set up .venv on first use.
# `make help` lists every target.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What is installed, and from what: `make serve` needs the runtime only; everything else the
# dev extra (tests, lint, types, the load tests). constraints.txt pins what CI ran.
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev
PIP := $(BIN)/pip install --quiet -c constraints.txt

# The commit whose protos this API must stay compatible with (buf breaking).
PROTO_BASELINE ?= dfe4ddc

.PHONY: help serve test check lint-proto bench chaos proto clean

## List the targets.
help:
	@awk '/^## /{doc=substr($$0, 4); next} /^[a-z-]+:/{if (doc) printf "  %-11s %s\n", \
		substr($$1, 1, length($$1) - 1), doc; doc=""}' $(MAKEFILE_LIST)

$(VENV)/bin/python:
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "hub needs Python >= 3.11 (set PY=python3.11)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUNTIME): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e .
	touch $(RUNTIME)

$(DEV): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e '.[dev]'
	touch $(DEV) $(RUNTIME)

node_modules/.bin/buf: package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $@

## Run the server on the embedded in-memory store (set HUB_REDIS_URL for Redis).
serve: $(RUNTIME)
	$(BIN)/hub serve

## Everything but the tests: generated code fresh, buf lint, ruff, mypy, import contracts.
check: $(DEV) lint-proto
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/ruff check hub harness tests loadtest scripts examples deploy
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

## Lint the .proto files (buf lint, the STANDARD rules less those buf.yaml names).
lint-proto: node_modules/.bin/buf
	node_modules/.bin/buf lint
	# Wire and JSON compatible with the protos as last released (clients built on them go on
	# working): buf.yaml's breaking rules against that commit.
	node_modules/.bin/buf breaking protos --against '.git#ref=$(PROTO_BASELINE),subdir=protos'

## The whole suite: `check`, then pytest with coverage (what CI runs).
test: check
	@command -v redis-server >/dev/null || { echo "redis-server not found: the tests start \
	their own Redis. Install it (Debian/Ubuntu: apt-get install redis-server) or put it on PATH."; exit 1; }
	# Two worker processes, each running whole modules (its own event loop and Redis), with
	# combined coverage and pytest's one summary line.
	$(BIN)/python -m pytest -n 2 --dist loadfile --cov $(PYTEST_ARGS)

## Every performance figure beside its ceiling, in one run (writes bench-results/).
bench: $(DEV)
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

## Fault injection with a checker over real Redis and hubs (10 min; CHAOS_ARGS to change it).
CHAOS_ARGS ?= --duration 600
chaos: $(DEV)
	$(BIN)/python -m loadtest.chaos $(CHAOS_ARGS)

## Regenerate hub/api from protos/.
proto: $(DEV)
	$(BIN)/python scripts/gen_protos.py

## Remove the virtual environment, node_modules and caches.
clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache .coverage
