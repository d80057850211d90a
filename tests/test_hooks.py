"""hooks.py's pure parts and its methods on a fake worker (the real worker runs them in the
vLLM tests)."""
from __future__ import annotations

import pytest

from internvl_batch import hooks


def test_ivb_call_runs_a_named_function_with_the_worker():
    """The benchmark wing's worker-side code is reached by name: the function gets the
    worker (its model through `serving_model`) and the call's arguments."""
    from types import SimpleNamespace

    model = SimpleNamespace(vision_model=SimpleNamespace(encoder=SimpleNamespace(layers=[
        SimpleNamespace(do_not_compile=False), SimpleNamespace()])))

    class Worker(hooks.EncoderControl):
        model_runner = SimpleNamespace(get_model=lambda: model)

    w = Worker()
    assert w.ivb_call("internvl_batch.hooks:serving_model") is model
    assert w.ivb_call("internvl_batch.hooks:compile_flags") == [False, True]
    info = w.ivb_call("internvl_batch.bench.profiling:runner_info")
    assert (info["encoder_layers"], info["compilable_layers"]) == (2, 1)
    assert w.ivb_encoder_mode("eager")["compilable_layers"] == 1  # the flags saved first
    assert [layer.do_not_compile for layer in model.vision_model.encoder.layers] == [True, True]
    w.ivb_encoder_mode("compiled")
    assert model.vision_model.encoder.layers[0].do_not_compile is False
    with pytest.raises(AttributeError):
        w.ivb_call("internvl_batch.hooks:no_such_function")


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
