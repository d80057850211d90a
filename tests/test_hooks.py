"""hooks.py's pure parts (the worker-side methods run in the vLLM tests)."""
from __future__ import annotations

import pytest

from internvl_batch import hooks


def test_predicted_speedup_is_amdahl():
    assert hooks.predicted_speedup(0.0, 2.0) == 1.0
    assert hooks.predicted_speedup(1.0, 2.0) == 2.0
    assert hooks.predicted_speedup(0.2, 1.1) == pytest.approx(1 / (0.8 + 0.2 / 1.1))


def test_engine_kwargs_load_the_extension(tmp_path):
    """Every engine carries the worker extension: the cache probe and bench-ab rely on it."""
    from internvl_batch.checkpoint import ensure
    from internvl_batch.config import EngineSpec
    from internvl_batch.engine import llm_kwargs

    model = ensure("tiny", tmp_path / "models")
    kw = llm_kwargs(EngineSpec(model=str(model)), cuda=False)
    assert kw["worker_extension_cls"] == hooks.EXTENSION == "internvl_batch.hooks.EncoderControl"


def test_gate_is_installed_only_where_asked(monkeypatch):
    """install_gate wraps the worker's determine_available_memory only with GATE_ENV set."""
    import sys
    import types

    mod = types.ModuleType("vllm.v1.worker.gpu_worker")

    class Worker:
        def determine_available_memory(self):
            return 42

    Worker.__module__ = mod.__name__
    mod.Worker = Worker
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.delenv(hooks.GATE_ENV, raising=False)
    hooks.install_gate()
    assert not getattr(Worker.determine_available_memory, "_ivb_gated", False)
    seen = []
    monkeypatch.setenv(hooks.GATE_ENV, "/some/entry")
    monkeypatch.setattr(hooks, "wait_for_entry", lambda e: seen.append(e) or 0.0)
    hooks.install_gate()
    hooks.install_gate()  # idempotent: wrapped once
    assert Worker().determine_available_memory() == 42 and seen == ["/some/entry"]
