# Set-up from nothing and the project's commands. `make test` is the test command CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.itconv-fast-installed
TORCH_VERSION ?= 2.14.1
RUFF_VERSION ?= 0.17.5
# Test processes (pytest-xdist): each worker's torch, and what it starts, gets its share of the cores
# (tests/conftest.py; a torch per worker using every core was far slower, benchmarks/NOTES.md). 2 is what the
# 2-core machines run; TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2

# Compile the CUDA kernels whenever a CUDA toolkit is present (no GPU is needed to compile them).
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
ifneq ($(CUDA_HOME),)
# Native code for 8.0 (all Ampere 8.x), 9.0, 10.0, 12.0; PTX of 12.0 for newer GPUs (setup.py's default too).
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0;10.0;12.0+PTX
endif
export MAX_JOBS ?= 2

SOURCES := Makefile setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: setup lint format test test-fast train bench docs gpu-check ptxas clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) numpy click tqdm matplotlib pyyaml tensorboard ninja pybind11 \
		pytest pytest-benchmark pytest-xdist hypothesis ruff==$(RUFF_VERSION) 'ray[tune]' scikit-learn torchvision timm transformers mkdocs \
		'mkdocstrings[python]' build
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import itconv_fast, sys; sys.exit(0 if itconv_fast.extension_loaded() else 'extension failed to load')"
	touch $(STAMP)

# ruff (pyproject.toml [tool.ruff]): lint and format check; `make format` rewrites the tree.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	ITCONV_FAST_REQUIRE_EXTENSION=1 $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" -n $(TEST_WORKERS) --dist loadgroup

# The documentation site (README's pages and the API reference from the docstrings), warnings as errors.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

ARGS ?= --lam 0.5 --sn-mu 0.95

train: $(STAMP)
	$(VENV)/bin/itconv-fast train $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/itconv-fast bench coupling --out benchmarks/results/coupling-cpu-2core.json
	$(VENV)/bin/itconv-fast bench spectral --out benchmarks/results/spectral-cpu-2core.json
	$(VENV)/bin/itconv-fast bench indices --out benchmarks/results/indices-cpu-2core.json
	$(VENV)/bin/itconv-fast bench train-step --out benchmarks/results/train-step-cpu-2core.json
	$(VENV)/bin/itconv-fast bench lipschitz --min-run-time 8 --out benchmarks/results/lipschitz-cpu-2core.json
	$(VENV)/bin/itconv-fast bench train --size quick --out benchmarks/results/bench-train-quick-cpu-2core.json
	$(VENV)/bin/itconv-fast bench train --size paper --paper-steps 100 --out benchmarks/results/bench-train-paper-cpu-2core.json

# On a machine with a GPU: the CUDA tests, the benchmarks on the GPU (the epoch-time comparison of bench train and
# the CUDA-graph check among them) and the kernels' ptxas usage, written to one JSON file to send back
# (benchmarks/gpu_check.py).
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py $(if $(OUT),--out $(OUT))

# Registers, stack and spills of every CUDA kernel for sm_80 and sm_90 (needs nvcc, not a GPU).
ptxas: $(STAMP)
	$(PY) benchmarks/ptxas_usage.py --markdown

clean:
	rm -rf build site itconv_fast/_C*.so itconv_fast/_cuda_build.txt $(STAMP)
