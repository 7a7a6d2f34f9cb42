# `make test` is THE test command: .ci/run and the README both call it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# TensorFlow lives in a venv of its own (no torch beside it), used only to check parity.
PARITY_VENV ?= .venv-parity
PARITY_STAMP := $(PARITY_VENV)/.installed
# The serving set and the client are also tested under each further Python found here, in a venv of
# its own per version ($(VENV)-py3.12, ...: the base set + the `test-serve` extra, no torch), on these
# tests (those in them that need torch or dev tools are skipped there: tests/conftest.py): SERVE_SMOKE,
# the servers, client, decode and packing end to end. 3.11 runs every test; the whole serving set
# (SERVE_TESTS: `make test-pythons SERVE_SET=whole`) under each further version cost CI ~4 minutes.
SERVE_SET ?= smoke
EXTRA_PYTHONS ?= 3.12 3.13
SERVE_TESTS := tests/test_rest.py tests/test_grpc.py tests/test_grpc_spread.py tests/test_client.py \
	tests/test_explain.py tests/test_external.py tests/test_score_cli.py \
	tests/test_batcher.py tests/test_deadlines.py tests/test_serve_command.py tests/test_heap.py \
	tests/test_decode.py tests/test_resize.py tests/test_packing.py tests/test_prepare_pool.py \
	tests/reliability/test_security.py tests/reliability/test_faults.py tests/reliability/test_hostile.py
SERVE_SMOKE := tests/test_rest.py tests/test_grpc.py tests/test_client.py tests/test_score_cli.py \
	tests/test_decode.py tests/test_packing.py

.PHONY: install install-parity run test test-fast test-pythons system-deps typecheck image-proof docs-screenshot parity lint format protos bench bench-compare default-model brisque-compare synthetic-order clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so nothing below can pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,export,dev,bulk]'
	touch $(STAMP)

$(PARITY_STAMP): pyproject.toml
	test -x $(PARITY_VENV)/bin/python || $(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_VENV)/bin/pip install --quiet --upgrade pip
	$(PARITY_VENV)/bin/pip install --quiet -e '.[parity]'
	touch $(PARITY_STAMP)

# tools/find_pythons.sh finds an interpreter of that version that really runs (not a pyenv shim).
# --without-pip + .venv's pip: Debian's python3.X lacks ensurepip unless python3.X-venv is installed.
$(VENV)-py%/.installed: pyproject.toml | $(STAMP)
	test -x $(@D)/bin/python || { py=$$(bash tools/find_pythons.sh --path $*) && $$py -m venv --without-pip $(@D); }
	$(BIN)/pip --python $(@D)/bin/python install --quiet '.[test-serve]'
	touch $@

install: $(STAMP)

# The quickstart: installs if needed, then serves the embedded model (REST :8000, gRPC :50051).
run: $(STAMP)
	$(BIN)/musiq serve

