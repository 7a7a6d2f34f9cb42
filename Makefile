# `make test` is THE test command: .ci/run and the README both call it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# TensorFlow lives in a venv of its own (no torch beside it), used only to check parity.
PARITY_VENV ?= .venv-parity
PARITY_STAMP := $(PARITY_VENV)/.installed

.PHONY: install install-parity test test-fast parity lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so nothing below can pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,export,dev]'
	touch $(STAMP)

$(PARITY_STAMP): pyproject.toml
	test -x $(PARITY_VENV)/bin/python || $(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_VENV)/bin/pip install --quiet --upgrade pip
	$(PARITY_VENV)/bin/pip install --quiet -e '.[parity]'
	touch $(PARITY_STAMP)

install: $(STAMP)

install-parity: $(PARITY_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint parity
	$(BIN)/python -m pytest

# The packing against TensorFlow's own resize / patch / decode ops.
parity: $(PARITY_STAMP)
	TF_CPP_MIN_LOG_LEVEL=3 $(PARITY_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_tensorflow_parity.py

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -x -q

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/pack_speed.py

clean:
	rm -rf $(VENV) $(PARITY_VENV) .pytest_cache .hypothesis .ruff_cache
