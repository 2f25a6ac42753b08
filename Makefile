# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
READY  := $(VENV)/.cs_kernels_ready

.PHONY: setup build test test-fast test-models lint docs cuda-check gpu-check gpu-rehearsal demo reproduce bench bench-load clean

setup: $(READY)

$(READY): tools/bootstrap.py requirements-dev.txt setup.py pyproject.toml $(wildcard csrc/*) $(wildcard csrc/cuda/*)
	$(PYTHON) tools/bootstrap.py --venv $(VENV)
	@touch $(READY)

# Rebuild the C++ extension now (e.g. after a torch upgrade left a stale binary).
build: $(READY)
	$(PY) -m pip install --no-build-isolation --no-deps -e .

lint: $(READY)
	$(PY) tools/static_checks.py

# The documentation site (MkDocs + Material + mkdocstrings, mkdocs.yml) into site/, warnings as
# errors: a broken link or anchor, a page left out of the nav, a public name missing from
# docs/api.md (tools/docs_hooks.py) fail the build.
docs: $(READY)
	@$(PY) -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null || { \
	  echo "make docs: mkdocs-material and mkdocstrings-python are not installed in $(VENV) (requirements-dev.txt)"; exit 1; }
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# Then, also under the GPU machines' triton 3.6.0 (.venv-triton36, made by the set-up): the
# ahead-of-time compile of every kernel configuration and the interpreter suites. Then the
# real torchvision/timm models on the newest torch (test-models), and the GPU run rehearsed
# with the GPU machines' versions (gpu-rehearsal; the real models again, on torch 2.11).
test: $(READY)
	$(PY) tools/static_checks.py
	$(PY) tools/check_cuda_compile.py
	$(MAKE) docs
	CS_KERNELS_REQUIRE_CPU=1 $(PY) -m pytest -q tests
	$(MAKE) test-models
	$(MAKE) gpu-rehearsal

# The real torchvision/timm models (tests/test_real_models.py) in an interpreter that imports
# them: .venv where it does (GPU machines), else .venv-models (created on first use: the newest
# CUDA build of torch pip takes here, which runs on the CPU, with torchvision and timm; 5.6 GB).
test-models: $(READY)
	$(PYTHON) tools/models_env.py --main $(PY) --env newest --venv .venv-models

# `make gpu-check` rehearsed without a GPU (tools/gpu_rehearsal.py, about 6 minutes on 2
# cores): in a copy of the tree, with the twin's python, the CUDA build for sm_90, the suite on
# the CPU with that build, the benchmark and demo at CPU sizes; logs in gpu-rehearsal-results/.
gpu-rehearsal: $(READY)
	$(PYTHON) tools/gpu_rehearsal.py --venv .venv-gpu-twin --results gpu-rehearsal-results

# Compile-only check of the CUDA kernels (sm_80, sm_90); skipped with a message without nvcc.
cuda-check: $(READY)
	$(PY) tools/check_cuda_compile.py

# The prepared GPU run (tools/gpu_check.py, about 9 minutes on an H100/H200): build for the
# visible GPU, the suite on CUDA, the benchmark table, the demo on CUDA; logs and JSON into
# $(RESULTS). No set-up and no network: $(PYTHON) must already have torch with CUDA, triton,
# pytest, hypothesis, ninja and pybind11. A rerun can skip stages:
#   make gpu-check RESULTS=out GPU_CHECK_FLAGS="--skip build"
RESULTS ?= gpu-check-results
GPU_CHECK_FLAGS ?=
gpu-check:
	$(PYTHON) tools/gpu_check.py --results $(RESULTS) $(GPU_CHECK_FLAGS)

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
	$(PY) benchmarks/step_table.py --save

# The Phase 2 table beside three busy processes (as data-loader workers or a second job would be).
bench-load: $(READY)
	$(PY) benchmarks/phase2_table.py --load 3 --save

clean:
	rm -rf $(VENV) .venv-triton36 .venv-models .venv-gpu-twin build dist site *.egg-info cs_kernels/*.so gpu-rehearsal-results
