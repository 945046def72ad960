PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One BLAS thread per process: tests run as two pytest workers, trials in a pool use one core each.
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test claims bench bench-peers lint types docs check clean

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

# One table against every peer (benchmarks/peers_table.py). The peers live in their own venvs, every install pinned
# by benchmarks/peers-constraints.txt (torch 2.13 CPU stays; no torchvision): .venv-peers for the PyTorch peers,
# .venv-jax for neural-tangents (JAX, plus torch and symgen for the side-by-side runs). PEERS_ARGS=--quick etc.
PEERS_C := benchmarks/peers-constraints.txt
PEERS_ARGS ?= --write-readme

.venv-peers/.built: pyproject.toml $(PEERS_C)
	test -d .venv-peers || $(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install -q -c $(PEERS_C) torch==2.13.0
	.venv-peers/bin/pip install -q -c $(PEERS_C) -e . pyhessian hessian-eigenthings e2cnn einops unfoldNd einconv linear_operator opt-einsum tqdm scikit-learn
	.venv-peers/bin/pip install -q -c $(PEERS_C) --no-deps backpack-for-pytorch curvlinops-for-pytorch torchensemble
	touch $@

.venv-jax/.built: pyproject.toml $(PEERS_C)
	test -d .venv-jax || $(PYTHON) -m venv .venv-jax
	.venv-jax/bin/pip install -q -c $(PEERS_C) torch==2.13.0
	.venv-jax/bin/pip install -q -c $(PEERS_C) -e . jax jaxlib frozendict
	.venv-jax/bin/pip install -q -c $(PEERS_C) --no-deps neural-tangents
	touch $@

bench-peers: .venv-peers/.built .venv-jax/.built
	.venv-peers/bin/python benchmarks/peers_table.py --torch-python .venv-peers/bin/python --jax-python .venv-jax/bin/python $(PEERS_ARGS)

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
