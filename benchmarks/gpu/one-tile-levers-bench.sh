#!/usr/bin/env bash
# GPU host: one-tile throughput levers, each as one `internvl-batch bench
# --variants pipeline` (one engine-pool start, a warm-up, then REPEATS timed repeats of
# IMAGES images; median and min-max of images/s, GPU busy %, % of the measured bf16 roofline).
# CONFIGS: name:flags pairs; a name ending in "mps" runs under CUDA MPS. Each config is
# skipped once the call's time (DEADLINE, epoch seconds) runs short.
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT/levers"
IMAGES=${IMAGES:-3072}; REPEATS=${REPEATS:-3}; WARM=${WARM:-1024}
CONFIGS=${CONFIGS:-"r4:--replicas=4 r6:--replicas=6 r4ecg:--replicas=4,--encoder-cudagraphs r6ecgmps:--replicas=6,--encoder-cudagraphs"}
for c in $CONFIGS; do
  name=${c%%:*}; flags=$(echo "${c#*:}" | tr ',' ' ')
  left=$(python3 -c "import time; print(min(int(${DEADLINE:-1e12} - time.time()), 100000))")
  [ "$left" -lt 150 ] && { echo "skip $name: ${left}s left"; continue; }
  case $name in *mps) nvidia-cuda-mps-control -d && echo "MPS on";; esac
  t0=$(date +%s.%N)
  timeout $((left - 10)) python3 -m internvl_batch bench --variants pipeline --sizes 448 \
    --max-dynamic-patch 1 --images "$IMAGES" --repeats "$REPEATS" --warmup-images "$WARM" \
    --cache-dir /tmp/ivb-cache-gpu --work-dir /tmp/ivb-bench-levers --name "lever-$name" \
    --results-dir "$OUT/levers" $flags > "$OUT/levers/lever-$name.log" 2>&1
  code=$?
  case $name in *mps) echo quit | nvidia-cuda-mps-control;; esac
  echo "$name exit $code wall $(python3 -c "import time; print(round(time.time() - $t0, 1))")"
  grep -A12 "^| variant" "$OUT/levers/lever-$name.md" 2>/dev/null | head -8
done
