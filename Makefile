# internvl-batch: install, test, reproduce the benchmark.
#   make reproduce             GPU host: the headline configs; no GPU: a small CPU run
#   make reproduce PY=python3  a Python where the package is importable (GPU host: PYTHONPATH)
# On a GPU host each config takes ~5-8 min (engine starts + runs) once the compile cache holds
# its entries (cold: +5 min each); where one command may only run 10 minutes, run
# `make bench-encoder`, `make bench-ab`'s two commands, `make bench-2b`, `make bench-1b`,
# `make bench-coco`, `make report` as separate calls.
PY ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
IVB = $(PY) -m internvl_batch
# headline: one 448 px tile per image (max_dynamic_patch 1), 512 images per repeat, 3 repeats,
# the four variants interleaved after a warm-up as large as a repeat (a smaller one left the
# first repeat slower on CPU). The pipeline variant runs engine replicas as `run` does on an
# H100 (4 for 1B; 3 for 2B, so that all four variants fit in 80 GB at once).
HEADLINE_VARIANTS = --variants eager,compiled,plain,pipeline
HEADLINE = --sizes 448 --max-dynamic-patch 1 $(HEADLINE_VARIANTS) \
           --images 512 --repeats 3 --warmup-images 512
BENCH_ARGS ?=
RESULTS ?= results
CPU_OUT ?= results/cpu
GPU_RUNS = $(RESULTS)/internvl3-2b-448-1tile.json $(RESULTS)/internvl3-1b-448-1tile.json \
           $(RESULTS)/internvl3-1b-coco.json $(RESULTS)/internvl3-1b-448-1tile-throughput.json \
           $(RESULTS)/internvl3-1b-coco-plain-vs-replicas4.json

.PHONY: install test reproduce reproduce-gpu reproduce-cpu bench-encoder bench-2b bench-1b bench-run-coco \
        bench-coco bench-ab bench-throughput bench-throughput-coco report

install:
	bash scripts/install-cpu.sh

# the README's test command (installs into .venv if needed, real Slurm when root on Debian)
test:
	bash scripts/test.sh $(TEST_ARGS)

reproduce:
	@if nvidia-smi >/dev/null 2>&1; then $(MAKE) --no-print-directory reproduce-gpu; \
	else echo "no GPU (nvidia-smi failed): small CPU run, NOT the headline numbers"; \
	$(MAKE) --no-print-directory reproduce-cpu; fi

reproduce-gpu: bench-encoder bench-ab bench-2b bench-1b bench-coco report

# the InternViT encoder alone inside a real engine, eager vs compiled vs compiled +
# encoder CUDA graphs, per tile batch, for InternViT-300M (InternVL3-1B/2B) and InternViT-6B,
# as benchmarks/gpu/encoder-alone.sh runs it (H100: 156 s and 233 s, engine starts included).
# VLLM_USE_V2_MODEL_RUNNER=0: vLLM 0.26's default model runner for InternVL (V2) has no
# encoder CUDA graphs and ignores cudagraph_mm_encoder; the V1 runner measures all three modes.
# Not in reproduce-cpu: on CPU only eager runs (vLLM's compiled InternVL encoder fails there),
# which says nothing about the compiled encoder, and it was not timed under 2 minutes on 2 cores.
ENC_OUT ?= $(RESULTS)/encoder-alone
ENC_ENV = VLLM_USE_V2_MODEL_RUNNER=0 TORCH_LOGS=recompiles,graph_breaks
bench-encoder:
	$(ENC_ENV) $(IVB) bench-encoder --model preset:internvl3-1b --batches 1,2,4,8,13,32,64,128 \
	    --repeats 30 --warmup 5 --results-dir $(ENC_OUT) --name encoder-internvl3-1b-v1runner
	$(ENC_ENV) $(IVB) bench-encoder --model preset:internvit-6b --batches 1,2,4,8,13,32 \
	    --repeats 20 --warmup 3 --results-dir $(ENC_OUT) --name encoder-internvit-6b-v1runner
	$(PY) -m internvl_batch.bench.encoder report $(ENC_OUT) $$(ls $(ENC_OUT)/encoder-*.json)

