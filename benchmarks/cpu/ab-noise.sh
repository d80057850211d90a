#!/usr/bin/env bash
# CPU: how much of `bench-ab`'s per-round spread is the harness's own noise.
# On CPU both "modes" run the same eager encoder (vLLM's compiled InternVL encoder fails
# there), so every run is an A/A test: the per-round compiled/eager ratio should be 1, and its
# spread is noise. CONFIGS are `name:bench-ab options`; each runs ROUNDS times, the configs
# interleaved. Prints, per run, the SD of the per-round log ratio and bench-ab's own median and
# 95 % interval.
set -uo pipefail
OUT=${OUT:-/tmp/ivb-ab-noise}; mkdir -p "$OUT"
PY=${PY:-python3}
ROUNDS=${ROUNDS:-3}; IMAGES=${IMAGES:-160}; REPEATS=${REPEATS:-10}
CONFIGS=${CONFIGS:-"proc:--engine-core process --gc-on|inline:--engine-core inline --gc-on|procgc:--engine-core process --gc-off|inlinegc:--engine-core inline --gc-off"}
IFS='|' read -r -a cfgs <<< "$CONFIGS"
for k in $(seq 1 "$ROUNDS"); do
  for cfg in "${cfgs[@]}"; do
    name=${cfg%%:*}_$k; args=${cfg#*:}
    # shellcheck disable=SC2086
    $PY -m internvl_batch bench-ab --model preset:tiny+weights --images "$IMAGES" \
      --repeats "$REPEATS" --max-tokens 16 --profile-images 0 --results-dir "$OUT" \
      --name "$name" $args > "$OUT/$name.log" 2>&1
    echo "$name exit $?"
  done
done
$PY - "$OUT" <<'PY'
import glob, json, math, statistics as st, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/*.json")):
    d = json.load(open(f))
    t = [r for r in d["rounds"] if r["kind"] == "timed"]
    logr = [math.log(r["modes"]["compiled"]["images_per_s"] / r["modes"]["eager"]["images_per_s"])
            for r in t]
    a = d["analysis"]["end_to_end"]["images_per_s"]
    med = lambda m: st.median(r["modes"][m]["images_per_s"] for r in t)  # noqa: E731
    print(f"{d['name']:12s} per-round ratio SD {100 * st.stdev(logr):5.1f} %  median "
          f"{a['median']:.4f} ({a['lo']:.4f}-{a['hi']:.4f}, +-{a['half_width_pct']:.1f} %)  "
          f"images/s eager {med('eager'):6.1f} compiled {med('compiled'):6.1f}  "
          f"whole run {d['total_s']} s")
PY
