#!/usr/bin/env bash
# GPU host: compiled vs eager encoder end to end where the GPU is the bound:
# one engine (compile_mm_encoder on) fed requests processed before the clock, its encoder
# switched between compiled and eager in alternating rounds (`internvl-batch bench-ab`), at one
# tile (448 px, max_dynamic_patch 1) and at COCO sizes (default tiles).
#
#   source .gpu/p2/activate.sh && bash benchmarks/gpu/encoder-ab-end-to-end.sh            # both workloads
#   SIZES=coco bash benchmarks/gpu/encoder-ab-end-to-end.sh                                # one of them
#
# Trained-like random weights (+weights: `model synth --weights`, generated on this host, never
# committed) so that greedy token agreement between the modes means something; throughput does
# not depend on the weights' values. Each workload is one process under its own `timeout`.
# Everything lands in $OUT: ab-internvl3-1b-{448,coco}.{json,md,png} and one log per run.
# More pairs than one call holds (for an interval of ±2 %): run it again with NAME_SUFFIX=-2 (other
# file names), then `python -m internvl_batch.bench.ab merge A.json B.json --name NAME`
# analyses the pairs of both runs together (same settings, device and versions, checked).
# EXTRA="--same-images" runs every round on one slice processed once, dropping the untimed
# decode and processing between rounds (14 s of each 27 s pair at one tile on the H100).
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
export INTERNVL_BATCH_CACHE=${INTERNVL_BATCH_CACHE:-/tmp/ivb-cache}
MODEL=${MODEL:-preset:internvl3-1b+weights}
SIZES=${SIZES:-448 coco}
# 12 timed pairs: bench-ab's order-statistics 95 % interval is then [3rd, 10th] of the sorted
# per-round ratios (96 % coverage); with 7 it is [min, max]
REPEATS=${REPEATS:-12}
LIMIT=${LIMIT:-560}  # seconds per workload
# more bench-ab options, e.g. "--engine-core process" (vLLM's own layout, as in the first H100
# runs) or "--gc-on"; bench-ab runs its engine core inline, with no garbage collection
# inside the clock, by default since the CPU A/A test (results/cpu-2core/ab-noise/)
EXTRA=${EXTRA:-}
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
for s in $SIZES; do
  name=ab-internvl3-1b-$s${NAME_SUFFIX:-}
  echo "[$(el) s] start $name (limit $LIMIT s)"
  # shellcheck disable=SC2086
  timeout -k 15 "$LIMIT" python3 -m internvl_batch bench-ab --model "$MODEL" \
    --sizes "$s" --repeats "$REPEATS" --results-dir "$OUT" --name "$name" $EXTRA \
    > "$OUT/$name.log" 2>&1
  echo "[$(el) s] $name exit $?"
  grep -E '^\[ *[0-9.]+ s\]' "$OUT/$name.log" | tail -14
  [ -f "$OUT/$name.md" ] && sed -n '/^| | compiled \/ eager/,/^$/p' "$OUT/$name.md"
  # the breakdown of the engine's GPU time (the profiled round)
  [ -f "$OUT/$name.md" ] && sed -n '/^GPU time by part/,/^- compiled: GPU busy/p' "$OUT/$name.md"
done
echo "[$(el) s] done"
