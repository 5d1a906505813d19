# make test   - create .venv with the pinned CPU set (requirements/ci.txt), install mplug_fast, run the tests
# make demo   - the end-to-end demo: pretrain + finetune + evaluate on the synthetic world -> runs/demo/report.md
#               (resumable: run it again after Ctrl-C; DEMO_ARGS="--quick" / "--fresh" / "--threads 1" pass through)
# make lint   - ruff and the import-linter layers contract (also checked by make test)
# make bench  - the pytest-benchmark cases (tests/benchmarks) and benchmarks/end_to_end.py --quick
# make kernels - the full Triton compile gate (fp16, bf16, fp32 for sm_80 and sm_90); make test compiles bf16
# make install-check - the newcomer's path, not part of make test: a fresh venv, `pip install .` (not
#               editable), then the quick demo (examples/demo, `python -m demo` with examples/ on the path,
#               against the installed package) and a short caption run from an empty folder
#               (INSTALL_CHECK_DIR=... reuses that folder; INSTALL_CHECK_TORCH picks the torch wheel)
# make cuda-build-check - the native ops' CUDA build (not in make test: the CUDA torch is a 5.5 GB install):
#               a second venv (.venv-cuda) with torch 2.14.1 (cu130), `pip install .` builds _C for sm_80 and
#               sm_90 with nvcc, imports it, runs tests/native there (CPU), records the ptxas resource use
#               -> .benchmarks/cuda-build.log, benchmarks/results/cuda-build-check.json (docs/native.md)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all test lint demo bench kernels install-check cuda-build-check clean distclean

all: test

NATIVE_SOURCES := CMakeLists.txt $(wildcard kernels/*.h kernels/*.cpp kernels/cpu/*.cpp kernels/cuda/*.cu)

# --no-build-isolation: the native ops (kernels/) build against the venv's torch, with its cmake and ninja.
$(STAMP): requirements/ci.txt setup.py $(NATIVE_SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -r requirements/ci.txt
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

# Two pytest workers of one torch thread each (the machine has 2 cores), a test file per worker at a time in
# collection order: the files of the tests marked long come first (tests/conftest.py), so that no learning
# run is left to the end on one worker. The 20 slowest tests are listed.
test: $(STAMP)
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder --durations=20 tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m benchmark tests/benchmarks
	HF_HUB_OFFLINE=1 $(PY) benchmarks/end_to_end.py --quick --out .benchmarks/end-to-end-quick.json

kernels: $(STAMP)
	MPLUG_FAST_KERNEL_GATE=full $(PY) -m pytest -q tests/ops/test_kernel_resources.py

CUDA_VENV := .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python

cuda-build-check:
	test -x $(CUDA_PY) || python3 -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q torch==2.14.1 numpy==2.3.5 safetensors==0.8.0 tokenizers==0.23.3 \
		PyYAML==6.0.4 tqdm==4.70.1 pillow==13.0.0 pytest==9.2.0
	mkdir -p .benchmarks
	start=$$(date +%s); MPLUG_FAST_NVCC_FLAGS=-Xptxas=-v $(CUDA_PY) -m pip install -v --no-deps \
		--force-reinstall . > .benchmarks/cuda-build.log 2>&1; rc=$$?; \
		echo "pip install . (CUDA build): rc $$rc in $$(( $$(date +%s) - start )) s"; test $$rc -eq 0
	rm -rf .benchmarks/cuda-tests && mkdir -p .benchmarks/cuda-tests && cp -r tests/native .benchmarks/cuda-tests/
	cd .benchmarks/cuda-tests && OMP_NUM_THREADS=1 ../../$(CUDA_PY) -m pytest -q -p no:cacheprovider native \
		> ../cuda-tests.log 2>&1; rc=$$?; tail -3 ../cuda-tests.log; test $$rc -eq 0
	$(CUDA_PY) benchmarks/cuda_build_report.py .benchmarks/cuda-build.log .benchmarks/cuda-tests.log \
		--out benchmarks/results/cuda-build-check.json

lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

INSTALL_CHECK_TORCH ?= torch==2.13.0

install-check:
	set -e; d="$${INSTALL_CHECK_DIR:-$$(mktemp -d)}"; rm -rf "$$d/empty"; mkdir -p "$$d/empty"; \
	echo "install check in $$d"; \
	python3 -m venv "$$d/venv"; \
	"$$d/venv/bin/pip" install -q "$(INSTALL_CHECK_TORCH)"; \
	"$$d/venv/bin/pip" install -q "$(CURDIR)"; \
	cd "$$d/empty"; export PATH="$$d/venv/bin:$$PATH" OMP_NUM_THREADS="$${OMP_NUM_THREADS:-1}"; \
	t=$$(date +%s); PYTHONPATH="$(CURDIR)/examples" python -m demo --quick; \
		echo "demo --quick: $$(( $$(date +%s) - t )) s"; \
	t=$$(date +%s); mplug-fast train --task caption --config caption_tiny_synthetic \
		--set schedule.max_steps=100; echo "caption train: $$(( $$(date +%s) - t )) s"; \
	echo "install check passed ($$d)"

DEMO_ARGS ?=

demo: $(STAMP)
	$(PY) -m mplug_fast demo $(DEMO_ARGS)

clean:
	rm -rf build dist .eggs *.egg-info .pytest_cache .ruff_cache .hypothesis .benchmarks
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
