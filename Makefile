# mammo_nb: `make demo` runs the demo chain, `make test` runs every check CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export YOLO_OFFLINE := 1
export MPLBACKEND := Agg
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# PYTHONDONTWRITEBYTECODE is set on these machines: without .pyc files every process compiles every import afresh (a
# tiny training 43 s instead of 27 s). An empty value lets Python write them as it imports (and reuse them).
export PYTHONDONTWRITEBYTECODE :=

.PHONY: install demo test check-nbs lint nbtest pytest bench bench-train clean

# The venv is rebuilt only when the dependency files change.
$(VENV)/.installed: requirements.txt constraints.txt settings.ini setup.py
	$(PYTHON) -m venv $(VENV)
	@# uv fetches and unpacks the ~6 GB of wheels in parallel (~4 min for pip, which stays the fallback). No
	@# --compile-bytecode: compiling all of site-packages took 60 s here; the import check below compiles what the
	@# project imports (~30 s), and later processes write the rest as they import it
	($(BIN)/pip install -q uv && $(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt -r requirements.txt) \
	  || $(BIN)/pip install -q -c constraints.txt -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
	@# coco-froc-analysis: the independent FROC that tests/test_metrics.py checks ours against. Its metadata pins numpy<2
	@# (and flake8), which its code does not need (it runs on this numpy 2 in that test), so it comes without them
	$(BIN)/pip install -q --no-deps coco-froc-analysis==0.2.15 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch, torchvision, ultralytics, mammo_nb.cli, mammo_nb.train, mammo_nb.families.ultralytics, mammo_nb.families.torchvision, mammo_nb.evaluate, mammo_nb.explain, \
	  mammo_nb.serve, mammo_nb.classify, mammo_nb.selftrain, mammo_nb.cv, mammo_nb.selfsup, lightly.loss, ensemble_boxes, pydicom, nbdev, papermill, pycocotools.coco, coco_froc_analysis.froc.froc_curve, matplotlib.pyplot; \
	  print('installed: torch', torch.__version__, '| mammo_nb', mammo_nb.__version__)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mammo run params/demo.yaml

test: install check-nbs lint nbtest pytest

# notebooks clean and module in sync: nbdev_clean and nbdev_export must change nothing
check-nbs: install
	PATH=$(BIN):$$PATH bash .ci/check_nbdev.sh

# the layer contracts of .importlinter: an import from a lower layer up to a higher one fails here
lint: install
	cd $(CURDIR) && $(BIN)/lint-imports --no-cache

nbtest: install
	$(BIN)/nbdev_test --n_workers 2 --timing

# one pytest-xdist worker per core; a test file stays on one worker (its module fixtures are built once); files in
# tests/conftest.py's order, longest first
pytest: install
	$(BIN)/pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=15 tests

bench: install
	$(BIN)/python bench/decode.py data/bench/synth-full
	$(BIN)/python bench/prepare.py data/bench/synth-full

bench-train: install
	$(BIN)/python bench/train_cpu.py params/demo.yaml

clean:
	rm -rf data runs reports/*/ _proc
