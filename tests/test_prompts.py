"""Prompts, config validation, shard-from-env and vLLM kwargs: pure functions, no engine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_batch import prompts
from internvl_batch.config import (ConfigError, EngineSpec, PromptSpec, RunConfig, SamplingSpec,
                                   default_cache_dir, shard_from_env)
from internvl_batch.sources import SourceSpec

ROOT = Path(__file__).resolve().parents[1]


# -- prompts -----------------------------------------------------------------------------------

def test_render_without_system_prompt():
    assert prompts.render(PromptSpec("Describe this image.")) == (
        "<|im_start|>user\n<image>\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n")


def test_render_with_system_prompt():
    assert prompts.render(PromptSpec("What is it?", "You are terse.")) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n")


def test_render_default_prompt():
    assert prompts.render(PromptSpec()) == (
        "<|im_start|>user\n<image>\nDescribe this image in one sentence.<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert prompts.render(PromptSpec(system_prompt="")) == prompts.render(PromptSpec())


def test_request():
    img = object()
    assert prompts.request("p", img) == {"prompt": "p", "multi_modal_data": {"image": img}}
    assert prompts.request("p", img, {"max_dynamic_patch": 2}) == {
        "prompt": "p", "multi_modal_data": {"image": img},
        "mm_processor_kwargs": {"max_dynamic_patch": 2}}
    assert prompts.STOP_STRINGS == ["<|im_end|>", "<|endoftext|>"]


# -- config validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "--max-tokens must be >= 1"),
    ({"temperature": -0.1}, "--temperature must be a number >= 0"),
    ({"top_p": 0.0}, "--top-p must be in (0, 1]"),
    ({"top_p": 1.5}, "--top-p must be in (0, 1]"),
])
def test_sampling_spec_errors(kwargs, message):
    with pytest.raises(ConfigError) as e:
        SamplingSpec(**kwargs)
    assert str(e.value) == message


def test_sampling_spec_ok():
    s = SamplingSpec(max_tokens=1, temperature=0, top_p=1.0)
    assert (s.max_tokens, s.seed, s.ignore_eos) == (1, 0, False)


@pytest.mark.parametrize("kwargs, message", [
    ({"model": ""}, "--model is required"),
    ({"max_dynamic_patch": 0}, "--max-dynamic-patch must be between 1 and 40"),
    ({"max_dynamic_patch": 41}, "--max-dynamic-patch must be between 1 and 40"),
    ({"gpu_memory_utilization": 0.0}, "--gpu-memory-utilization must be in (0, 1]"),
    ({"gpu_memory_utilization": 1.01}, "--gpu-memory-utilization must be in (0, 1]"),
    ({"max_model_len": 255}, "--max-model-len must be >= 256"),
    ({"compile": True, "enforce_eager": True},
     "--compile and --enforce-eager contradict each other"),
])
def test_engine_spec_errors(kwargs, message):
    with pytest.raises(ConfigError) as e:
        EngineSpec(**{"model": "m", **kwargs})
    assert str(e.value) == message


def test_prompt_spec_empty():
    with pytest.raises(ConfigError, match=r"^--prompt is empty$"):
        PromptSpec("   \n")


def _run_config(**kw):
    return RunConfig(source=SourceSpec.parse("sample"), engine=EngineSpec(model="m"),
                     output=Path("/tmp/out"), cache_dir=Path("/tmp/c"), **kw)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "--batch-size must be >= 1"),
    ({"num_shards": 0}, "--num-shards must be >= 1"),
    ({"num_shards": 2, "shard_index": 2}, "--shard-index 2 is outside 0..1 (--num-shards 2)"),
    ({"num_shards": 2, "shard_index": -1}, "--shard-index -1 is outside 0..1 (--num-shards 2)"),
    ({"workers": -1}, "--workers must be >= 0"),
    ({"max_error_rate": 1.5}, "--max-error-rate must be between 0 and 1"),
    ({"max_error_rate": -0.1}, "--max-error-rate must be between 0 and 1"),
])
def test_run_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as e:
        _run_config(**kwargs)
    assert str(e.value) == message


def test_run_config_to_dict_is_json():
    import json

    d = _run_config(num_shards=4, shard_index=3).to_dict()
    assert d["output"] == "/tmp/out" and d["cache_dir"] == "/tmp/c"
    assert d["engine"]["model"] == "m" and d["source"]["kind"] == "sample"
    assert (d["num_shards"], d["shard_index"]) == (4, 3)
    json.dumps(d)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERNVL_BATCH_CACHE", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("INTERNVL_BATCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "internvl-batch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert default_cache_dir() == tmp_path / "h" / ".cache" / "internvl-batch"


# -- shard_from_env ------------------------------------------------------------------------------

def test_shard_from_env_no_slurm(clean_env):
    assert shard_from_env(None, None) == (1, 0)
    assert shard_from_env(8, 3) == (8, 3)


def test_shard_from_env_array(clean_env):
    clean_env.setenv("SLURM_ARRAY_TASK_COUNT", "16")
    clean_env.setenv("SLURM_ARRAY_TASK_ID", "5")
    assert shard_from_env(None, None) == (16, 5)
    # explicit flags win over the environment; a task id beyond them says what to submit
    with pytest.raises(ConfigError, match=r"^Slurm array task 5 is shard 5, outside 0\.\.3 "
                                          r"\(--num-shards 4\): submit a 0-based array "
                                          r"\(--array=0-3\)"):
        shard_from_env(4, None)
    assert shard_from_env(8, None) == (8, 5)
    assert shard_from_env(None, 2) == (16, 2)
    assert shard_from_env(32, 31) == (32, 31)
    # SLURM_NTASKS alone changes nothing: several tasks are one shard unless asked
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_PROCID", "3")
    assert shard_from_env(None, None) == (16, 5)


def test_shard_from_env_one_line_for_what_slurm_did_not_set(clean_env):
    """SLURM_ARRAY_TASK_COUNT=abc was a ValueError traceback; a 1-based
    array's last task said only '--shard-index 3 is outside 0..2'."""
    clean_env.setenv("SLURM_ARRAY_TASK_COUNT", "abc")
    with pytest.raises(ConfigError, match=r"^SLURM_ARRAY_TASK_COUNT='abc' is not a whole number"):
        shard_from_env(None, None)
    clean_env.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    clean_env.setenv("SLURM_ARRAY_TASK_ID", "3")  # --array=1-3
    with pytest.raises(ConfigError, match=r"--array=0-2"):
        shard_from_env(None, None)
    assert shard_from_env(None, 1) == (3, 1)  # an explicit index wins


