# One entry point for a newcomer: `make demo`, `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; on a GPU cluster install CUDA torch first (README, "Cluster install").
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-deps demo test test-fast gpu-check lint fmt clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e ".[dev]"
	touch $@

# The labelling service's tests drive Debian's chromium (through the playwright package; no browser
# download) and start their own PostgreSQL server. Installed once when missing and possible (root with
# apt-get); otherwise those tests are skipped with the reason.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (apt-get; log in /tmp/system-deps.log)"; \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; } \
	      >/tmp/system-deps.log 2>&1 || echo "could not install$$missing: their tests will be skipped"; \
	  else echo "missing$$missing and not root: their tests will be skipped"; fi; \
	fi

demo: setup
	$(BIN)/python -m tools.demo

# Both tiers (fast + slow: multi-process DeepSpeed, browser, subprocess stages); prints the slowest
# tests so the suite's growth is seen before it reaches CI's limit. Tests run in parallel, one pytest
# worker per core up to 4 (a file's tests stay on one worker, so its module fixtures are built once, except
# the files tests/conftest.py spreads; the longest start first; every worker and every process a test
# starts runs torch on one thread).
XDIST := -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder
test: setup system-deps
	$(BIN)/python -m pytest -q $(XDIST) --durations=25

# The developer's tier: no subprocesses and no servers (tests/conftest.py fails a test not marked slow
# that starts one), a minute or two; files in parallel as in `make test`.
test-fast: setup system-deps
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST) --durations=10

# The one command for a machine with a GPU: does the project work here, and what does a step cost
# (tools/benchmarks/gpu_check.py; under 10 minutes on one GPU; gpu_check/gpu_check.md is the table for
# BENCHMARKS.md). Install CUDA torch first where PyPI's default build does not fit the GPU (README,
# "Cluster install"; V100: the cu126 build); with a GPU present it also installs the xformers wheel
# built for that torch (pinned to it: pip may not replace torch).
gpu-check: setup
	@if $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && \
	   ! $(BIN)/python -c "import xformers" 2>/dev/null; then \
	  v=$$($(BIN)/python -c "import torch; print(torch.__version__.split('+')[0])"); \
	  cu=$$($(BIN)/python -c "import torch; print('cu' + torch.version.cuda.replace('.', ''))"); \
	  echo "installing xformers for torch $$v ($$cu)"; \
	  $(BIN)/pip install -q xformers "torch==$$v" --index-url https://download.pytorch.org/whl/$$cu \
	    || echo "no xformers wheel for torch $$v $$cu: the check runs with SDPA"; \
	fi
	$(BIN)/python -m tools.benchmarks.gpu_check --out gpu_check

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

fmt: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf demo gpu_check .pytest_cache
