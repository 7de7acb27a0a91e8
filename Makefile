# Newcomer commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
STAMP_DEMO := $(VENV)/.installed-demo
TORCH_CPU := torch==2.13.0
DEMO_DIR  ?= demo

.PHONY: setup setup-demo test test-fast check lint demo bench clean

# setup: everything, test tools included (make test, make check, make bench).
# setup-demo: only what `make demo` needs (the `demo` extra: no test tools, no model libraries).
# Each step prints a line with its expected time; pip shows what it downloads.
setup: $(STAMP)
setup-demo: $(STAMP_DEMO)

# The CPU build of torch is installed first when the venv has none: a bare torch
# requirement would pull a multi-GB CUDA build. GPU users install their CUDA torch first.
define install
	@echo "[setup 1/3] virtual environment $(VENV) (a few seconds)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup 2/3] torch, CPU build ($(TORCH_CPU): 1-3 min when not installed yet)"
	@$(PY) -c "import torch" 2>/dev/null && echo "  torch is installed" || \
		$(PIP) install "$(TORCH_CPU)"
	@echo "[setup 3/3] the pipeline with the '$(1)' extra ($(2))"
	@$(PIP) install -e '.[$(1)]'
endef

$(STAMP): pyproject.toml
	$(call install,dev,ray pyarrow hydra plus test tools and model libraries: 3-5 min)
	@touch $(STAMP) $(STAMP_DEMO)

$(STAMP_DEMO): pyproject.toml
	$(call install,demo,ray pyarrow hydra scikit-image: 2-4 min)
	@touch $(STAMP_DEMO)

# Tests: `make test` runs everything (CI; the 15 slowest are listed); `make test-fast` the unit
# tier: no test that starts a process (Ray, a subprocess, an embedded job: marked `integration`
# at collection by tests/fixtures/tiers.py) and none marked `slow`. Both run TEST_WORKERS
# pytest-xdist workers, a module per worker at a time (tests/fixtures/workers.py);
# TEST_WORKERS=0 runs in this process. Three on 2 cores: the suite waits on process starts, so a
# third worker fills the cores (measured in docs/testing.md).
TEST_WORKERS ?= 3
PYTEST := $(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadscope

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not integration and not slow"

# Lint and formatting, apart from the tests so that a formatting nit never hides a test result.
check: setup
	$(VENV)/bin/ruff check pipeline tests jobs
	$(VENV)/bin/ruff format --check pipeline tests jobs

lint: check

demo: setup-demo
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
