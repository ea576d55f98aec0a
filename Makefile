# Two commands set up everything on a fresh Debian machine (root, or with sudo for apt):
#   make demo   - install, then run the main job on the embedded tiny default (CPU, minutes)
#   make test   - install, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DeepSpeed JIT-builds ops on first use: keep the build cache private to this checkout.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	command -v mpirun >/dev/null || (apt-get update -qq && apt-get install -y -qq openmpi-bin libopenmpi-dev)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# torch first: a bare requirement would resolve a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

NPROC ?= 2
# The demo pins its own floating-point settings (ATen AVX2 kernels, MKL's COMPATIBLE branch, one
# thread per rank; NUMERICS in fpo_ds/tools/demo/run.py) so that its table is the README's on any x86
# CPU with AVX2; they are not exported here, so the tests run on the CPU's native kernels.
demo: install
	$(BIN)/fpo-ds demo --out runs/demo --nproc $(NPROC)

test: install
	$(BIN)/ruff check fpo_ds tests bench
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check fpo_ds tests bench
