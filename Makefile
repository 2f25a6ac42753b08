# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
READY  := $(VENV)/.cs_kernels_ready

.PHONY: setup build test test-fast lint cuda-check demo reproduce bench clean

setup: $(READY)

$(READY): tools/bootstrap.py requirements-dev.txt setup.py pyproject.toml $(wildcard csrc/*) $(wildcard csrc/cuda/*)
	$(PYTHON) tools/bootstrap.py --venv $(VENV)
	@touch $(READY)

# Rebuild the C++ extension now (e.g. after a torch upgrade left a stale binary).
build: $(READY)
	$(PY) -m pip install --no-build-isolation --no-deps -e .

lint: $(READY)
	$(PY) tools/static_checks.py

test: $(READY)
	$(PY) tools/static_checks.py
	$(PY) tools/check_cuda_compile.py
	CS_KERNELS_REQUIRE_CPU=1 $(PY) -m pytest -q tests

# Compile-only check of the CUDA kernels (sm_80, sm_90); skipped with a message without nvcc.
cuda-check: $(READY)
	$(PY) tools/check_cuda_compile.py

test-fast: $(READY)
	$(PY) -m pytest -q -x tests

demo: $(READY)
	$(PY) python/demo.py

# The paper's comparison, 3 seeds each, not in `make test`: MultiDigits (9 methods, about 20 min
# on 2 CPU cores), then Scenes (11 methods, at most 90 min). `make reproduce WHICH=scenes` (or
# WHICH=multidigits) runs one.
WHICH ?= all
reproduce: $(READY)
	@case "$(WHICH)" in all|multidigits|scenes) ;; \
	  *) echo "WHICH must be all, multidigits or scenes, got '$(WHICH)'"; exit 2 ;; esac
	if [ "$(WHICH)" != scenes ]; then $(PY) python/reproduce.py; fi
	if [ "$(WHICH)" != multidigits ]; then $(PY) python/reproduce.py --benchmark scenes; fi

bench: $(READY)
	$(PY) benchmarks/phase2_table.py --save
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-json=benchmarks/results/pytest-benchmark-latest.json

clean:
	rm -rf $(VENV) build *.egg-info cs_kernels/*.so
