#!/usr/bin/env bash
# GPU host: build compile-cache entries side by side, one `cache warm` per argument
# "PRESET MAX_DYNAMIC_PATCH" (0: the checkpoint's default), each with a fixed KV cache so
# they start together, logs under $OUT. The benches that follow then start from hits.
#   bash benchmarks/gpu/warm-cache.sh "internvl3-1b 1" "internvl3-2b 1" "internvl3-1b 0"
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
export INTERNVL_BATCH_CACHE=${INTERNVL_BATCH_CACHE:-/tmp/ivb-cache}
LIMIT=${LIMIT:-560}
t0=$(date +%s)
for spec in "$@"; do
  read -r preset mdp <<<"$spec"
  args=(--model "preset:$preset" --compile --kv-cache-gb 2 --gpu-memory-utilization 0.25)
  [ "${mdp:-0}" != 0 ] && args+=(--max-dynamic-patch "$mdp")
  ( timeout "$LIMIT" python3 -m internvl_batch cache warm "${args[@]}" \
      > "$OUT/warm-$preset-$mdp.log" 2>&1
    echo "warm $preset mdp=$mdp exit $? after $(( $(date +%s) - t0 )) s" ) &
done
wait
python3 -m internvl_batch cache ls
