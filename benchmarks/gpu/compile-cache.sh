#!/usr/bin/env bash
# GPU host (through the bundle): the compile cache, measured. PART=cold|warm|poison|race.
#   cold   3 x `cache warm --compile` on empty cache dirs (engine init cold)
#   warm   3 x `run --compile` on the entry built by `cold` (engine init warm, cache hit)
#   poison an entry built naively (encoder first traced on one tile), then a run that heals it
#   race   4 processes started together on one empty cache dir
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
IVB="python3 -m internvl_batch"
MODEL=/tmp/models/internvl3-1b
[ -d $MODEL ] || $IVB model synth --preset internvl3-1b --out $MODEL >/dev/null
[ -d /tmp/coco ] || $IVB data coco-synth --n 2000 --out /tmp/coco >/dev/null
COCO=(--dataset coco --data-dir /tmp/coco/images --annotations /tmp/coco/annotations/captions_synth.json)
init_of() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); r=d['runs'][-1]; print(f\"init_s={r['init_s']} cache_hit={r['cache_hit']} images_per_s={d['images_per_s']}\")" "$1"; }
case ${PART:-cold} in
cold)
  for i in 1 2 3; do
    rm -rf /tmp/cold-$i; mkdir -p /tmp/cold-$i/refs
    [ $i -gt 1 ] && cp /tmp/cold-1/refs/*.json /tmp/cold-$i/refs/  # same eager reference: time the build only
    $IVB cache warm --model $MODEL --compile --cache-dir /tmp/cold-$i > "$OUT/cold-$i.log" 2>&1
    echo "cold $i exit $?: $(grep -E '^(built|hit) ' "$OUT/cold-$i.log")"
  done
  grep -h "probe_check" -A0 /tmp/cold-*/entries/*/manifest.json | head -3 ;;
warm)
  for i in 1 2 3; do
    rm -rf /tmp/warm-out-$i
    $IVB run "${COCO[@]}" --limit 256 --model $MODEL --compile --cache-dir /tmp/cold-1 \
      --output /tmp/warm-out-$i --max-tokens 32 --ignore-eos --no-progress > "$OUT/warm-$i.log" 2>&1
    echo "warm $i exit $?: $(init_of /tmp/warm-out-$i/part-00000-of-00001.stats.json)"
  done
  $IVB cache ls --cache-dir /tmp/cold-1 ;;
poison)
  rm -rf /tmp/poison /tmp/poison-out
  $IVB cache warm --model $MODEL --compile --cache-dir /tmp/poison --naive > "$OUT/poison-build.log" 2>&1
  echo "naive build exit $?: $(grep -E '^(built|hit) ' "$OUT/poison-build.log")"
  $IVB run "${COCO[@]}" --limit 256 --model $MODEL --compile --cache-dir /tmp/poison \
    --output /tmp/poison-out --max-tokens 32 --ignore-eos --no-progress > "$OUT/poison-run.log" 2>&1
  echo "run on the poisoned entry exit $?"
  grep -E "poisoned|split_with_sizes|compile cache" "$OUT/poison-run.log" | cut -c1-400 | head -8
  ls /tmp/poison/quarantine/ 2>/dev/null; cat /tmp/poison/quarantine/*/QUARANTINED 2>/dev/null | cut -c1-300
  [ -f /tmp/poison-out/part-00000-of-00001.stats.json ] && init_of /tmp/poison-out/part-00000-of-00001.stats.json ;;
race)
  rm -rf /tmp/race /tmp/race-out-*
  pids=()
  for i in 1 2 3 4; do
    $IVB run "${COCO[@]}" --limit 64 --model $MODEL --compile --cache-dir /tmp/race \
      --gpu-memory-utilization 0.18 --output /tmp/race-out-$i --max-tokens 16 --ignore-eos \
      --no-progress > "$OUT/race-$i.log" 2>&1 &
    pids+=($!)
  done
  for i in 1 2 3 4; do wait ${pids[$((i-1))]}; echo "race $i exit $?"; done
  echo "builds: $(grep -l 'miss, building' "$OUT"/race-*.log | wc -l), waited: $(grep -l 'waiting for' "$OUT"/race-*.log | wc -l), crashes: $(grep -l Traceback "$OUT"/race-*.log | wc -l)"
  for i in 1 2 3 4; do init_of /tmp/race-out-$i/part-00000-of-00001.stats.json; done
  grep -h "compile cache" "$OUT"/race-*.log | sort | uniq -c ;;
esac