# compiled vs eager encoder end to end in one engine fed requests processed
# beforehand, the two modes alternating round by round (bench-ab), with trained-like random
# weights; the pair counts of the committed H100 runs (one tile 38 pairs in 527 s with
# --same-images, COCO sizes 14 pairs in 390 s; docs/performance.md), one command each
AB_OUT ?= $(RESULTS)/encoder-ab-end-to-end
bench-ab:
	$(IVB) bench-ab --model preset:internvl3-1b+weights --sizes 448 --images 2048 \
	    --repeats 38 --same-images --profile-images 0 --results-dir $(AB_OUT) \
	    --name ab-internvl3-1b-448-same
	$(IVB) bench-ab --model preset:internvl3-1b+weights --sizes coco --repeats 14 \
	    --profile-images 0 --results-dir $(AB_OUT) --name ab-internvl3-1b-coco-2

bench-2b:
	$(IVB) bench --model preset:internvl3-2b $(HEADLINE) --results-dir $(RESULTS) \
	    --name internvl3-2b-448-1tile --replicas 3 $(BENCH_ARGS)

bench-1b:
	$(IVB) bench --model preset:internvl3-1b $(HEADLINE) --results-dir $(RESULTS) \
	    --name internvl3-1b-448-1tile --replicas 4 $(BENCH_ARGS)

# the tiles-per-image axis: COCO-like sizes (640x480 and friends) at the checkpoint's default
# max_dynamic_patch (12: ~7-13 tiles per image), where the encoder is most of the GPU's work.
# 2 pipeline replicas: all four variants alive at once fit in 80 GB at these activation
# sizes (measured); bench-throughput-coco has the 4-replica pipeline against the plain script
bench-coco:
	$(IVB) bench --model preset:internvl3-1b --sizes coco $(HEADLINE_VARIANTS) \
	    --images 192 --repeats 3 --warmup-images 64 --results-dir $(RESULTS) \
	    --name internvl3-1b-coco --replicas 2 $(BENCH_ARGS)

report:
	$(PY) -m internvl_batch.bench.report $$(ls $(GPU_RUNS) 2>/dev/null) --out $(RESULTS)

# tiny synthesized model, 32 images per repeat: exercises every path in ~2-3 min on 2 cores
reproduce-cpu:
	$(IVB) bench --model preset:tiny --images 32 --variants eager,plain,pipeline --repeats 2 \
	    --warmup-images 32 --workers 2 --cpu-ok --results-dir $(CPU_OUT) --name cpu-tiny $(BENCH_ARGS)
	$(PY) -m internvl_batch.bench.report $(CPU_OUT)/cpu-tiny.json --out $(CPU_OUT)

# the throughput question: `run`'s path (4 compiled engine replicas) against the plain
# script, in one command, on repeats long enough (3 batches of 256 per replica) that filling
# and draining the replicas is a small part of each (fits a 10-minute GPU call, warm cache)
bench-throughput:
	$(IVB) bench --model preset:internvl3-1b --sizes 448 --max-dynamic-patch 1 \
	    --variants plain,pipeline --replicas 4 --images 3072 --repeats 3 --warmup-images 512 \
	    --results-dir $(RESULTS) --name internvl3-1b-448-1tile-throughput $(BENCH_ARGS)

# the same on COCO-like sizes, default max_dynamic_patch (~10 tiles per image): each frontend
# spends ~60-120 ms tiling one image, so here too the replicas multiply the frontends
bench-throughput-coco:
	$(IVB) bench --model preset:internvl3-1b --sizes coco --variants plain,pipeline \
	    --replicas 4 --images 384 --repeats 3 --warmup-images 64 \
	    --results-dir $(RESULTS) --name internvl3-1b-coco-plain-vs-replicas4 $(BENCH_ARGS)

# `run` itself at COCO sizes (1,024 images, default tiles, --compile), this tree against the
# tree of commit OLD, each cold on its own cache and then warm, GPU busy % sampled: the check
# that a change to the feed (workers, replicas, batches) did not cost images/s, e.g.
#   make bench-run-coco OLD=main~5
OLD ?= HEAD
bench-run-coco:
	rm -rf .bisect && mkdir -p .bisect && git archive $(OLD) internvl_batch | tar -x -C .bisect
	OLD_TREE=$$PWD/.bisect PHASES="new-cold old-cold new-warm old-warm" \
	    bash benchmarks/gpu/coco-throughput-ab.sh

