#!/usr/bin/env bash
# CPU, cold start before/after a change: the README's first command (`run --dataset sample`,
# preset:tiny, one engine) on an empty --cache-dir each time, alternating the code at
# BEFORE (a git revision, checked out in a worktree) and the working tree, RUNS times each.
# Prints each run's time to first row, whole wall, and the start's "config resolved" phase
# (with "model class inspected here" where the engine inspected vLLM's model class itself).
# RUN_ARGS replaces `--dataset sample`; CACHE=shared keeps one cache per side (warm after
# its first run; every run is printed with its cache_hit).
# Usage: BEFORE=5f94d5e RUNS=3 bash benchmarks/cpu/cold-start-ab.sh
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
before=${BEFORE:?a git revision}; runs=${RUNS:-3}; work=${WORK:-/tmp/cold-start-ab}
rm -rf "$work"; mkdir -p "$work"
git -C "$root" worktree add -f --detach "$work/before-tree" "$before" >/dev/null
trap 'git -C "$root" worktree remove --force "$work/before-tree"' EXIT
for i in $(seq "$runs"); do
  for arm in before after; do
    d="$work/$arm-$i"; mkdir -p "$d"
    cache="$d/cache"; [ "${CACHE:-fresh}" = shared ] && cache="$work/$arm-cache"
    tree=$root; [ "$arm" = before ] && tree="$work/before-tree"
    t0=$(date +%s.%N)
    # from inside the tree: `python -m` puts the working directory first on sys.path
    # shellcheck disable=SC2086
    (cd "$tree" && "$root/.venv/bin/python" -m internvl_batch run ${RUN_ARGS:---dataset sample} \
        --output "$d/out" --cache-dir "$cache" --no-progress > "$d/log" 2>&1)
    rc=$?
    t1=$(date +%s.%N)
    python3 - "$arm" "$i" "$rc" "$t0" "$t1" "$d" <<'PY'
import glob, json, sys
arm, i, rc, t0, t1, d = sys.argv[1:]
st = json.load(open(glob.glob(f"{d}/out/*.stats.json")[0]))
ph = {p["phase"]: p["s"] for e in st["start_timeline"]["engines"] for p in e["phases"]}
print(json.dumps({"arm": arm, "run": int(i), "exit": int(rc),
                  "wall_s": round(float(t1) - float(t0), 1),
                  "time_to_first_row_s": st["time_to_first_row_s"],
                  "engines_ready_s": st["start_timeline"]["engines_ready_s"],
                  "cache_hit": st.get("cache_hit"),
                  "config_resolved_s": ph.get("config resolved"),
                  "model_class_inspected_here_s": ph.get("model class inspected here")}))
PY
  done
done
