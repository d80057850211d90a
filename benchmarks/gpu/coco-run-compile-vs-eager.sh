#!/usr/bin/env bash
# GPU host (through the bundle): `internvl-batch run --dataset coco` on a synthesized
# InternVL3-1B and 2000 generated COCO-like images, with and without --compile.
# Writes logs and stats.json files to $OUT. Modes: "compile no-compile" (default) or one.
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
N=${N:-2000}
export INTERNVL_BATCH_CACHE=${INTERNVL_BATCH_CACHE:-/tmp/ivb-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
COCO=(--dataset coco --data-dir /tmp/coco/images --annotations /tmp/coco/annotations/captions_synth.json)
[ -d /tmp/coco ] || python3 -m internvl_batch data coco-synth --n "$N" --out /tmp/coco >/dev/null
for mode in ${MODES:-compile no-compile}; do
  rm -rf "/tmp/out-$mode"
  python3 -m internvl_batch run "${COCO[@]}" --model preset:internvl3-1b --$mode \
    --output "/tmp/out-$mode" --max-tokens 32 --ignore-eos --no-progress \
    > "$OUT/run-$mode.log" 2>&1
  echo "== $mode exit $?"
  grep -E "compile cache|WARNING compile|Error|error" "$OUT/run-$mode.log" | grep -v "cpu_worker" | head -5
  sed -n '/^internvl-batch part/,$p' "$OUT/run-$mode.log"
  cp /tmp/out-$mode/*.stats.json "$OUT/stats-$mode.json" 2>/dev/null
done
