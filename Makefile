# Two set-up commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean install gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/oodscale run configs/digits.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# Unit tests only (no Ray cluster): a quick loop while editing.
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not integration"

# Every stage on a GPU, then per-worker throughput (docs/gpu.md). Needs a CUDA GPU.
gpu-check:
	bench/gpu_check.sh --out docs/gpu_check_latest.md

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
