# herald's two commands: `make demo` and `make test`. Both set everything up
# themselves (a virtualenv in .venv, herald installed in it, the schema migrated).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
DEMO_DB := herald-demo.db

.PHONY: demo test lint typecheck unit postgres bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "herald needs Python 3.11 or newer (found: $$($(PYTHON) --version 2>&1)); set PYTHON=python3.11" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The benchmarks' extra (matplotlib, for the latency plot); `make test` does without it.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

demo: $(STAMP)
	@rm -f $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm
	@HERALD_DATABASE_URL=sqlite:///$(DEMO_DB) $(BIN)/herald db upgrade
	@HERALD_DATABASE_URL=sqlite:///$(DEMO_DB) $(BIN)/herald demo
	@echo
	@echo "The evaluations, as the log has them (herald log --topic 'eval_*'):"
	@HERALD_DATABASE_URL=sqlite:///$(DEMO_DB) $(BIN)/herald log --topic 'eval_*'

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Makes sure a PostgreSQL server answers at HERALD_TEST_DATABASE_URL: starts the
# machine's installed cluster if needed, or says in one line what to install.
postgres: $(STAMP)
	@$(BIN)/python scripts/ensure_postgres.py

test: lint typecheck postgres
	$(BIN)/pytest -p no:cacheprovider

bench: $(BENCH_STAMP) postgres
	$(BIN)/python -m bench.append_throughput
	$(BIN)/python -m bench.unit_of_work
	$(BIN)/python -m bench.consumers
	$(BIN)/python -m bench.idle
	$(BIN)/python -m bench.long_transaction
	$(BIN)/python -m bench.replay
	$(BIN)/python -m bench.bulk
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.free_space
	$(BIN)/python -m bench.plot

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(DEMO_DB)*
