# medssl: `make test` and `make run` set up everything they need (a .venv from requirements.txt) on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Data: $MEDSSL_DATA_DIR if set; else ../shared/data where it exists (the dev/CI machines, offline); else ./data,
# where the official MedMNIST files are downloaded on first use.
MEDSSL_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),data)
export MEDSSL_DATA_DIR

.PHONY: test run reproduce bench gpu-data gpu-check check-cuda clean

$(VENV)/.stamp: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.stamp

test: $(VENV)/.stamp
	$(PY) -m pytest -q --durations=15 tests  # the 15 slowest: the suite should stay under ~10 min on 2 cores

# --resume: a second `make run` continues (or, when finished, re-evaluates) the same run instead of refusing its folder
run: $(VENV)/.stamp
	$(PY) simclr.py --data pneumonia --epochs 10 --warmup-epochs 1 --resume

# the paper's study (reproduce.py): PRESET=cpu (2 cores: ~20 h estimated, or ARGS="--part I/14", <= 100 min each) or PRESET=paper (a GPU); more in ARGS,
# e.g. make reproduce ARGS="--folders ../shared/data/chest_xray_224". Finished runs are skipped on a rerun.
PRESET ?= cpu
reproduce: $(VENV)/.stamp
	$(PY) reproduce.py --preset $(PRESET) $(ARGS)

bench: $(VENV)/.stamp
	$(PY) bench.py

# `make reproduce PRESET=gpu` on a machine without ../shared: `make gpu-data` copies (or downloads) the npz files the
# gpu preset reads into gpu-data/ (git-ignored), which travels with the tree; then ARGS="--data-dir gpu-data".
gpu-data: $(VENV)/.stamp
	mkdir -p gpu-data
	$(PY) -c "import dataset, os, shutil; [shutil.copyfile(p, os.path.join('gpu-data', os.path.basename(p))) \
	  for p in (dataset.find_medmnist(f, s, '$(MEDSSL_DATA_DIR)') for f, s in (('pneumoniamnist', 28), ('breastmnist', 28), ('breastmnist', 64)))]"
	ls -l gpu-data

# on a machine with a GPU: build the CUDA op, run the op tests (CUDA ones included) and the GPU benchmark
gpu-check: $(VENV)/.stamp
	MEDSSL_REQUIRE_OP=1 $(PY) -m pytest -q tests/test_op.py
	$(PY) bench.py --devices cuda --sizes 64 224 --step-size 64 --out bench-gpu.json

# compile-only check of the CUDA kernel (no GPU needed): catches CUDA code that no longer builds
check-cuda: $(VENV)/.stamp
	$(PY) csrc/check_cuda.py

clean:
	rm -rf $(VENV) build .pytest_cache
