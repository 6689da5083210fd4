# medssl: `make test` and `make run` set up everything they need (a .venv from requirements.txt) on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Data: $MEDSSL_DATA_DIR if set; else ../shared/data where it exists (the dev/CI machines, offline); else ./data,
# where the official MedMNIST files are downloaded on first use.
MEDSSL_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),data)
export MEDSSL_DATA_DIR

.PHONY: test run reproduce bench gpu-check check-cuda clean

$(VENV)/.stamp: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.stamp

test: $(VENV)/.stamp
	$(PY) -m pytest -q tests

run: $(VENV)/.stamp
	$(PY) simclr.py --data pneumonia --epochs 10

# the paper's study (reproduce.py): PRESET=cpu (<= 45 min on 2 cores) or PRESET=paper (a GPU); more in ARGS,
# e.g. make reproduce ARGS="--folders ../shared/data/chest_xray_224". Finished runs are skipped on a rerun.
PRESET ?= cpu
reproduce: $(VENV)/.stamp
	$(PY) reproduce.py --preset $(PRESET) $(ARGS)

bench: $(VENV)/.stamp
	$(PY) bench.py

# on a machine with a GPU: build the CUDA op, run the op tests (CUDA ones included) and the GPU benchmark
gpu-check: $(VENV)/.stamp
	MEDSSL_REQUIRE_OP=1 $(PY) -m pytest -q tests/test_op.py
	$(PY) bench.py --devices cuda --sizes 64 224 --step-size 64 --out bench-gpu.json

# compile-only check of the CUDA kernel (no GPU needed): catches CUDA code that no longer builds
check-cuda: $(VENV)/.stamp
	$(PY) csrc/check_cuda.py

clean:
	rm -rf $(VENV) build .pytest_cache
