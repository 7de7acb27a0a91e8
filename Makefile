# Newcomer commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH_CPU := torch==2.13.0
DEMO_DIR  ?= demo

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

# The CPU build of torch is installed first when the venv has none: a bare torch
# requirement would pull a multi-GB CUDA build. GPU users install their CUDA torch first.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_CPU)"
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check pipeline tests jobs
	$(VENV)/bin/ruff format --check pipeline tests jobs

test: lint
	$(PY) -m pytest -q

demo: setup
	$(PY) -m pipeline.demo --dir $(DEMO_DIR)

bench: setup
	$(PY) -m jobs.bench

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
