# The two set-up commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test test-fast bench faults-report clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)            ## install and run the relay (embedded Postgres/Redis and simulator unless configured)
	$(BIN)/relay up

# two pytest workers (xdist): most tests wait on processes, peers and outages, not on a CPU
TEST_WORKERS ?= 2

test: $(STAMP)           ## install and run the whole test suite (TEST_WORKERS=1: one process)
	$(BIN)/pytest -q -p no:cacheprovider $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

test-fast: $(STAMP)      ## unit tests only
	$(BIN)/pytest -q tests/unit

bench: $(STAMP)          ## the benchmarks (not tests)
	$(BIN)/python bench/receiver.py
	$(BIN)/python bench/campaign.py

faults-report: $(STAMP)  ## run the fault suite and regenerate bench/faults.md
	$(BIN)/python bench/faults_report.py

clean:
	rm -rf $(VENV) .relay
