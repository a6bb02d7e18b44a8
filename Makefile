# Two commands on a fresh machine (offline except for the package registries):
#   make demo   -> installs into .venv and runs the demo job on the embedded model
#   make test   -> installs (with test extras) into .venv and runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/igpt-batch demo --output demo-output

test: install
	$(BIN)/python -m pytest -q -ra tests

bench: install
	$(BIN)/python bench/bench_sampler.py
	$(BIN)/python bench/bench_extract.py

.PHONY: install demo test bench
