# One entry point for a newcomer: `make demo`, `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; on a GPU cluster install CUDA torch first (README, "Cluster install").
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-deps demo test test-fast lint fmt clean

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
# tests so the suite's growth is seen before it reaches CI's limit.
test: setup system-deps
	$(BIN)/python -m pytest -q --durations=25

# The developer's tier: no subprocesses, a minute or two.
test-fast: setup system-deps
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

fmt: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf demo .pytest_cache
