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

# The whole benchmark (~1 h on 2 cores): the precompute against the floor and the peer, then
# validation against the precompute, the training loader, the driver at 100k shards and the
# duplicate-noise check's memory. Raw results in jobs/bench/results/; docs/benchmark.md.
bench: setup
	$(PY) -m jobs.bench
	$(PY) -m jobs.bench.validation --shards 16 --out jobs/bench/results/validation.json
	$(PY) -m jobs.bench.loader --json jobs/bench/results/loader.json
	$(PY) -m jobs.bench.scale
	$(PY) -m jobs.bench.noisehash

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
