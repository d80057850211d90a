#!/usr/bin/env bash
# GPU host: start and stop, measured in one call. The plain LLM.generate script
# (engine start, end to end), then `internvl-batch run --compile` (default replicas) on an
# empty compile cache (cold) and again on the entry it built (warm), N one-tile images each.
# Each command's wall time is taken here, outside it, from launch to exit.
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
N=${N:-2000}        # images for the plain script and the warm run
NCOLD=${NCOLD:-$N}  # images for the cold run (10240: also a sustained-throughput run)
IVB="python3 -m internvl_batch"
$IVB data coco-synth --sizes 448 --n "${DATA_N:-$NCOLD}" --out /tmp/d448 >/dev/null
$IVB model synth --preset internvl3-1b --out /tmp/models/internvl3-1b >/dev/null
now() { date +%s.%N; }
echo "{}" > "$OUT/walls.json"
# PLAIN_RUNS=2: the plain script twice; the second start finds vLLM's own compile cache
# (~/.cache/vllm) that the first one wrote, as a second job on the same node would
# PLAIN_N="2000 500": the first run captions 2000 images, the second 500 (default: N each)
# PLAIN_FRESH=1: empty vLLM's, Inductor's and Triton's caches (default places) before each
# plain run, so that every one starts as the first on a fresh node does
plain_n=(${PLAIN_N:-})
runs=${PLAIN_RUNS:-${#plain_n[@]}}; [ "$runs" -lt 1 ] && runs=1
for i in $(seq "$runs"); do
  [ -n "${SKIP_PLAIN:-}" ] && break
  pn=${plain_n[$((i - 1))]:-$N}
  log="$OUT/plain.log"; key=plain_wall_s; [ "$i" -gt 1 ] && { log="$OUT/plain-$i.log"; key=plain_${i}_wall_s; }
  [ -n "${PLAIN_FRESH:-}" ] && rm -rf "$HOME/.cache/vllm" "/tmp/torchinductor_$(id -un)" "$HOME/.triton"
  t0=$(now)
  python3 -m internvl_batch.bench.plain --model /tmp/models/internvl3-1b --images /tmp/d448/images \
    --limit "$pn" --max-dynamic-patch 1 --max-tokens 32 > "$log" 2>&1
  t1=$(now); echo "plain #$i $(grep -E '^(engine start|[0-9]+ images)' "$log" | tr '\n' ' ') wall $(python3 -c "print($t1 - $t0)")"
  python3 -c "import json; w=json.load(open('$OUT/walls.json')); w['$key']=$t1-$t0; json.dump(w, open('$OUT/walls.json','w'))"
done
# PHASES: cold (on an emptied cache) and warm, each with the engine-core
# start that INTERNVL_BATCH_START_METHOD says (internvl_batch/processes/); a phase ending in
# -spawn or -fs sets it to spawn or auto; one with -fr forks the replicas from the fork server
# (INTERNVL_BATCH_START_METHOD=forkserver; a GPU spawns them by default since the forked ones
# served a third of the rate, results/h200/start-stop-forked-replicas/), e.g. warm-fr-2000;
# one ending in -<digits> captions that many images; -coco: COCO sizes, default tiles;
# _<k> after all that names a repeat (warm_2). Each is skipped once the call's time runs short.
for phase in ${PHASES:-cold warm}; do
  base=${phase%_*}
  n=$N; [ "${base%%-*}" = cold ] && { n=$NCOLD; rm -rf /tmp/ivb-cache-gpu; }
  [[ $base =~ -([0-9]+)$ ]] && n=${BASH_REMATCH[1]}
  left=$(python3 -c "import time; print(min(int(${DEADLINE:-1e12} - time.time()), 100000))")
  [ "$left" -lt 100 ] && { echo "skip $phase: ${left}s left"; continue; }
  envx=""
  [[ $base == *-spawn* ]] && envx="INTERNVL_BATCH_START_METHOD=spawn"
  [[ $base == *-fs* ]] && envx="INTERNVL_BATCH_START_METHOD=auto"
  [[ $base == *-fr* ]] && envx="INTERNVL_BATCH_START_METHOD=forkserver"
  # a phase with -coco captions COCO-sized images at the default tiles (the second
  # throughput workload) instead of one-tile 448 px ones
  data=/tmp/d448; tiles="--max-dynamic-patch 1"
  if [[ $base == *-coco* ]]; then
    data=/tmp/dcoco; tiles=""
    [ -d $data ] || $IVB data coco-synth --n "$n" --out $data >/dev/null
  fi
  rm -rf "/tmp/run15-$phase"
  t0=$(now)
  env $envx timeout $((left - 10)) $IVB run --dataset coco --limit "$n" --data-dir $data/images \
    --annotations $data/annotations/captions_synth.json \
    --model preset:internvl3-1b --compile $tiles --max-tokens 32 --ignore-eos \
    --cache-dir /tmp/ivb-cache-gpu --no-progress ${EXTRA:-} --output "/tmp/run15-$phase" > "$OUT/run-$phase.log" 2>&1
  code=$?
  t1=$(now)
  echo "run $phase exit $code wall $(python3 -c "print($t1 - $t0)")"
  python3 - "$phase" "$(python3 -c "print($t1 - $t0)")" "$OUT" <<'PY'
import glob, json, sys
phase, wall, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
w = json.load(open(f"{out}/walls.json"))
w[f"run_{phase}_wall_s"] = wall
st = glob.glob(f"/tmp/run15-{phase}/*.stats.json")
if st:
    d = json.load(open(st[0]))
    keep = ("images", "errors", "images_per_s", "init_s", "generate_s", "total_s", "cache_hit",
            "time_to_first_row_s", "shutdown_s", "images_per_gpu_hour", "start_timeline",
            "gpu_name", "replicas", "host_rss")
    w[f"run_{phase}_stats"] = {k: d.get(k) for k in keep}
    r = d.get("runs", [{}])[-1]
    w[f"run_{phase}_stats"]["last_run"] = {k: r.get(k) for k in r if not isinstance(r.get(k), (list, dict))}
json.dump(w, open(f"{out}/walls.json", "w"), indent=1)
PY
done
# FRONT_COST=1: then one engine front's host cost per image (benchmarks/front_cost.py)
left=$(python3 -c "import time; print(min(int(${DEADLINE:-1e12} - time.time()), 100000))")
if [ -n "${FRONT_COST:-}" ] && [ "$left" -gt 150 ]; then
  timeout $((left - 20)) python3 benchmarks/front_cost.py --model /tmp/models/internvl3-1b \
    --images /tmp/d448/images --n 300 --out "$OUT/front-cost.json" > "$OUT/front-cost.log" 2>&1
  echo "front cost exit $?"; tail -30 "$OUT/front-cost.log" | grep " ms "
fi
mkdir -p "$OUT/stats"
for d in /tmp/run15-*; do cp "$d"/*.stats.json "$OUT/stats/${d#/tmp/run15-}.stats.json" 2>/dev/null; done
tar czf "$OUT/logs.tgz" -C /tmp $(cd /tmp && ls -d run15-*/logs 2>/dev/null) 2>/dev/null
grep -h "compile cache\|replicas ready\|encoder check\|waited" "$OUT"/run-cold*.log | cut -c1-300 | head -20
python3 -c "import json;d=json.load(open('$OUT/walls.json'));print(json.dumps({k:(v if not isinstance(v,dict) else {a:b for a,b in v.items() if a!='start_timeline'}) for k,v in d.items()},indent=0))" | head -80
