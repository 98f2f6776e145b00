# playbus: make run | make test | make lint | make bench | make soak
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,lint]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python run_cluster.py --config config/example.yaml --redis-dir var/redis

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy actors scripting config playbus

bench: $(STAMP)
	$(BIN)/python -m playbus.loadtest.bench_engine
	$(BIN)/python -m playbus.loadtest.bench_cluster

soak: $(STAMP)
	$(BIN)/python -m playbus.loadtest.soak

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
