# make demo   set up .venv, install gpurnn, run the main job (GPU: the correctness check and
#             the benchmark against cuDNN, plots and README table; CPU only: the correctness
#             check against the reference, Triton interpreted, and a small training demo)
# make test   set up .venv, install gpurnn with its test tools, run the whole test suite
#
# Without an NVIDIA GPU the CPU build of torch is installed (PyTorch's default wheel is a
# multi-GB CUDA build), and triton 3.6 so that the interpreter on CPU runs the version the
# GPU machines compile with.

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
CPU_TORCH ?= torch==2.13.0
CPU_TRITON ?= triton==3.6.0
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: demo test check info lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifneq ($(HAS_GPU),1)
	$(PY) -m pip install -q "$(CPU_TORCH)" "$(CPU_TRITON)"
endif
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gpurnn info
ifeq ($(HAS_GPU),1)
	$(PY) -m gpurnn check
	$(PY) -m gpurnn bench
	$(PY) -m gpurnn plot --readme
else
	$(PY) -m gpurnn check
	$(PY) -m gpurnn demo
endif

test: $(STAMP)
	$(PY) -m ruff check gpurnn kernels tests examples
	# one worker per core, each test file on one worker (the compile tests share their work)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

check: $(STAMP)
	$(PY) -m gpurnn check

info: $(STAMP)
	$(PY) -m gpurnn info

lint: $(STAMP)
	$(PY) -m ruff check gpurnn kernels tests
	$(PY) -m ruff format --check gpurnn kernels tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
