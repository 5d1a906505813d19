# make test   - create .venv with the pinned CPU set (requirements/ci.txt), install mplug_fast, run the tests
# make demo   - the end-to-end demo: pretrain + finetune + evaluate on the synthetic world -> runs/demo/report.md
#               (resumable: run it again after Ctrl-C; DEMO_ARGS="--quick" / "--fresh" / "--threads 1" pass through)
# make lint   - ruff and the import-linter layers contract (also checked by make test)
# make bench  - the pytest-benchmark cases (tests/benchmarks) and benchmarks/end_to_end.py --quick
# make kernels - the full Triton compile gate (fp16, bf16, fp32 for sm_80 and sm_90); make test compiles bf16
# make install-check - the newcomer's path, not part of make test: a fresh venv, `pip install .` (not
#               editable), then `mplug-fast demo --quick` and a short caption run from an empty folder
#               (INSTALL_CHECK_DIR=... reuses that folder; INSTALL_CHECK_TORCH picks the torch wheel)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all test lint demo bench kernels install-check clean distclean

all: test

$(STAMP): requirements/ci.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -r requirements/ci.txt
	$(PY) -m pip install -e . --no-deps
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

INSTALL_CHECK_TORCH ?= torch==2.13.0

install-check:
	set -e; d="$${INSTALL_CHECK_DIR:-$$(mktemp -d)}"; rm -rf "$$d/empty"; mkdir -p "$$d/empty"; \
	echo "install check in $$d"; \
	python3 -m venv "$$d/venv"; \
	"$$d/venv/bin/pip" install -q "$(INSTALL_CHECK_TORCH)"; \
	"$$d/venv/bin/pip" install -q "$(CURDIR)"; \
	cd "$$d/empty"; export PATH="$$d/venv/bin:$$PATH" OMP_NUM_THREADS="$${OMP_NUM_THREADS:-1}"; \
	t=$$(date +%s); mplug-fast demo --quick; echo "demo --quick: $$(( $$(date +%s) - t )) s"; \
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
