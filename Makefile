# playbus: make run | make test | make lint | make bench | make loadtest | make soak | make soak-nodes
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint bench loadtest soak soak-nodes clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,lint,embedded,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python run_cluster.py --config config/example.yaml --redis-dir var/redis

# The scripts' test vectors (config/scripts/*.test.yaml, in-process, under a second), then the suite.
test: $(STAMP)
	$(BIN)/playbus test --config config/example.yaml
	$(BIN)/python -m pytest -q tests

# The suite without Ray (no cluster, no Serve): seconds, for the edit-test loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray and not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy -p playbus
	$(BIN)/lint-imports

# One run, every path beside its baseline: loadtest/results/bench.json, the PNG plots, the README's table.
bench: $(STAMP)
	$(BIN)/python -m playbus.loadtest.bench

# locust, headless, against a cluster it starts: loadtest/results/locust/ (CSV and HTML report).
loadtest: $(STAMP)
	$(BIN)/python -m playbus.loadtest.locust_run

soak: $(STAMP)
	$(BIN)/python -m playbus.loadtest.soak
	$(BIN)/python -m playbus.loadtest.multinode_soak

# Ray nodes lost under load (a head and worker nodes on this machine, killed or frozen in turn): takeover times.
soak-nodes: $(STAMP)
	$(BIN)/python -m playbus.loadtest.multinode_soak

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
