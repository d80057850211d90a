#!/usr/bin/env bash
# GPU host: where the time goes on COCO-like sizes (default max_dynamic_patch, ~10
# tiles per image), where `bench` saw the GPU only ~40 % busy. benchmarks/profile_frontend.py
# (cProfile of the calling process, GPU busy %) under py-spy, which samples every process,
# vLLM's engine core included; then the same with the multimodal processor cache off.
# Needs the py-spy wheel carried in .whl (see the device README).
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
export INTERNVL_BATCH_CACHE=${INTERNVL_BATCH_CACHE:-/tmp/ivb-cache} PYTHONUNBUFFERED=1
N=${N:-128}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/spy .whl/py_spy-*.whl
SPY=$(ls /tmp/spy/bin/py-spy 2>/dev/null)
args=(--model preset:internvl3-1b --sizes coco --max-dynamic-patch 12 --images "$N" --warmup 32)
if [ -n "$SPY" ]; then
  timeout 300 "$SPY" record --subprocesses --nonblocking -r 25 --format raw -o "$OUT/spy-coco.txt" -- \
    python3 benchmarks/profile_frontend.py "${args[@]}" --out "$OUT/prof-coco.json" \
    > "$OUT/prof-coco.log" 2>&1
  echo "profile (py-spy) exit $?"
else
  echo "py-spy missing: profiling without it"
  timeout 300 python3 benchmarks/profile_frontend.py "${args[@]}" --out "$OUT/prof-coco.json" \
    > "$OUT/prof-coco.log" 2>&1
fi
timeout 240 python3 benchmarks/profile_frontend.py "${args[@]}" --mm-cache-gb 0 \
  --out "$OUT/prof-coco-mmcache0.json" > "$OUT/prof-coco-mmcache0.log" 2>&1
echo "profile mm-cache 0 exit $?"
for f in "$OUT"/prof-coco*.json; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], {k: d[k] for k in ('images_per_s','gpu_busy_pct_mean','profiled_images_per_s')}, d['per_image_ms'])" "$f"
done
