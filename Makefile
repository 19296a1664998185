# `make demo` and `make test` each create .venv when missing, install ddkit into it, and run.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ddkit-installed
# pip prints one line per index location it skips on this kind of machine; keep the log readable.
QUIET_PIP := grep -v -e "is ignored: it is neither a file nor a directory" || true

.PHONY: install demo test test-all lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import ddkit, torch, lightning, lightly, kornia, timm"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ddkit.demo

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/python -m ruff check ddkit tests benchmarks

clean:
	rm -rf $(VENV) runs reports .pytest_cache
