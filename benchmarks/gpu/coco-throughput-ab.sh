#!/usr/bin/env bash
# GPU host: `run` at COCO sizes (InternVL3-1B shapes, default tiles, 32 tokens, --compile),
# this tree against another commit's tree (OLD_TREE, a `git archive` unpacked), each cold on
# its own cache and then warm, with GPU busy % sampled by nvidia-smi and, for PHASES ending
# in -spy, every process under py-spy (host time by process and category: bench/spy.py).
# PHASES: words NAME-(cold|warm)[-WORD...] where NAME is `new` (this tree) or `old` (OLD_TREE);
# WORDs: spy (py-spy), engine / workers (--preprocess), r<N> (--replicas N), n<N> (N images),
# 1tile (448 px images, one tile each), _<k> at the end names a repeat.
# EXTRA_<NAME> adds run flags for that tree.
set -uo pipefail
OUT=${OUT:-/tmp/ivb-out}; mkdir -p "$OUT"
N=${N:-1024}
DEADLINE=${DEADLINE:-$(( $(date +%s) + 540 ))}
IVB="python3 -m internvl_batch"
[ -d /tmp/dcoco ] || $IVB data coco-synth --n "$N" --out /tmp/dcoco >/dev/null
$IVB model synth --preset internvl3-1b --out /tmp/models/internvl3-1b >/dev/null
SPY=""
if ls .whl/py_spy-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/spy .whl/py_spy-*.whl
  SPY=/tmp/spy/bin/py-spy
fi
now() { date +%s.%N; }
for phase in ${PHASES:-new-cold old-cold new-warm old-warm}; do
  left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -lt 90 ] && { echo "skip $phase: ${left}s left"; continue; }
  name=${phase%%-*}; mode=$(echo "$phase" | cut -d- -f2)
  words=" $(echo "${phase%_*}" | cut -d- -f3- | tr - ' ') "
  flags=(); n=$N; data=/tmp/dcoco
  [[ $words == *" engine "* ]] && flags+=(--preprocess engine)
  [[ $words == *" workers "* ]] && flags+=(--preprocess workers)
  [[ $words =~ \ r([0-9]+)\  ]] && flags+=(--replicas "${BASH_REMATCH[1]}")
  [[ $words =~ \ n([0-9]+)\  ]] && n=${BASH_REMATCH[1]}
  if [[ $words == *" 1tile "* ]]; then
    data=/tmp/d448; flags+=(--max-dynamic-patch 1)
    [ -d $data ] || $IVB data coco-synth --sizes 448 --n "${N448:-8192}" --out $data >/dev/null
  fi
  path=$PYTHONPATH; [ "$name" = old ] && path="$OLD_TREE:${PYTHONPATH#*:}"
  [ "$mode" = cold ] && rm -rf "/tmp/cache-$name"
  extra_var="EXTRA_$name"; extra=${!extra_var:-}
  rm -rf "/tmp/run-$phase"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 200 \
    > "$OUT/smi-$phase.csv" 2>/dev/null &
  smi=$!
  cmd=(env PYTHONPATH="$path" timeout $((left - 5)) python3 -m internvl_batch run --dataset coco
       --limit "$n" --data-dir $data/images
       --annotations $data/annotations/captions_synth.json "${flags[@]}"
       --model preset:internvl3-1b --compile --max-tokens 32 --ignore-eos
       --cache-dir "/tmp/cache-$name" --no-progress $extra --output "/tmp/run-$phase")
  t0=$(now)
  if [[ $words == *" spy "* && -n $SPY ]]; then
    "${cmd[@]}" > "$OUT/run-$phase.log" 2>&1 &
    pid=$!
    sleep 1
    $SPY record --subprocesses --idle --nonblocking -r 20 --format raw -o "$OUT/spy-$phase.txt" \
      --pid "$pid" > "$OUT/spy-$phase.log" 2>&1 &
    wait "$pid"; code=$?
    sleep 2
  else
    "${cmd[@]}" > "$OUT/run-$phase.log" 2>&1; code=$?
  fi
  t1=$(now)
  kill $smi 2>/dev/null
  python3 - "$phase" "$t0" "$t1" "$code" "$OUT" <<'PY'
import glob, json, sys
phase, t0, t1, code, out = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rec = {"phase": phase, "exit": code, "wall_s": round(t1 - t0, 2)}
st = glob.glob(f"/tmp/run-{phase}/*stats.json")
if st:
    d = json.load(open(st[0]))
    for k in ("images", "images_per_s", "time_to_first_row_s", "init_s", "generate_s", "total_s",
              "cache_hit", "replicas", "gpu_name", "image_tokens", "images_per_gpu_hour"):
        rec[k] = d.get(k)
    r = (d.get("runs") or [{}])[-1]
    rec["run"] = {k: v for k, v in r.items() if not isinstance(v, (list, dict))}
    import shutil
    shutil.copy(st[0], f"{out}/{phase}.stats.json")
busy = []
for line in open(f"{out}/smi-{phase}.csv"):
    p = [x.strip() for x in line.split(",")]
    try:
        busy.append(float(p[1].split()[0]))
    except (IndexError, ValueError):
        pass
if busy:
    rec["gpu_util_mean"] = round(sum(busy) / len(busy), 1)
    act = [b for b in busy if b > 0]
    rec["gpu_util_mean_while_active"] = round(sum(act) / max(1, len(act)), 1)
print(json.dumps(rec))
with open(f"{out}/summary.jsonl", "a") as f:
    f.write(json.dumps(rec) + "\n")
PY
done
if [ -n "$SPY" ]; then
  for f in "$OUT"/spy-*.txt; do
    [ -s "$f" ] && python3 -m internvl_batch.bench.spy "$f" --rate 20 --json "${f%.txt}.json" > "${f%.txt}.md" 2>&1
  done
fi
