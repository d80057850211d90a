#!/usr/bin/env bash
# GPU host: where the time goes, then the biggest lever (engine replicas).
#   profile: plain LLM.generate on InternVL3-1B, 448 px (1 tile), 32 tokens, cProfile + GPU busy
#   sweep:   `internvl-batch run --compile` on the same kind of images, 1 / 2 / 4 replicas
# Everything lands in $OUT: profile.json, sweep.json (rates + GPU busy), logs.
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
export INTERNVL_BATCH_CACHE=${INTERNVL_BATCH_CACHE:-/tmp/ivb-cache}
N=${N:-3072}
REPLICAS=${REPLICAS:-"4 1 2"}  # 4 first: its replica 0 builds the cold cache entry, 3 wait
EXTRA=${EXTRA:-}
PROFILE=${PROFILE:-1}

if [ "$PROFILE" = 1 ]; then
  timeout 240 python3 benchmarks/profile_frontend.py --model preset:internvl3-1b --images 1024 \
    --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1
  echo "profile exit $?"
fi

python3 -m internvl_batch data coco-synth --sizes 448 --n "$N" --out /tmp/d448 >/dev/null
for r in $REPLICAS; do
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 -i 0 \
    > "/tmp/busy-r$r.txt" 2>/dev/null &
  smi=$!
  # host memory of every python process (parent, decode workers, replicas, engine cores)
  ( while sleep 1; do ps -C python3 -o rss= | awk '{s+=$1} END {print s/1048576}'; done ) \
    > "/tmp/rss-r$r.txt" &
  rss=$!
  limit=$([ -z "${warm:-}" ] && echo "${FIRST_LIMIT:-340}" || echo 140); warm=1
  timeout "$limit" python3 -m internvl_batch run --dataset coco --data-dir /tmp/d448/images \
    --annotations /tmp/d448/annotations/captions_synth.json --model preset:internvl3-1b \
    --compile --max-dynamic-patch 1 --max-tokens 32 --ignore-eos --replicas "$r" \
    --no-progress $EXTRA --output "/tmp/sweep-r$r" >> "$OUT/sweep.log" 2>&1
  echo "replicas $r exit $?" | tee -a "$OUT/sweep.log"
  kill $smi $rss 2>/dev/null
done

python3 - "$OUT" $REPLICAS <<'EOF'
import json, sys, glob
out, reps = sys.argv[1], sys.argv[2:]
doc = {}
for r in reps:
    st = glob.glob(f"/tmp/sweep-r{r}/*.stats.json")
    busy = [float(x) for x in open(f"/tmp/busy-r{r}.txt").read().split() if x.replace('.', '').isdigit()]
    d = json.load(open(st[0])) if st else {}
    s = d.get("summary", {})
    # GPU busy over the busiest stretch (generation), not engine start
    hot = sorted(busy)[len(busy) // 2:] if busy else []
    rss = [float(x) for x in open(f"/tmp/rss-r{r}.txt").read().split()]
    q = max(1, len(rss) // 4)
    doc[r] = {"images_per_s": s.get("images_per_s"), "generate_s": s.get("generate_s"),
              "init_s": s.get("init_s"), "requests": s.get("requests"),
              "output_tokens_per_s": s.get("output_tokens_per_s"),
              "cache_hit": s.get("cache_hit"), "gpu_peak_mem_gb": s.get("gpu_peak_mem_gb"),
              "gpu_busy_samples": len(busy),
              "gpu_busy_upper_half_mean": round(sum(hot) / len(hot), 1) if hot else None,
              "host_rss_gb_max": round(max(rss), 2) if rss else None,
              "host_rss_gb_last_quarter_mean": round(sum(rss[-q:]) / q, 2) if rss else None}
json.dump(doc, open(f"{out}/sweep.json", "w"), indent=1)
print(json.dumps(doc, indent=1))
EOF
grep -h "images_per_s\|per_image_ms" -A6 "$OUT/profile.json" 2>/dev/null | head -30
