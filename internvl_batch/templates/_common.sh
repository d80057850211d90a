# ---- configuration ------------------------------------------------------------------------
# Each setting is an environment variable with a default: sbatch passes the submitting shell's
# environment to the job (--export=ALL), so `IVB_MODEL=/models/x sbatch THIS_FILE` works without
# editing. To change a default for good, edit the value (a shell word) after the name.
ivb_set() {       # ivb_set NAME DEFAULT: keep $NAME when set and non-empty, else DEFAULT
  [ -n "${!1:-}" ] || printf -v "$1" '%s' "$2"
}
ivb_set_args() {  # ivb_set_args NAME DEFAULT: keep $NAME when set (even empty), else DEFAULT
  [ -n "${!1+set}" ] || printf -v "$1" '%s' "$2"
}
# the dataset: sample | coco | folder:DIR | parquet:GLOB | hf:NAME_OR_PATH
ivb_set IVB_DATASET @@DATASET@@
# the model: a checkpoint directory, a hub id or preset:NAME
ivb_set IVB_MODEL @@MODEL@@
# the output directory (one Parquet file per shard)
ivb_set IVB_OUTPUT @@OUTPUT@@
# the shared compile cache: every node must see it
ivb_set IVB_CACHE_DIR @@CACHE_DIR@@
# engine options (--compile, --max-model-len N, --dtype ...), given to `cache warm` AND `run`
# so that both build or look up the same compile-cache entry; shell quoting is honoured
ivb_set_args IVB_ENGINE_ARGS @@ENGINE_ARGS@@
# options for `run` only (--data-dir, --annotations, --max-tokens, --prompt "...", ...)
ivb_set_args IVB_EXTRA_ARGS @@EXTRA_ARGS@@
# 1: a GPU job; 0: the CPU-only variant
ivb_set IVB_GPU @@GPU@@
# GPUs of one task's engine: N for --tensor-parallel-size N in IVB_ENGINE_ARGS (the #SBATCH
# lines above must then request N GPUs per task too)
ivb_set IVB_GPUS_PER_TASK @@GPUS_PER_TASK@@
# a shell line run first, e.g. 'source /path/to/venv/bin/activate' or 'module load cuda'
ivb_set_args IVB_ACTIVATE @@ACTIVATE@@
# the internvl-batch executable
ivb_set IVB_BIN @@BIN@@

# ---- environment --------------------------------------------------------------------------
if [ -n "$IVB_ACTIVATE" ]; then
  eval "$IVB_ACTIVATE" || { echo "ivb: IVB_ACTIVATE failed: $IVB_ACTIVATE" >&2; exit 2; }
fi
if ! command -v "$IVB_BIN" >/dev/null 2>&1; then
  echo "ivb: '$IVB_BIN' not found; set IVB_ACTIVATE (venv activation) or IVB_BIN" >&2
  exit 2
fi
# The app derives the vLLM/torch caches from --cache-dir; hub downloads go next to them.
export HF_HOME="${IVB_HF_HOME:-$IVB_CACHE_DIR/hf}"
# Node-local scratch for temporary files (removed when the job step ends).
IVB_SCRATCH="${SLURM_TMPDIR:-/tmp}/ivb-${SLURM_JOB_ID:-$$}"
mkdir -p "$IVB_SCRATCH" && export TMPDIR="$IVB_SCRATCH"
trap 'rm -rf "$IVB_SCRATCH"' EXIT
export PYTHONUNBUFFERED=1
eval "ivb_engine_args=($IVB_ENGINE_ARGS)" || { echo "ivb: bad IVB_ENGINE_ARGS" >&2; exit 2; }
eval "ivb_extra_args=($IVB_EXTRA_ARGS)" || { echo "ivb: bad IVB_EXTRA_ARGS" >&2; exit 2; }
echo "ivb: $(date '+%F %T') job ${SLURM_JOB_ID:-none} on $(hostname -s)" \
  "restart ${SLURM_RESTART_COUNT:-0}, model $IVB_MODEL, cache $IVB_CACHE_DIR"
if [ "$IVB_GPU" = 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L || true
fi
