# zoocompiler: `make demo` runs the main job (Deep Model Reassembly on the demo zoo), `make test` the test suite.

PYTHON_BOOT ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.zoocompiler-installed
PYTEST_ARGS ?= -n 2 -q

.PHONY: install demo test test-all lint clean

install: $(STAMP)

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)

# Re-installs only when pyproject.toml changes; the stamp makes re-runs instant.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/zoocompile assemble --budget flops=3M --out out/assembly --force

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff, then the import-layer contracts in pyproject.toml ([tool.importlinter]): an upward import fails CI.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
