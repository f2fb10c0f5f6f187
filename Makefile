# Quick start:
#   make demo   set up .venv, then extract -> train -> predict on the bundled sample dataset
#   make test   set up .venv, then run the test suite
#
# TORCH is the PyTorch requirement installed first, before anything can pull another build
# (default: torch==2.13.0, whichever build your package index serves for it). To choose a build:
#   CPU only:  make setup TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
#   CUDA:      make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
#
# py-feat (the `pyfeat` face backend) lives in its own environment, .venv-pyfeat: it needs
# torchvision, and PYFEAT_TORCH is a torch + torchvision pair that match (default: the pair the
# package index serves, CUDA builds that also run on a CPU). `make test-pyfeat` runs py-feat's real
# models on a cache of RANDOM weights (scripts/make_pyfeat_weights.py), offline.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DEMO   := demo
PYFEAT_VENV  ?= .venv-pyfeat
PYFEAT_TORCH ?= torch==2.14.1 torchvision==0.29.1
PYFEAT_BIN   := $(PYFEAT_VENV)/bin
PYFEAT_STAMP := $(PYFEAT_VENV)/.installed
PYFEAT_WEIGHTS := .pyfeat-weights

.PHONY: setup demo test test-fast lint bench clean pyfeat-env test-pyfeat

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

# py-feat's environment: torch and torchvision first (a matching pair), then py-feat and this package.
pyfeat-env: $(PYFEAT_STAMP)

$(PYFEAT_STAMP): pyproject.toml
	test -x $(PYFEAT_BIN)/python || $(PYTHON) -m venv $(PYFEAT_VENV)
	$(PYFEAT_BIN)/python -m pip install --quiet --upgrade pip
	$(PYFEAT_BIN)/python -m pip install --quiet $(PYFEAT_TORCH)
	$(PYFEAT_BIN)/python -m pip install --quiet "py-feat==2.1.5" -e ".[media,audio,face,pyfeat]" "pytest>=7"
	touch $(PYFEAT_STAMP)

# RANDOM py-feat weights in Hugging Face cache layout, for the tests only (meaningless features).
$(PYFEAT_WEIGHTS)/.built: $(PYFEAT_STAMP) scripts/make_pyfeat_weights.py almt_pipeline/extractors/pyfeat_weights.py
	rm -rf $(PYFEAT_WEIGHTS)
	HF_HUB_OFFLINE=1 $(PYFEAT_BIN)/python scripts/make_pyfeat_weights.py $(PYFEAT_WEIGHTS)
	touch $@

# py-feat's real models through `almt extract --config pyfeat`, offline, plus the face featurizer tests.
test-pyfeat: $(PYFEAT_WEIGHTS)/.built
	$(PYFEAT_BIN)/python -c "import feat.detector"  # a broken install fails here, not as skipped tests
	HF_HUB_OFFLINE=1 ALMT_PYFEAT_TEST_WEIGHTS=$(abspath $(PYFEAT_WEIGHTS)) \
		$(PYFEAT_BIN)/python -m pytest -q tests/test_pyfeat_real.py tests/test_visual.py

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
	rm -rf $(VENV) $(PYFEAT_VENV) $(PYFEAT_WEIGHTS) $(DEMO) .pytest_cache
