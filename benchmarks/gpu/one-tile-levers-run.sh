#!/usr/bin/env bash
# GPU host: one-tile throughput levers screened with `internvl-batch run` (one run
# each, same images, same warm compile cache as start-stop.sh): the default, 6 replicas,
# encoder CUDA graphs, and 6 replicas under CUDA MPS. Host RSS of all python processes and
# GPU busy % are sampled every 0.5 s; stats.json of each run is kept.
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
N=${N:-10240}
CONFIGS=${CONFIGS:-"default r6 ecg r6mps"}
IVB="python3 -m internvl_batch"
[ -d "/tmp/d448-$N" ] || $IVB data coco-synth --sizes 448 --n "$N" --out "/tmp/d448-$N" >/dev/null
ANN=/tmp/d448-$N/annotations/captions_synth.json
for c in $CONFIGS; do
  case $c in
    default) X="";;
    r6) X="--replicas 6";;
    ecg) X="--encoder-cudagraphs";;
    r6mps) X="--replicas 6"; nvidia-cuda-mps-control -d && echo "MPS on";;
  esac
  ( while sleep 0.5; do
      echo "$(date +%s.%N) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -i 0 | tr -d ',') \
$(ps -C python3 -o rss= | awk '{s+=$1} END {print s/1048576}')"
    done ) > "/tmp/mon-$c.txt" 2>/dev/null &
  mon=$!
  t0=$(date +%s.%N)
  timeout ${LIMIT:-280} $IVB run --dataset coco --data-dir "/tmp/d448-$N/images" --annotations "$ANN" \
    --model preset:internvl3-1b --compile --max-dynamic-patch 1 --max-tokens 32 --ignore-eos \
    --cache-dir /tmp/ivb-cache-gpu --no-progress $X --output "/tmp/run-$c" > "$OUT/run-$c.log" 2>&1
  code=$?; t1=$(date +%s.%N)
  kill $mon
  [ "$c" = r6mps ] && echo quit | nvidia-cuda-mps-control
  python3 - "$c" "$code" "$(python3 -c "print($t1 - $t0)")" "$OUT" <<'PY'
import glob, json, sys
c, code, wall, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
doc = {"config": c, "exit": code, "wall_s": wall}
st = glob.glob(f"/tmp/run-{c}/*.stats.json")
if st:
    d = json.load(open(st[0]))
    doc.update({k: d.get(k) for k in ("images", "errors", "images_per_s", "output_tokens_per_s",
               "init_s", "generate_s", "total_s", "time_to_first_row_s", "shutdown_s",
               "images_per_gpu_hour", "gpu_peak_mem_gb", "peak_rss_gb", "replicas", "gpu_name",
               "image_tokens")})
    r = d["runs"][-1]
    a, b = r.get("first_batch_at"), r.get("last_batch_at")
    mon = [l.split() for l in open(f"/tmp/mon-{c}.txt") if len(l.split()) == 4]
    win = [(float(t), float(u), float(g), float(m)) for t, u, g, m in mon if a and b and a <= float(t) <= b]
    if win:
        doc["gpu_busy_pct_steady"] = round(sum(w[1] for w in win) / len(win), 1)
        doc["gpu_mem_gb_max"] = round(max(w[2] for w in win) / 1024, 1)
        n = len(win)
        doc["host_rss_gb_all_python_at_10pct"] = round(win[n // 10][3], 2)
        doc["host_rss_gb_all_python_at_end"] = round(win[-1][3], 2)
        doc["host_rss_gb_all_python_max"] = round(max(w[3] for w in win), 2)
    doc["busy"] = [l.strip()[:300] for l in open(f"{out}/run-{c}.log") if l.startswith("replicas busy")]
json.dump(doc, open(f"{out}/run-{c}.json", "w"), indent=1)
print(json.dumps({k: v for k, v in doc.items() if k != "busy"}))
PY
  cp /tmp/run-$c/*.stats.json "$OUT/run-$c.stats.json" 2>/dev/null
done
