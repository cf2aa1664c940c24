# Two commands get a newcomer from clone to metrics: `make repro` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# dvc.yaml commands call `python`: make it the project's interpreter.
export PATH := $(CURDIR)/$(BIN):$(PATH)
# `cpu` installs onnxruntime; GPU users run `make install EXTRAS=gpu,dev` after installing CUDA torch.
EXTRAS ?= cpu,dev

.PHONY: install repro test test-fast bench

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed

repro: install
	$(BIN)/dvc pull --allow-missing
	$(BIN)/dvc repro

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

# Day-to-day lane: everything but the tests that drive real `dvc` runs or several training
# processes (CI runs them all).
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -m "not e2e and not slow"

bench: install
	$(BIN)/python -m bench.bench_data
