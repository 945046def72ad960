PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One BLAS thread per process: tests run as two pytest workers, trials in a pool use one core each.
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test claims bench lint types docs check clean

$(BIN)/symgen: pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(BIN)/symgen

venv: $(BIN)/symgen

demo: venv
	$(BIN)/symgen reproduce --quick

test: venv
	-bash scripts/install-chromium.sh
	$(BIN)/python -m pytest -n 2 tests

# README's claims table must equal a fresh `symgen reproduce --quick` (CI runs this after `make test`).
claims: venv
	$(BIN)/python scripts/claims_gate.py --timeout 1200

bench: venv
	-$(BIN)/pip install -q -c constraints.txt -e '.[bench]'
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# CI runs lint, types and docs before the tests (.ci/run).
lint: venv
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

types: venv
	$(BIN)/mypy

# The API reference (pdoc, offline, Google-style docstrings) in docs/api/; a warning fails the build.
docs: venv
	rm -rf docs/api
	PYTHONWARNINGS=error $(BIN)/python -m pdoc -d google -o docs/api symgen

check: lint types docs test

clean:
	rm -rf $(VENV) runs .pytest_cache docs/api
