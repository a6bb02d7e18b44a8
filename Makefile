# Two commands on a fresh machine (offline except for the package registries):
#   make demo   -> installs into .venv and runs the demo job on the embedded model
#   make test   -> installs (with test extras) into .venv and runs the test suite
# Both install the exact versions in constraints.txt (pyproject.toml holds only compatible ranges).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/igpt-batch demo --output demo-output

# the report test drives Debian's chromium; installed here when missing and apt can (else that one test skips, saying so)
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: tests/test_report.py's browser test will skip"

test: install chromium
	$(BIN)/python -m pytest -q -ra --durations=15 tests

bench: install
	$(BIN)/python bench/bench_sampler.py
	$(BIN)/python bench/bench_extract.py
	$(BIN)/python bench/capacity.py

.PHONY: install demo test bench chromium
