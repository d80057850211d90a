# internvl-batch: install, test, reproduce the benchmark.
#   make reproduce             GPU host: the headline configs; no GPU: a small CPU run
#   make reproduce PY=python3  a Python where the package is importable (GPU host: PYTHONPATH)
PY ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
IVB = $(PY) -m internvl_batch
# headline: one tile per image, 512 images per repeat, the four variants interleaved
HEADLINE = --sizes 448 --max-dynamic-patch 1 --variants eager,compiled,plain,pipeline
BENCH_ARGS ?=
CPU_OUT ?= results/cpu

.PHONY: install test reproduce reproduce-gpu reproduce-cpu

install:
	bash scripts/install-cpu.sh

test:
	.venv/bin/python -m pytest -q

reproduce:
	@if nvidia-smi >/dev/null 2>&1; then $(MAKE) --no-print-directory reproduce-gpu; \
	else echo "no GPU (nvidia-smi failed): small CPU run, NOT the headline numbers"; \
	$(MAKE) --no-print-directory reproduce-cpu; fi

reproduce-gpu:
	$(IVB) bench --model preset:internvl3-2b $(HEADLINE) --name internvl3-2b-448-1tile $(BENCH_ARGS)
	$(IVB) bench --model preset:internvl3-1b $(HEADLINE) --name internvl3-1b-448-1tile $(BENCH_ARGS)
	$(PY) -m internvl_batch.report results/internvl3-2b-448-1tile.json \
	    results/internvl3-1b-448-1tile.json --out results

reproduce-cpu:
	$(IVB) bench --model preset:tiny --images 32 --variants eager,plain,pipeline --repeats 2 \
	    --warmup-images 32 --workers 2 --cpu-ok --results-dir $(CPU_OUT) --name cpu-tiny $(BENCH_ARGS)
	$(PY) -m internvl_batch.report $(CPU_OUT)/cpu-tiny.json --out $(CPU_OUT)