def test_shard_from_env_tasks_are_shards(clean_env):
    clean_env.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    clean_env.setenv("SLURM_ARRAY_TASK_ID", "5")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("IVB_TASKS_ARE_SHARDS", "1")
    assert shard_from_env(None, None) == (32, 5 * 4 + 3)
    assert shard_from_env(10, 7) == (10, 7)
    clean_env.setenv("IVB_TASKS_ARE_SHARDS", "0")
    assert shard_from_env(None, None) == (8, 5)


def test_shard_from_env_tasks_are_shards_first_and_last(clean_env):
    clean_env.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    clean_env.setenv("SLURM_NTASKS", "2")
    clean_env.setenv("IVB_TASKS_ARE_SHARDS", "1")
    seen = []
    for array_id in range(2):
        for procid in range(2):
            clean_env.setenv("SLURM_ARRAY_TASK_ID", str(array_id))
            clean_env.setenv("SLURM_PROCID", str(procid))
            seen.append(shard_from_env(None, None))
    assert seen == [(4, 0), (4, 1), (4, 2), (4, 3)]


def test_shard_from_env_tasks_are_shards_without_array(clean_env):
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("IVB_TASKS_ARE_SHARDS", "1")
    n, i = shard_from_env(None, None)
    assert 0 <= i < n
    assert (n, i) == (4, 3)
    seen = []
    for procid in range(4):
        clean_env.setenv("SLURM_PROCID", str(procid))
        seen.append(shard_from_env(None, None))
    assert seen == [(4, 0), (4, 1), (4, 2), (4, 3)]
    # without the opt-in, the tasks of a non-array job are one shard
    clean_env.delenv("IVB_TASKS_ARE_SHARDS")
    assert shard_from_env(None, None) == (1, 0)
    # opted in, but no SLURM_NTASKS: one task, one shard
    clean_env.setenv("IVB_TASKS_ARE_SHARDS", "1")
    clean_env.delenv("SLURM_NTASKS")
    clean_env.delenv("SLURM_PROCID")
    assert shard_from_env(None, None) == (1, 0)


# -- engine.llm_kwargs -----------------------------------------------------------------------------

