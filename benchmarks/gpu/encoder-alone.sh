#!/usr/bin/env bash
# GPU host: the InternViT encoder alone inside a real vLLM engine,
# eager vs compiled (compile_mm_encoder) vs compiled + encoder CUDA graphs
# (cudagraph_mm_encoder), for InternViT-300M (InternVL3-1B/2B) and InternViT-6B (InternVL3-38B):
# timings per tile batch, agreement with eager, and which code path ran.
#
#   source .gpu/p2/activate.sh && bash benchmarks/gpu/encoder-alone.sh
#
# VLLM_USE_V2_MODEL_RUNNER=0: vLLM 0.26 runs InternVL on its V2 model runner by default
# (vllm/v1/worker/gpu/model_runner.py), which has no encoder CUDA graph manager and silently
# ignores cudagraph_mm_encoder; only the V1 runner (vllm/v1/worker/gpu_model_runner.py,
# _create_encoder_cudagraph_manager from capture_model) measures the third mode. The first
# H100 run without it (results/h100/encoder-alone/encoder-{internvl3-1b,internvit-6b}.json) got
# eager and compiled only; the committed *-v1runner files are this configuration.
#
# One process (one engine start) per model, each under its own `timeout`; if a model's engine
# cannot start with encoder CUDA graphs, it is retried once without them, time permitting.
# Everything lands in $OUT: encoder-*-v1runner.{json,md,png} (names as committed),
# ENCODER.md + encoder.png (both models),
# one log per run (vLLM log + TORCH_LOGS=recompiles,graph_breaks), torch-logs.txt (the
# recompile / graph-break lines of all logs). Measured on an H100 (V1 runner, cold compile
# cache, engine start included): 156 s for 300M, 233 s for 6B.
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
export INTERNVL_BATCH_CACHE=${INTERNVL_BATCH_CACHE:-/tmp/ivb-cache}
export TORCH_LOGS=${TORCH_LOGS:-recompiles,graph_breaks}
export VLLM_USE_V2_MODEL_RUNNER=${VLLM_USE_V2_MODEL_RUNNER:-0}  # the V1 runner: see above
DEADLINE=${DEADLINE:-540}           # seconds for the whole script; fallbacks only if they fit
B300=${B300:-1,2,4,8,13,32,64,128}  # 300M: ~1.3 ms per tile eager
B6B=${B6B:-1,2,4,8,13,32}           # 6B: ~20-25 ms per tile; 64/128 would double the run
R300=${R300:-30}; W300=${W300:-5}
R6B=${R6B:-20}; W6B=${W6B:-3}
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }
left() { echo $(( DEADLINE - $(el) )); }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"

# measured NAME: 0 if NAME.json holds at least one timed (mode, batch)
measured() {
  python3 - "$OUT/$1.json" <<'PY' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
sys.exit(0 if any(m.get("ms", {}).get("median") for b in d["batches"]
                  for m in b["modes"].values()) else 1)
PY
}

# run NAME LIMIT ARGS...: one bench-encoder process; 0 if it measured anything
run() {
  local name=$1 limit=$2; shift 2
  [ "$(left)" -lt 60 ] && { echo "[$(el) s] skip $name: $(left) s left"; return 1; }
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  echo "[$(el) s] start $name (limit $limit s): $*"
  timeout -k 15 "$limit" python3 -m internvl_batch bench-encoder "$@" \
    --results-dir "$OUT" --name "$name" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$(el) s] $name exit $rc"
  grep -E '^\[ *[0-9.]+ s\]' "$OUT/$name.log" | tail -14
  grep -E 'Error|error' "$OUT/$name.log" | grep -v INFO | tail -3
  measured "$name"
}

# 300M (InternVL3-1B; the 2B has the same encoder)
if ! run encoder-internvl3-1b-v1runner 240 --model preset:internvl3-1b --batches "$B300" \
    --repeats "$R300" --warmup "$W300"; then
  run encoder-internvl3-1b-v1runner-nocg 200 --model preset:internvl3-1b --batches "$B300" \
    --repeats "$R300" --warmup "$W300" --modes eager,compiled
fi

# 6B (InternVL3-38B's encoder, a 0.5B LM so the engine stays small)
if ! run encoder-internvit-6b-v1runner 330 --model preset:internvit-6b --batches "$B6B" \
    --repeats "$R6B" --warmup "$W6B"; then
  run encoder-internvit-6b-v1runner-nocg 300 --model preset:internvit-6b --batches "$B6B" \
    --repeats "$R6B" --warmup "$W6B" --modes eager,compiled
fi

grep -hE 'Recompil|recompil|[Gg]raph break|GRAPH_BREAK|torch._dynamo hit' "$OUT"/encoder-*.log \
  > "$OUT/torch-logs.txt" 2>/dev/null
echo "[$(el) s] TORCH_LOGS lines (recompiles, graph breaks): $(wc -l < "$OUT/torch-logs.txt")"
python3 -m internvl_batch.bench.encoder report "$OUT" "$OUT"/encoder-*.json
# the tables, for the caller's log
sed -n '/^| tiles | eager ms/,/^$/p' "$OUT/ENCODER.md"
grep -E '^\| (compiled|cudagraph|eager) \| [0-9]+ \|' "$OUT/ENCODER.md" | head -24
echo "[$(el) s] done"
