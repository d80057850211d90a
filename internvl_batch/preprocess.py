"""vLLM's own input processing, run in the decode workers instead of the engine's process.

`LLM.generate` renders each prompt (tokenise, InternVL's dynamic tiling, resize and
normalise of every 448 px tile, hashing) serially in the process that calls it, before the
engine sees it. At one tile that is ~10 ms per image; at COCO sizes (7-13 tiles) ~100 ms or
more, so each engine's front process, not the GPU, becomes the bound (docs/performance.md).
Here the same vLLM code runs in the decode workers, which already run ahead of the engines
on every core: a worker builds the engine's `VllmConfig` from the same `LLM` keyword
arguments, renders each decoded image with vLLM's renderer (`LLM._preprocess_cmpl_one`, the
step `LLM.generate` itself takes), and hands the engine an `EngineInput` that
`LLMEngine.add_request` accepts as it is. vLLM's processor stays the single source of truth:
nothing here tiles or normalises by itself.

The rendered input travels as one pickle (`Processed`): the main process forwards the bytes
to a replica without unpickling them, and only the engine's process rebuilds the tensors.

Not with vLLM's multimodal processor cache (`--mm-cache-gb`): its sender side would live in
each worker while its receiver side lives in each engine core, and an item one worker had
cached would reach an engine that never saw it.
"""
from __future__ import annotations

import os
import pickle
import time

from .config import ConfigError, EngineSpec
from .prompts import Processed

MODES = ("auto", "workers", "engine")


def choose(mode: str, spec: EngineSpec, cuda: bool) -> str:
    """Where prompts are rendered: "workers" or "engine". `auto` renders in the workers on a
    GPU, where the engines wait for their front processes, and in the engine on CPU, where
    the engine itself is the bound and a vLLM import in every worker only costs start-up."""
    if mode not in MODES:
        raise ConfigError(f"--preprocess {mode}: choose from {', '.join(MODES)}")
    if mode == "workers" and spec.mm_cache_gb:
        raise ConfigError("--preprocess workers cannot be combined with --mm-cache-gb (vLLM's "
                          "processor cache must live in the process that renders): drop one")
    if mode == "auto":
        return "workers" if cuda and not spec.mm_cache_gb else "engine"
    return mode


def renderer_kwargs(spec: EngineSpec, cuda: bool) -> dict:
    """The `LLM` keyword arguments the engine is built with, as far as they shape rendering:
    the same model, max_model_len, mm_processor_kwargs, dtype; no processor cache."""
    from .engine import llm_kwargs

    kw = llm_kwargs(spec, cuda=cuda)
    kw.pop("worker_extension_cls", None)
    kw["mm_processor_cache_gb"] = 0
    return kw


class Renderer:
    """vLLM's prompt renderer outside an engine: `render(prompt)` returns what
    `LLM._preprocess_cmpl_one(prompt)` returns inside one (same config, same code)."""

    def __init__(self, llm_kwargs: dict, env: dict[str, str] | None = None):
        os.environ.update(env or {})
        t0 = time.perf_counter()
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs
        from vllm.renderers.registry import renderer_from_config

        from .engine import InitTimings, _inspect_here

        # the model-class inspection here, not in a fresh Python (engine._inspect_here)
        with _inspect_here(InitTimings()):
            config = EngineArgs(**llm_kwargs).create_engine_config()

        class _Front:  # what LLM's rendering methods read from `self`
            _preprocess_cmpl = LLM._preprocess_cmpl
            _preprocess_cmpl_one = LLM._preprocess_cmpl_one

        self._front = _Front()
        self._front.model_config = config.model_config
        self._front.renderer = renderer_from_config(config)
        self.start_s = time.perf_counter() - t0

    def render(self, prompt: dict) -> dict:
        return self._front._preprocess_cmpl_one(prompt)

    def process(self, prompt: dict) -> Processed:
        return Processed(pickle.dumps(self.render(prompt), protocol=5))


# -- in a decode worker -----------------------------------------------------------------------

_worker_renderer: Renderer | None = None
_worker_args: tuple[dict, dict] | None = None


def init_worker(llm_kwargs: dict, env: dict[str, str]) -> None:
    """Pool initializer: remember what to build; the renderer is built at the first task
    (`start_workers` sends each worker an empty one while the engines start, so the vLLM
    import and config overlap the engines' start instead of delaying the first batch)."""
    global _worker_args
    _worker_args = (llm_kwargs, env)
    # one thread per worker: the workers are as many as the cores they were given, and
    # torch's intra-op pool per worker would oversubscribe them
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def worker_renderer() -> Renderer:
    global _worker_renderer
    if _worker_renderer is None:
        if _worker_args is None:
            raise RuntimeError("this decode worker was not started to render prompts")
        _worker_renderer = Renderer(*_worker_args)
    return _worker_renderer


def engine_input_equal(a: dict, b: dict) -> list[str]:
    """The fields in which two rendered inputs differ (token ids, placeholders, hashes,
    every tensor of the multimodal items): [] when they are the same."""
    import torch

    diffs = []
    for k in ("type", "prompt_token_ids", "mm_placeholders", "mm_hashes"):
        if str(a.get(k)) != str(b.get(k)):
            diffs.append(k)
    items_a, items_b = a.get("mm_kwargs", {}), b.get("mm_kwargs", {})
    if set(items_a) != set(items_b):
        return diffs + ["mm_kwargs modalities"]
    for modality in items_a:
        for i, (x, y) in enumerate(zip(items_a[modality], items_b[modality])):
            dx, dy = x.get_data(), y.get_data()
            if set(dx) != set(dy):
                diffs.append(f"mm_kwargs[{modality}][{i}] keys")
                continue
            for name in dx:
                tx, ty = dx[name], dy[name]
                same = torch.equal(tx, ty) if isinstance(tx, torch.Tensor) else tx == ty
                if not same:
                    diffs.append(f"mm_kwargs[{modality}][{i}].{name}")
    return diffs
