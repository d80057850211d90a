#!/usr/bin/env bash
# GPU host: one sustained `internvl-batch run --compile --replicas R` over N 448 px
# images (InternVL3-1B, 1 tile, 32 tokens), with the GPU's busy % and the host memory of all
# python processes sampled; both are cut to the steady state [first batch, last batch].
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
export INTERNVL_BATCH_CACHE=${INTERNVL_BATCH_CACHE:-/tmp/ivb-cache}
N=${N:-10240}; R=${R:-4}; LIMIT=${LIMIT:-540}; TAG=${TAG:-r$R}
python3 -m internvl_batch data coco-synth --sizes 448 --n "$N" --out "/tmp/d448-$N" >/dev/null
( while sleep 0.25; do
    echo "$(date +%s.%N) $(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -i 0) \
$(ps -C python3 -o rss= | awk '{s+=$1} END {print s/1048576}')"
  done ) > "/tmp/mon-$TAG.txt" 2>/dev/null &
mon=$!
timeout "$LIMIT" python3 -m internvl_batch run --dataset coco --data-dir "/tmp/d448-$N/images" \
  --annotations "/tmp/d448-$N/annotations/captions_synth.json" --model preset:internvl3-1b \
  --compile --max-dynamic-patch 1 --max-tokens 32 --ignore-eos --replicas "$R" --no-progress \
  ${EXTRA:-} --output "/tmp/run-$TAG" > "$OUT/run-$TAG.log" 2>&1
echo "run exit $?"
kill $mon
python3 - "$TAG" "$OUT" <<'PY'
import glob, json, sys
tag, out = sys.argv[1:]
st = json.load(open(glob.glob(f"/tmp/run-{tag}/*.stats.json")[0]))
run = st["runs"][-1]
a, b = run["first_batch_at"], run["last_batch_at"]
mon = [l.split() for l in open(f"/tmp/mon-{tag}.txt") if len(l.split()) == 3]
win = [(float(t), float(u), float(m)) for t, u, m in mon if a <= float(t) <= b]
doc = {k: st.get(k) for k in ("images", "errors", "images_per_s", "output_tokens_per_s",
                              "generate_s", "init_s", "total_s", "cache_hit", "gpu_peak_mem_gb",
                              "peak_rss_gb")}
doc["steady_window_s"] = round(b - a, 2)
doc["gpu_busy_pct_mean_steady"] = round(sum(w[1] for w in win) / len(win), 1) if win else None
if win:
    q = max(1, len(win) // 4)
    doc["host_rss_gb_python_first_quarter"] = round(sum(w[2] for w in win[:q]) / q, 2)
    doc["host_rss_gb_python_last_quarter"] = round(sum(w[2] for w in win[-q:]) / q, 2)
doc["busy"] = [l.strip() for l in open(f"{out}/run-{tag}.log") if l.startswith("replicas busy")]
json.dump(doc, open(f"{out}/run-{tag}.json", "w"), indent=1)
print(json.dumps(doc, indent=1))
PY
grep -v "^(EngineCore\|^(Worker\|^INFO\|^WARNING\|^\[transformers\]\|^\[W1\|Capturing CUDA" "$OUT/run-$TAG.log" | tail -25
