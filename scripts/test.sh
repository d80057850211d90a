#!/usr/bin/env bash
# The project's test command (README, `make test`, CI): install CPU vLLM and the package into
# .venv, start a real one-node Slurm cluster (root + Debian), run every test, stop Slurm.
# Without root the Slurm, browser and Java tests are skipped and listed at the end, everything
# else runs; under IVB_NO_SKIP=1 (.ci/run sets it) any skip fails instead (tests/no_skip.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-cpu.sh .venv
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # `show` is tested in a real headless Chromium; `score` runs coco-caption's PTB tokenizer
  # and METEOR, which are Java
  if ! command -v chromium >/dev/null || ! command -v java >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      chromium default-jre-headless >/dev/null
  fi
  bash .ci/slurm-up.sh
  trap 'bash .ci/slurm-down.sh || true' EXIT
fi
# vLLM's CPU backend pins threads; leave it the machine's cores (2 on CI)
# -rs: every skip listed with its reason; --durations: the slowest tests, where CI time goes
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=1500 -rs --durations=30 "$@"
