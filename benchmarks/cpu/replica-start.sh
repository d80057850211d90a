#!/usr/bin/env bash
# CPU: the start of `run --replicas 2` with its replica processes forked from the
# fork server (the default) vs spawned (INTERNVL_BATCH_START_METHOD=spawn: replicas and their
# engine cores as fresh interpreters, vLLM's way). One warm-up run fills the compile cache; then
# ROUNDS rounds of the VARIANTS, each `name=mode` or `name=mode@dir` (run from the checkout
# in dir: an older commit), order rotating. Each command's wall time is taken here, from
# launch to exit; the rest comes from its stats.json.
set -uo pipefail
OUT=${OUT:-/tmp/ivb-replica-start}; mkdir -p "$OUT"
PY=${PY:-python3}; IVB="$PY -m internvl_batch"
N=${N:-200}; ROUNDS=${ROUNDS:-3}; CACHE=${CACHE:-/tmp/ivb-cpu15-cache}
D=/tmp/ivb-cpu15-data
[ -d $D/images ] || $IVB data coco-synth --sizes 448 --n "$N" --out $D >/dev/null
now() { date +%s.%N; }
one() {  # one <name> <engine start mode> [<checkout>]
  rm -rf "$OUT/$1"
  local t0 t1
  t0=$(now)
  (cd "${3:-.}" && INTERNVL_BATCH_START_METHOD=$2 $IVB run --dataset coco --data-dir $D/images \
    --annotations $D/annotations/captions_synth.json --limit "$N" --replicas 2 \
    --max-dynamic-patch 1 --max-tokens 4 --no-progress --cache-dir "$CACHE" \
    --output "$OUT/$1" > "$OUT/$1.log" 2>&1)
  local code=$?
  t1=$(now)
  $PY - "$1" "$code" "$t0" "$t1" "$OUT" <<'PY'
import glob, json, sys
name, code, t0, t1, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
st = json.load(open(glob.glob(f"{out}/{name}/*.stats.json")[0]))
tl = st.get("start_timeline") or {}
row = {"name": name, "exit": code, "wall_s": round(t1 - t0, 2),
       "time_to_first_row_s": st.get("time_to_first_row_s"), "shutdown_s": st.get("shutdown_s"),
       "images": st.get("images"),
       "replicas": [{k: e.get(k) for k in ("engine", "replica_start", "engine_start", "ready_s",
                                             "process_offset_s")} for e in tl.get("engines", [])]}
print(json.dumps(row))
with open(f"{out}/rows.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
PY
}
rm -f "$OUT/rows.jsonl"
one warmup forkserver
variants=(${VARIANTS:-forked=forkserver spawned=spawn})
for i in $(seq "$ROUNDS"); do
  for j in $(seq 0 $((${#variants[@]} - 1))); do
    v=${variants[$(( (i + j) % ${#variants[@]} ))]}
    name=${v%%=*}; rest=${v#*=}; mode=${rest%%@*}; dir=.; [[ $rest == *@* ]] && dir=${rest#*@}
    one "$name-$i" "$mode" "$dir"
  done
done
