# Two commands do all set-up on a fresh machine:
#   make serve   # the OpenAI-compatible server on the built-in tiny model (http://127.0.0.1:8000)
#   make test    # the test suite (what CI runs)
# Both create .venv and install loom into it on first use. The CPU build of torch is installed first:
# a bare `torch` would pull gigabytes of CUDA packages. Override TORCH_SPEC to choose another build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: serve demo test bench lint redis-server

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev,ray,tracing,redis]'
	touch $@

# The Redis queue's tests start a real redis-server (Debian's package); installed once, as root or via sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
redis-server:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

serve: $(BIN)/.installed
	$(BIN)/loom serve $(ARGS)

demo: $(BIN)/.installed
	$(BIN)/loom generate --chat "Hello, who are you?" "Plan a trip to Paris." $(ARGS)

test: $(BIN)/.installed redis-server
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/throughput.py $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check loom tests benchmarks
	$(BIN)/ruff format --check loom tests benchmarks
