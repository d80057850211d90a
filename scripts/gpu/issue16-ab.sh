#!/usr/bin/env bash
# GPU host, issue 16 item 4: compiled vs eager encoder end to end where the GPU is the bound:
# one engine (compile_mm_encoder on) fed requests processed before the clock, its encoder
# switched between compiled and eager in alternating rounds (`internvl-batch bench-ab`), at one
# tile (448 px, max_dynamic_patch 1) and at COCO sizes (default tiles).
#
#   source .gpu/p2/activate.sh && bash scripts/gpu/issue16-ab.sh            # both workloads
#   SIZES=coco bash scripts/gpu/issue16-ab.sh                                # one of them
#
# Trained-like random weights (+weights: `model synth --weights`, generated on this host, never
# committed) so that greedy token agreement between the modes means something; throughput does
# not depend on the weights' values. Each workload is one process under its own `timeout`.
# Everything lands in $OUT: ab-internvl3-1b-{448,coco}.{json,md,png} and one log per run.
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
export INTERNVL_BATCH_CACHE=${INTERNVL_BATCH_CACHE:-/tmp/ivb-cache}
MODEL=${MODEL:-preset:internvl3-1b+weights}
SIZES=${SIZES:-448 coco}
# 12 timed pairs: bench-ab's order-statistics 95 % interval is then [3rd, 10th] of the sorted
# per-round ratios (96 % coverage); with 7 it is [min, max]
REPEATS=${REPEATS:-12}
LIMIT=${LIMIT:-560}  # seconds per workload
# more bench-ab options, e.g. "--engine-core process" (vLLM's own layout, as on the H100 on
# 2026-11-25) or "--gc-off"; the engine core runs inline by default since the CPU A/A test
# (results/cpu-2core/ab-noise/)
EXTRA=${EXTRA:-}
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
for s in $SIZES; do
  name=ab-internvl3-1b-$s
  echo "[$(el) s] start $name (limit $LIMIT s)"
  # shellcheck disable=SC2086
  timeout -k 15 "$LIMIT" python3 -m internvl_batch bench-ab --model "$MODEL" --sizes "$s" \
    --repeats "$REPEATS" --results-dir "$OUT" --name "$name" $EXTRA > "$OUT/$name.log" 2>&1
  echo "[$(el) s] $name exit $?"
  grep -E '^\[ *[0-9.]+ s\]' "$OUT/$name.log" | tail -14
  [ -f "$OUT/$name.md" ] && sed -n '/^| | compiled \/ eager/,/^$/p' "$OUT/$name.md"
  # issue 14's breakdown of the engine's GPU time (the profiled round)
  [ -f "$OUT/$name.md" ] && sed -n '/^GPU time by part/,/^- compiled: GPU busy/p' "$OUT/$name.md"
done
echo "[$(el) s] done"
