#!/usr/bin/env bash
# GPU host: the opt-in FP8 mode against bf16 in one bench command: the plain script
# (bf16), `run`'s path (bf16) and `run`'s path with --quantization fp8, all alive at once,
# interleaved repeats after a warm-up. Trained-like random weights (+weights, generated here,
# never committed) so that the caption agreement of FP8 with bf16 means something.
#
#   source .gpu/p2/activate.sh && DEADLINE=$(( $(date +%s) + 560 )) bash benchmarks/gpu/fp8-vs-bf16.sh
#   SIZES=coco IMAGES=256 bash benchmarks/gpu/fp8-vs-bf16.sh      # COCO sizes, default tiles
#
# Writes $OUT/fp8/fp8-<sizes>.{json,md,log}.
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT/fp8"
export INTERNVL_BATCH_CACHE=${INTERNVL_BATCH_CACHE:-/tmp/ivb-cache}
MODEL=${MODEL:-preset:internvl3-1b+weights}
SIZES=${SIZES:-448}
IMAGES=${IMAGES:-2048}; REPEATS=${REPEATS:-3}; WARM=${WARM:-512}
REPLICAS=${REPLICAS:-3}  # two pipelines of 3 replicas + plain: 7 engines on one GPU
left=$(python3 -c "import time; print(min(int(${DEADLINE:-1e12} - time.time()), 100000))")
tiles=()
[ "$SIZES" = 448 ] && tiles=(--max-dynamic-patch 1)
name=fp8-$SIZES
echo "start $name (${left}s left)"
timeout $((left - 10)) python3 -m internvl_batch bench --model "$MODEL" --sizes "$SIZES" \
  ${tiles[@]+"${tiles[@]}"} --variants plain,pipeline,pipeline-fp8 --replicas "$REPLICAS" \
  --images "$IMAGES" --repeats "$REPEATS" --warmup-images "$WARM" \
  --results-dir "$OUT/fp8" --name "$name" > "$OUT/fp8/$name.log" 2>&1
echo "$name exit $?"
sed -n '/^| variant/,/^$/p;/^| ratio/,/^$/p;/^Captions/p' "$OUT/fp8/$name.md" 2>/dev/null
