# make test   - create .venv with the pinned CPU set (requirements/ci.txt), install mplug_fast, run the tests
# make demo   - the end-to-end demo: pretrain + finetune + evaluate on the synthetic world -> runs/demo/report.md
#               (resumable: run it again after Ctrl-C; DEMO_ARGS="--quick" / "--fresh" / "--threads 1" pass through)
# make lint   - ruff and the import-linter layers contract (also checked by make test)
# make bench  - the pytest-benchmark cases (tests/benchmarks) and benchmarks/end_to_end.py --quick
# make kernels - the full Triton compile gate (fp16, bf16, fp32 for sm_80 and sm_90); make test compiles bf16
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all test lint demo bench kernels clean distclean

all: test

NATIVE_SOURCES := CMakeLists.txt $(wildcard kernels/*.h kernels/*.cpp kernels/cpu/*.cpp kernels/cuda/*.cu)

# --no-build-isolation: the native ops (kernels/) build against the venv's torch, with its cmake and ninja.
$(STAMP): requirements/ci.txt setup.py $(NATIVE_SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -r requirements/ci.txt
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

test: $(STAMP)
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m benchmark tests/benchmarks
	HF_HUB_OFFLINE=1 $(PY) benchmarks/end_to_end.py --quick --out .benchmarks/end-to-end-quick.json

kernels: $(STAMP)
	MPLUG_FAST_KERNEL_GATE=full $(PY) -m pytest -q tests/ops/test_kernel_resources.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

DEMO_ARGS ?=

demo: $(STAMP)
	$(PY) -m mplug_fast demo $(DEMO_ARGS)

clean:
	rm -rf build dist .eggs *.egg-info .pytest_cache .ruff_cache .hypothesis .benchmarks
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