install-parity: $(PARITY_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy over the project's packages ([tool.mypy] in pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy

# Debian's prometheus (promtool) and chromium (tests/test_web.py), installed when missing and allowed.
system-deps:
	bash tools/system_deps.sh

# The suite on PYTEST_WORKERS xdist workers (worksteal: each takes half the list in order, an idle
# one takes from the other's tail), then the `serial` tests alone (tests/conftest.py: timing under
# load). 0: one process. Measured on 2 cores: 620 s in one process, 469 + 79 s this way.
PYTEST_WORKERS ?= 2
test: system-deps lint typecheck parity
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal -m "not serial"
	$(BIN)/python -m pytest -m serial
	$(MAKE) --no-print-directory test-pythons

# SERVE_TESTS under every Python of EXTRA_PYTHONS that runs here (found only when asked for); none: nothing to do.
ifneq ($(filter test-pythons,$(MAKECMDGOALS)),)
FOUND_PYTHONS := $(shell bash tools/find_pythons.sh $(EXTRA_PYTHONS) | cut -d' ' -f1)
endif
test-pythons: $(STAMP) $(foreach v,$(FOUND_PYTHONS),$(VENV)-py$(v)/.installed)
	@[ -n "$(FOUND_PYTHONS)" ] || echo "test-pythons: none of Python $(EXTRA_PYTHONS) runs here: only 3.11 was tested"
	@status=0; \
	for v in $(FOUND_PYTHONS); do \
		echo "== Python $$v ($(VENV)-py$$v, $$($(VENV)-py$$v/bin/python -V)): the serving set's tests ($(SERVE_SET))"; \
		$(VENV)-py$$v/bin/python -m pytest -q $(if $(filter whole,$(SERVE_SET)),$(SERVE_TESTS),$(SERVE_SMOKE)) || status=1; \
	done; \
	exit $$status

# Builds the CPU and CUDA images with buildah (as root; installs buildah, podman, runc, debootstrap
# when missing) and proves each runs: deploy/container_proof.sh. Minutes of downloads, several GB.
image-proof:
	deploy/container_proof.sh

# Remakes docs/web-page.png from the real page in Debian's chromium (tests/test_web.py fails when it is stale).
docs-screenshot: $(STAMP)
	MUSIQ_SCREENSHOT=docs/web-page.png $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_web.py -k page_scores

# The packing against TensorFlow's own resize / patch / decode ops.
parity: $(PARITY_STAMP)
	TF_CPP_MIN_LOG_LEVEL=3 MUSIQ_REQUIRE_TENSORFLOW=1 $(PARITY_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_tensorflow_parity.py

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -x -q

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Regenerate the gRPC code from protos/ (tests/test_grpc.py checks it is in sync).
protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

bench: $(STAMP)
	$(BIN)/python bench/pack_speed.py

# pyiqa vs ORT alone vs the service (REST, gRPC, 1..64 clients), fp32/int8, the roofline (~20 min, estimated).
bench-compare: $(STAMP)
	$(BIN)/musiq bench

# Train the default model on this CPU (hours), in the background; resumable.
default-model: $(STAMP)
	mkdir -p runs
	nohup tools/default_model.sh > runs/default-model.log 2>&1 &
	@echo "training in the background: tail -f runs/default-model.log (run again to resume)"

# MUSIQ vs BRISQUE on the CLIVE validation split (BRISQUE needs numpy<2: its own venv).
CLIVE ?= ../shared/data/clive
BRISQUE_VENV ?= .venv-brisque
$(BRISQUE_VENV)/.installed:
	test -x $(BRISQUE_VENV)/bin/python || $(PYTHON) -m venv $(BRISQUE_VENV)
	$(BRISQUE_VENV)/bin/pip install --quiet brisque==0.2.0 "numpy<2" "opencv-python-headless<4.11" scipy pillow
	touch $@

brisque-compare: $(STAMP) $(BRISQUE_VENV)/.installed
	$(BIN)/musiq split --data $(CLIVE)/labels.csv -o runs/clive_split.csv
	$(BIN)/musiq eval --data runs/clive_split.csv --split val --out runs/eval_default
	$(BRISQUE_VENV)/bin/python bench/brisque_compare.py runs/eval_default/predictions.csv

# Pairwise order of graded blur / noise / JPEG / darkening on held-out photos: the default model
# against BRISQUE (bench/results/synthetic_order.md and .png). About 15 minutes on 2 cores.
synthetic-order: $(STAMP) $(BRISQUE_VENV)/.installed
	$(BIN)/python -m bench.synthetic_order make
	$(BIN)/python -m bench.synthetic_order score --name default
	$(BRISQUE_VENV)/bin/python bench/synthetic_order.py brisque
	$(BIN)/python -m bench.synthetic_order report default brisque

clean:
	rm -rf $(VENV) $(VENV)-py3.* $(PARITY_VENV) $(BRISQUE_VENV) .pytest_cache .hypothesis .ruff_cache
