# `make serve` and `make test` are all a newcomer needs: both set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test bench chaos check lint typecheck proto proto-check lint-proto clean

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "hub needs Python >= 3.11 (set PY=python3.11)"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

node_modules/.bin/buf: package.json
	npm install --no-audit --no-fund --silent
	touch $@

## Run the server on the embedded in-memory store (set HUB_REDIS_URL for Redis).
serve: $(STAMP)
	$(BIN)/hub serve

## The whole suite: generated code fresh, buf lint, ruff, mypy, then pytest with coverage.
test: $(STAMP) node_modules/.bin/buf
	$(BIN)/python scripts/gen_protos.py --check
	node_modules/.bin/buf lint
	$(BIN)/ruff check hub harness tests loadtest scripts examples deploy
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	@command -v redis-server >/dev/null || { echo "redis-server not found: the tests start \
	their own Redis. Install it (Debian/Ubuntu: apt-get install redis-server) or put it on PATH."; exit 1; }
	# Two worker processes, each running whole modules (its own event loop and Redis), with
	# combined coverage and pytest's one summary line.
	$(BIN)/python -m pytest -n 2 --dist loadfile --cov $(PYTEST_ARGS)

## Every performance figure beside its ceiling, in one run (writes bench-results/).
bench: $(STAMP)
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

## Fault injection with a checker: kills, rollbacks, pauses, stalls over real Redis and hubs
## (10 minutes; e.g. CHAOS_ARGS="--duration 60 --seed 3 --sentinel --replicas-ack").
CHAOS_ARGS ?= --duration 600
chaos: $(STAMP)
	$(BIN)/python -m loadtest.chaos $(CHAOS_ARGS)

## Regenerate hub/api from protos/.
proto: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache .coverage
