# Two set-up commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean install gpu-check browser report-check fashion-mnist \
	benchmark benchmark-gpu docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# pytorch-ood (the `pood` extra) without its torchvision: PyPI's torchvision is built for
	# CUDA torch and, beside this CPU torch, breaks every import of it (diffusers' included).
	$(BIN)/pip install --quiet --no-deps 'pytorch-ood==0.4.0'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/oodscale run configs/digits.yaml

# The Fashion-MNIST benchmark (configs/fashion.yaml, docs/results.md): the paper's grid, 60 cells.
benchmark: $(STAMP) fashion-mnist
	$(BIN)/oodscale run configs/fashion.yaml

# The same benchmark at full fidelity (28x28, every training image, ResNet-18, ~49k outliers) for
# one H100/H200 in one 10-minute command; needs a CUDA GPU (configs/fashion-gpu.yaml).
benchmark-gpu:
	bench/benchmark_gpu.sh

test: $(STAMP) browser fashion-mnist
	$(BIN)/ruff check .
	$(BIN)/pytest -q --durations=30

# Unit tests only (no Ray cluster): a quick loop while editing.
test-fast: $(STAMP) browser fashion-mnist
	$(BIN)/pytest -q -m "not integration"

# Every stage on a GPU, then per-worker throughput (docs/gpu.md). Needs a CUDA GPU.
gpu-check:
	bench/gpu_check.sh --out docs/gpu_check_latest.md

# report.html is checked in Debian's headless chromium (tests/test_report_html.py): install it
# where it is missing (as root), or stop with the command that does.
APT_INSTALL = [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { $(APT_INSTALL) chromium >/dev/null; } || \
	  { echo "chromium is missing: run 'apt-get install chromium' as root" >&2; exit 1; }

# Fashion-MNIST (configs/fashion.yaml, its tests) from Debian's package, installed where missing.
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-mnist:
	@test -f $(FASHION) || { $(APT_INSTALL) dataset-fashion-mnist >/dev/null; } || \
	  { echo "Fashion-MNIST is missing: run 'apt-get install dataset-fashion-mnist' as root" >&2; \
	    exit 1; }

# Open a report in headless chromium; fails on a console error, broken image or unsortable table.
REPORT ?= runs/digits/eval/report.html
report-check: $(STAMP) browser
	$(BIN)/python -m oodscale.evaluate.report_check $(REPORT)

# docs/method.md's defaults table, from the config's defaults, bounds and field descriptions
# (tests/test_config_docs.py fails while it is out of date).
docs: $(STAMP)
	$(BIN)/python -m oodscale.config_docs --write docs/method.md

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
