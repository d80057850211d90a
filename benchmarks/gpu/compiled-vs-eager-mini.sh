#!/usr/bin/env bash
# GPU host: the smallest headline measurement that fits one short call: InternVL3-1B, one
# 448 px tile per image, eager vs compiled encoder, interleaved repeats after a warm-up.
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
python3 -m internvl_batch bench --model preset:internvl3-1b --sizes 448 --max-dynamic-patch 1 \
  --variants compiled,eager --images 256 --repeats 3 --warmup-images 256 \
  --results-dir /tmp/results --name internvl3-1b-448-1tile-mini --cache-dir /tmp/ivb-cache \
  2>&1 | grep -v "cpu_worker" > "$OUT/bench.log"
echo "bench exit ${PIPESTATUS[0]}"
cp /tmp/results/*.json /tmp/results/*.md "$OUT/" 2>/dev/null
cat /tmp/results/*.md 2>/dev/null || tail -30 "$OUT/bench.log"