def test_engine_module_imports_nothing_heavy():
    code = ("import sys, internvl_batch.engine, internvl_batch.prompts, internvl_batch.cache; "
            "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from internvl_batch.checkpoint import ensure

    return ensure("tiny", tmp_path_factory.mktemp("models"), weights=False)


def test_llm_kwargs_cpu_synth(synth_dir):
    from internvl_batch import engine

    kw = engine.llm_kwargs(EngineSpec(model=str(synth_dir)), cuda=False)
    assert kw == {
        "model": os.path.realpath(synth_dir), "trust_remote_code": True, "seed": 0,
        "dtype": "auto", "max_model_len": 8192, "limit_mm_per_prompt": {"image": 1},
        "load_format": "dummy", "gpu_memory_utilization": 0.2, "enforce_eager": False,
        "worker_extension_cls": "internvl_batch.hooks.EncoderControl",
        "mm_processor_cache_gb": 0.0,  # off: a dataset's images never repeat
    }
    assert "compilation_config" not in kw  # CPU: vLLM's own defaults, capture sizes too
    kw = engine.llm_kwargs(EngineSpec(model=str(synth_dir), mm_cache_gb=None), cuda=False)
    assert "mm_processor_cache_gb" not in kw  # None: vLLM's default
    kw = engine.llm_kwargs(EngineSpec(model=str(synth_dir), max_num_seqs=8), cuda=False)
    assert "compilation_config" not in kw


def test_llm_kwargs_encoder_cudagraphs(synth_dir):
    """--encoder-cudagraphs asks vLLM for encoder CUDA graphs on GPU; off, the cache key's
    engine fields are what they were before the option existed."""
    from internvl_batch import engine

    spec = EngineSpec(model=str(synth_dir), compile=True, encoder_cudagraphs=True)
    kw = engine.llm_kwargs(spec, cuda=True)
    cc = kw["compilation_config"]
    assert cc["compile_mm_encoder"] is True and cc["cudagraph_mm_encoder"] is True
    assert "encoder_cudagraphs" not in EngineSpec(model="m").to_dict()
    assert spec.to_dict()["encoder_cudagraphs"] is True


def test_llm_kwargs_quantization(synth_dir):
    """--quantization fp8 is vLLM's `quantization`, on a GPU only; unset, the cache key's
    engine fields are what they were before the option existed."""
    from internvl_batch import engine

    spec = EngineSpec(model=str(synth_dir), compile=True, quantization="fp8")
    assert engine.llm_kwargs(spec, cuda=True)["quantization"] == "fp8"
    assert "quantization" not in engine.llm_kwargs(EngineSpec(model=str(synth_dir)), cuda=True)
    assert "quantization" not in EngineSpec(model="m").to_dict()
    assert spec.to_dict()["quantization"] == "fp8"
    with pytest.raises(ConfigError, match=r"^--quantization fp8 needs a CUDA GPU: .*; drop "
                                          r"--quantization$"):
        engine.llm_kwargs(EngineSpec(model=str(synth_dir), quantization="fp8"), cuda=False)
    with pytest.raises(ConfigError, match="--quantization int4: choose from fp8"):
        EngineSpec(model="m", quantization="int4")


def test_check_device_asks_for_a_gpu_only_when_a_setting_needs_one(monkeypatch):
    from internvl_batch import engine

    asked = []
    monkeypatch.setattr(engine, "has_cuda", lambda: asked.append(1) or False)
    engine.check_device(EngineSpec(model="m"))  # nothing GPU-only: torch is not imported
    assert asked == []
    with pytest.raises(ConfigError, match="^--quantization fp8 needs a CUDA GPU"):
        engine.check_device(EngineSpec(model="m", quantization="fp8"))
    assert asked == [1]


def test_llm_kwargs_synth_with_weights(tmp_path):
    """A synthesized checkpoint with safetensors loads them; one without gets dummy."""
    from internvl_batch import engine
    from internvl_batch.checkpoint import ensure

    with_weights = ensure("tiny", tmp_path)  # tiny's default
    assert engine.llm_kwargs(EngineSpec(model=str(with_weights)), cuda=False)["load_format"] \
        == "auto"
    assert engine.llm_kwargs(EngineSpec(model=str(with_weights), load_format="dummy"),
                             cuda=False)["load_format"] == "dummy"  # asked for: obeyed


def test_llm_kwargs_optional_fields(synth_dir):
    from internvl_batch import engine

    kw = engine.llm_kwargs(EngineSpec(
        model=str(synth_dir), max_dynamic_patch=6, max_num_seqs=32, max_num_batched_tokens=4096,
        mm_cache_gb=0, load_format="auto", gpu_memory_utilization=0.5, enforce_eager=True,
        dtype="bfloat16", seed=7), cuda=False)
    assert kw["mm_processor_kwargs"] == {"max_dynamic_patch": 6}
    assert (kw["max_num_seqs"], kw["max_num_batched_tokens"], kw["mm_processor_cache_gb"]) == \
        (32, 4096, 0)
    assert (kw["load_format"], kw["gpu_memory_utilization"], kw["enforce_eager"]) == \
        ("auto", 0.5, True)
    assert (kw["dtype"], kw["seed"]) == ("bfloat16", 7)


def test_llm_kwargs_cuda(synth_dir):
    """On CUDA: the encoder compile switch, vLLM's own CUDA-graph sizes (a shorter list
    measured slower, see engine.py)."""
    from internvl_batch import engine

    kw = engine.llm_kwargs(EngineSpec(model=str(synth_dir), compile=True), cuda=True)
    assert kw["compilation_config"] == {"compile_mm_encoder": True}
    assert kw["gpu_memory_utilization"] == 0.9 and kw["load_format"] == "dummy"
    kw = engine.llm_kwargs(EngineSpec(model=str(synth_dir)), cuda=True)
    assert kw["compilation_config"] == {"compile_mm_encoder": False}


def test_llm_kwargs_compile_on_cpu(synth_dir):
    from internvl_batch import engine

    with pytest.raises(ConfigError) as e:
        engine.llm_kwargs(EngineSpec(model=str(synth_dir), compile=True), cuda=False)
    assert str(e.value).startswith("--compile needs a CUDA GPU")
    assert "drop --compile" in str(e.value)


def test_llm_kwargs_hub_id_and_real_dir(tmp_path):
    from internvl_batch import engine

    kw = engine.llm_kwargs(EngineSpec(model="OpenGVLab/InternVL3-1B"), cuda=False)
    assert kw["model"] == "OpenGVLab/InternVL3-1B" and kw["load_format"] == "auto"
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "config.json").write_text('{"model_type": "internvl_chat"}')
    kw = engine.llm_kwargs(EngineSpec(model=str(tmp_path / "real")), cuda=False)
    assert kw["model"] == os.path.realpath(tmp_path / "real") and kw["load_format"] == "auto"


