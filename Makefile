# Quick start:
#   make demo   set up .venv, then extract -> train -> predict on the bundled sample dataset
#   make test   set up .venv, then run the test suite
#
# TORCH is the PyTorch requirement installed first, before anything can pull another build
# (default: torch==2.13.0, whichever build your package index serves for it). To choose a build:
#   CPU only:  make setup TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
#   CUDA:      make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DEMO   := demo

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

# thuiar/MMSA's own data loader, installed without its dependencies only so the tests can check
# that it reads the feature files written here.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps "MMSA==2.2.1"
	touch $(TEST_STAMP)

# The three-command flow in a scratch working directory, on the bundled sample dataset.
demo: setup
	mkdir -p $(DEMO)
	cd $(DEMO) && ../$(BIN)/almt extract ../samples/sample_dataset
	cd $(DEMO) && ../$(BIN)/almt train
	cd $(DEMO) && ../$(BIN)/almt predict ../samples/new_clip.mp4

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Static checks: ruff (style, imports, likely bugs) and mypy (types of the package; settings in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check almt_pipeline tests benchmarks scripts
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/extract_speed.py
	$(BIN)/python benchmarks/predict_latency.py
	$(BIN)/python benchmarks/serve_latency.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
