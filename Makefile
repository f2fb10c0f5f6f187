# Quick start:
#   make demo   set up .venv, then extract -> train -> predict on the bundled sample dataset
#   make test   set up .venv, then run the test suite
#
# TORCH selects the PyTorch build installed first (default: the CPU build). On a CUDA machine use
# e.g. `make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu128"`.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	# thuiar/MMSA's own data loader, only to test that it reads our feature files
	$(BIN)/python -m pip install --quiet --no-deps "MMSA==2.2.1"
	touch $(STAMP)

# The three-command flow in a scratch working directory, on the bundled sample dataset.
demo: setup
	mkdir -p $(DEMO)
	cd $(DEMO) && ../$(BIN)/almt extract ../samples/sample_dataset
	cd $(DEMO) && ../$(BIN)/almt train
	cd $(DEMO) && ../$(BIN)/almt predict ../samples/new_clip.mp4

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/extract_speed.py
	$(BIN)/python benchmarks/predict_latency.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