def test_resolve_model_errors(tmp_path):
    from internvl_batch import engine

    with pytest.raises(ConfigError, match=r"^--model internvl3-1b is a preset name: run "):
        engine.resolve_model("internvl3-1b")
    with pytest.raises(ConfigError, match=r"^--model .*/a/b: no such directory$"):
        engine.resolve_model(str(tmp_path / "a" / "b"))


def test_resolve_model_missing_absolute_one_slash():
    from internvl_batch import engine

    with pytest.raises(ConfigError, match="no such directory"):
        engine.resolve_model("/nonexistent-model-dir")


@pytest.mark.parametrize("model", [
    "/nonexistent-model-dir", "/no/such/dir", "./models", "./org/name", "../models",
    "~/models", "~", "models/org/name", "a/b/c/d",
])
def test_resolve_model_missing_paths(tmp_path, monkeypatch, model):
    from internvl_batch import engine

    monkeypatch.chdir(tmp_path)  # relative paths resolve against an empty directory
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError) as e:
        engine.resolve_model(model)
    assert str(e.value) == f"--model {model}: no such directory"


@pytest.mark.parametrize("model", ["OpenGVLab/InternVL3-1B", "org/name", "InternVL3-1B"])
def test_resolve_model_hub_ids(tmp_path, monkeypatch, model):
    from internvl_batch import engine

    monkeypatch.chdir(tmp_path)
    assert engine.resolve_model(model) == (model, False)


def test_resolve_model_existing_relative_dir(tmp_path, monkeypatch, synth_dir):
    from internvl_batch import engine

    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # an existing directory wins over the hub-id reading, and is made absolute
    assert engine.resolve_model("org/name") == (os.path.realpath(tmp_path / "org" / "name"),
                                                False)
    assert engine.resolve_model("./org/name") == (os.path.realpath(tmp_path / "org" / "name"),
                                                  False)
    assert engine.resolve_model(str(synth_dir)) == (os.path.realpath(synth_dir), True)
