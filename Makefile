# nequip-sus2: `make demo` runs the tutorial end to end, `make test` runs the test suite.
# Both create a local virtualenv (.venv) with CPU PyTorch; `make demo TORCH=cuda` installs the
# default (CUDA) PyTorch wheel instead.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= cpu
TORCH_CPU_SPEC ?= torch==2.13.0
OUT ?= demo_output
BIN := $(VENV)/bin
# the venv's console scripts (nequip-train, nequip-compile, ...) are called by tests and the demo
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv demo test test-all bench benchmarks lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if [ "$(TORCH)" = "cpu" ]; then \
		$(BIN)/python -m pip install -q --timeout 15 --retries 1 "$(TORCH_CPU_SPEC)" \
			--index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
		|| $(BIN)/python -m pip install -q "$(TORCH_CPU_SPEC)"; \
	else \
		$(BIN)/python -m pip install -q "torch>=2.6,<2.15"; \
	fi
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/python -m nequip_sus2.demo --out $(OUT)

test: venv
	$(BIN)/python -m pytest -q -m "not veryslow" --durations=15

test-all: venv
	$(BIN)/python -m pytest -q --durations=25

# inference/training throughput of SUS2 vs NequIP and Allegro (docs/performance.md); 6-15 min
bench: venv
	$(BIN)/python benchmarks/inference_throughput.py --out bench_output/performance

# budgeted accuracy study, SUS2 vs NequIP and Allegro on the Alloy and mlearn sets
# (docs/benchmarks.md): every training gets the same wall-clock budget BUDGET (DD:HH:MM:SS;
# MLEARN_BUDGET for the mlearn runs), 1 thread each, JOBS at a time; ~80 min at the defaults
BUDGET ?= 00:00:08:00
MLEARN_BUDGET ?= 00:00:12:00
JOBS ?= 2
benchmarks: venv
	$(BIN)/python benchmarks/accuracy_study.py --budget $(BUDGET) --mlearn-budget $(MLEARN_BUDGET) \
		--jobs $(JOBS) --out bench_output/benchmarks

lint: venv
	$(BIN)/ruff check nequip_sus2 tests
	$(BIN)/ruff format --check nequip_sus2 tests

clean:
	rm -rf $(OUT) outputs .pytest_cache bench_output
