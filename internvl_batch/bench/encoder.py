"""Encoder micro-benchmark: the InternViT forward that vLLM runs,
eager vs compiled vs compiled + encoder CUDA graphs, timed per tile batch, checked for
numerical agreement, with the evidence of which path actually ran.

What is timed is what vLLM's model runner calls for one encoder batch
(`GPUModelRunner._execute_mm_encoder`, vLLM 0.26): `model.embed_multimodal(**mm_kwargs)`
(InternViT, pixel shuffle, `mlp1` projector), or `encoder_cudagraph_manager.execute(mm_kwargs)`
when `compilation_config.cudagraph_mm_encoder` is on. `mm_kwargs` has the shape vLLM's batching
gives it: `pixel_values_flat` [tiles, 3, 448, 448] on the GPU, `image_num_patches` and
`image_token_id` on the CPU, the tiles grouped into images of at most 13 (InternVL3's default
12 tiles + thumbnail).

Design choices (why):

* **One engine, started in this process** (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), with
  `compile_mm_encoder=True` and, for the `cudagraph` mode, `cudagraph_mm_encoder=True`. The
  model is reached through `llm.llm_engine.model_executor.driver_worker.model_runner` (the
  same path in vLLM 0.26 and 0.32). All modes therefore share one set of weights and one
  engine start, and dynamo's counters are this process's.
* **The V1 model runner for CUDA graphs.** vLLM 0.26 builds InternVL on its V2 model runner
  (`vllm/v1/worker/gpu/model_runner.py`) unless VLLM_USE_V2_MODEL_RUNNER=0; that runner has
  no encoder CUDA graph manager and ignores `cudagraph_mm_encoder`, so the `cudagraph` mode
  needs the V1 runner (`vllm/v1/worker/gpu_model_runner.py`). The result records which
  runner ran (`engine.model_runner`) and, without a manager, says why the mode is missing.
* **Eager from the same engine.** vLLM's `@support_torch_compile` wrapper calls the plain
  `forward` when a layer's `do_not_compile` is set (vLLM 0.26 `compilation/decorators.py`
  `__call__`); we set it on the 24/45 encoder layers for the eager mode and restore it after.
  That is exactly what an engine with `compile_mm_encoder=False` runs: the flag only decides
  whether the layer goes through the compiled callable; custom-op dispatch (vision attention,
  norms) is fixed at model init by the same compilation config in both cases.
* **Weights that behave like a model's.** `load_format="dummy"` draws every weight from
  U(±0.001), so the encoder output is nearly constant. Before measuring, the vision tower and
  projector are re-initialised in place (same storage, so captured CUDA graphs see the new
  values): matrices N(0, 0.02), norm weights 1, biases 0, layer scale `ls1/ls2` = 0.1, fixed
  seed. The report records the mean cosine between the tokens of one tile before and after
  (a degenerate encoder gives ~1).
* **The first compiled call holds 13 tiles.** A one-tile first call specialises the batch
  dimension to 1 (see `engine.py`). vLLM's own profile run already calls the encoder with its
  largest dummy image (13 tiles with the checkpoint's max_dynamic_patch); we add a 13-tile
  compiled call before anything else anyway, and record whether it compiled anything.
* **Interleaved repeats.** For each tile batch, every mode is warmed up, then timed `repeats`
  rounds, the order of the modes rotating every round, each call between two CUDA events
  after a device synchronize. Speed-up is the median of the per-round ratios eager / mode,
  with an order-statistics 95 % interval (no distribution assumed).
* **Fresh compile caches** (`VLLM_CACHE_ROOT`, Inductor, Triton in a temporary directory):
  nothing is loaded from, or written into, the project's compile cache.
* **Defensive.** Every (mode, batch) is measured in its own try/except; errors are recorded in
  the JSON, which is rewritten after every batch, so a crash keeps what was measured.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..config import ConfigError, EngineSpec
from ..hooks import TILES_PER_IMAGE, agreement, item_layout, tolerance
from .common import (CONFIDENCE, Recorder, error_line, footer_markdown, git_sha, median_ci,
                     paired_speedup)

MODES = ("eager", "compiled", "cudagraph")
DEFAULT_BATCHES = (1, 2, 4, 8, 13, 32, 64, 128)
LABELS = {
    "eager": "eager (vLLM's InternViT forward, compiled wrapper bypassed)",
    "compiled": "compiled (`compile_mm_encoder`: torch.compile'd InternVisionEncoderLayer)",
    "cudagraph": "compiled + encoder CUDA graphs (`cudagraph_mm_encoder`, "
                 "EncoderCudaGraphManager.execute)",
}


# -- options --------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderBenchOptions:
    model: str = "preset:internvl3-1b"
    batches: tuple[int, ...] = DEFAULT_BATCHES
    repeats: int = 30
    warmup: int = 5
    modes: tuple[str, ...] | None = None  # None: all three on CUDA, eager on CPU
    cudagraph_budgets: str = "exact"  # exact: one graph per measured batch; auto: vLLM's
    evidence_batches: tuple[int, ...] = (1, 13)
    profile_batches: tuple[int, ...] = (1, 13)
    seed: int = 0
    init_std: float = 0.02
    layer_scale: float = 0.1
    kv_cache_gb: float = 1.0  # GPU: a small fixed KV cache leaves memory for 128-tile batches
    max_num_seqs: int = 16  # fewer decoder CUDA graphs to capture: a faster engine start
    cache_dir: str = ""
    results_dir: str = "results"
    name: str = ""
    command: str = ""

    def __post_init__(self):
        if not self.batches:
            raise ConfigError("--batches is empty")
        if any(not 1 <= b <= 512 for b in self.batches):
            raise ConfigError("--batches: every tile batch must be between 1 and 512")
        if self.repeats < 1:
            raise ConfigError("--repeats must be >= 1")
        if self.warmup < 0:
            raise ConfigError("--warmup must be >= 0")
        if self.cudagraph_budgets not in ("exact", "auto"):
            raise ConfigError("--cudagraph-budgets must be exact or auto")
        if self.modes is not None:
            bad = [m for m in self.modes if m not in MODES]
            if bad or not self.modes:
                raise ConfigError(f"--modes {','.join(bad) or '(empty)'}: choose from "
                                  f"{','.join(MODES)}")
        if not self.init_std > 0 or not self.layer_scale > 0:
            raise ConfigError("--init-std and --layer-scale must be > 0")


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    """'1,2, 4' -> (1, 2, 4) in the given order, duplicates dropped; '' -> ()."""
    out: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            v = int(part)
        except ValueError:
            raise ConfigError(f"{flag}: {part!r} is not an integer") from None
        if v < 1:
            raise ConfigError(f"{flag}: {v} must be >= 1")
        if v not in out:
            out.append(v)
    return tuple(out)


def parse_modes(text: str) -> tuple[str, ...] | None:
    """'auto' -> None (all on CUDA, eager on CPU); else a validated tuple."""
    items = [m.strip() for m in str(text).split(",") if m.strip()]
    if items == ["auto"]:
        return None
    bad = [m for m in items if m not in MODES]
    if bad or not items:
        raise ConfigError(f"--modes {','.join(bad) or '(empty)'}: choose from auto or a comma "
                          f"list of {','.join(MODES)}")
    return tuple(dict.fromkeys(items))


def resolve_modes(modes: tuple[str, ...] | None, cuda: bool) -> tuple[str, ...]:
    """Eager first (the baseline every ratio and comparison is against), then the others."""
    if modes is None:
        return MODES if cuda else ("eager",)
    wanted = [m for m in MODES if m in modes]
    if not cuda and any(m != "eager" for m in wanted):
        raise ConfigError(
            f"--modes {','.join(m for m in wanted if m != 'eager')} needs a CUDA GPU: on CPU "
            "vLLM's compiled InternVL encoder fails ('Inference tensors cannot be saved for "
            "backward') and encoder CUDA graphs do not exist; use --modes eager")
    return tuple(["eager"] + [m for m in wanted if m != "eager"])


def cudagraph_settings(batches, tokens_per_tile: int, how: str) -> dict:
    """compilation_config keys for the encoder CUDA graphs.

    exact: one budget per measured batch (tiles x tokens per tile), so every batch replays a
    graph of exactly its size; vLLM's default (auto) would pad a batch to the next power of
    two (13 tiles run as 16) and split anything above max_num_batched_tokens. The item limit
    is the largest batch (every tile could be its own image); vLLM requires it to be <= the
    smallest budget, which holds as long as tokens_per_tile >= 1."""
    if how == "auto":
        return {"cudagraph_mm_encoder": True}
    budgets = sorted({b * tokens_per_tile for b in batches})
    return {"cudagraph_mm_encoder": True, "encoder_cudagraph_token_budgets": budgets,
            "encoder_cudagraph_max_vision_items_per_batch": min(max(batches), budgets[0])}


def token_spread(emb, tokens_per_tile: int) -> dict:
    """How different the tokens of the first tile are: mean pairwise cosine (a degenerate
    encoder, e.g. dummy U(+-0.001) weights, gives ~1) and the embedding's std."""
    import torch

    x = emb.detach().float().reshape(-1, emb.shape[-1])[:tokens_per_tile]
    n = torch.nn.functional.normalize(x, dim=-1)
    sim = n @ n.T
    k = sim.shape[0]
    mean_off = (sim.sum() - sim.diagonal().sum()) / max(k * (k - 1), 1)
    return {"mean_token_cos": float(mean_off.item()), "std": float(x.std().item()),
            "mean_abs": float(x.abs().mean().item())}


# -- weights --------------------------------------------------------------------------------

def reinit_vision_(model, seed: int = 0, std: float = 0.02, layer_scale: float = 0.1) -> dict:
    """Re-initialise the vision tower and projector in place with trained-like scales.

    In place (`copy_`/`fill_` on the existing storage): compiled graphs take the weights as
    inputs and captured CUDA graphs hold their addresses, so both see the new values. (On CPU
    vLLM may pre-pack a linear layer's weight for oneDNN, which this does not reach; on CUDA
    vLLM 0.26's unquantized linear layers use `layer.weight` as it is.)
    Matrices (and the class / position embeddings) N(0, std); norm weights 1 and biases 0;
    layer scale ls1/ls2 = layer_scale; every other bias 0. Fixed seed, same order every run."""
    import torch

    counts: Counter = Counter()
    roots = [("vision_model", model.vision_model)]
    if hasattr(model, "mlp1"):
        roots.append(("mlp1", model.mlp1))
    first = next(model.vision_model.parameters())
    gen = torch.Generator(device=first.device).manual_seed(seed)
    with torch.no_grad():
        for _, root in roots:
            for _, mod in root.named_modules():
                is_norm = "norm" in type(mod).__name__.lower()
                for pname, p in mod.named_parameters(recurse=False):
                    if pname in ("ls1", "ls2"):
                        p.fill_(layer_scale)
                        counts["layer_scale"] += p.numel()
                    elif is_norm:
                        p.fill_(1.0 if pname == "weight" else 0.0)
                        counts["norm"] += p.numel()
                    elif p.ndim >= 2:
                        p.copy_(torch.randn(p.shape, generator=gen, device=p.device,
                                            dtype=torch.float32).mul_(std))
                        counts["normal"] += p.numel()
                    else:
                        p.zero_()
                        counts["zero"] += p.numel()
    return {"seed": seed, "std": std, "layer_scale": layer_scale,
            "params": dict(counts), "total": sum(counts.values())}


# -- evidence helpers -----------------------------------------------------------------------

def dynamo_counters() -> dict:
    """A copy of torch._dynamo.utils.counters ({category: {key: count}})."""
    try:
        from torch._dynamo.utils import counters

        return {k: {str(kk): vv for kk, vv in v.items()} for k, v in counters.items()}
    except Exception as e:  # evidence is optional; never fail the benchmark on it
        return {"error": repr(e)}


def vllm_compilation_counter() -> dict:
    try:
        import dataclasses

        from vllm.compilation.counter import compilation_counter

        return dataclasses.asdict(compilation_counter)
    except Exception as e:
        return {"error": repr(e)}


def counter_delta(before: dict, after: dict) -> dict:
    """Non-zero differences of two (nested) counter snapshots."""
    out: dict = {}
    for k in set(before) | set(after):
        a, b = before.get(k, 0), after.get(k, 0)
        if isinstance(a, dict) or isinstance(b, dict):
            sub = counter_delta(a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {})
            if sub:
                out[k] = sub
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and b != a:
            out[k] = b - a
    return out


def kernel_category(name: str) -> str:
    n = name.lower()
    if n.startswith("triton_"):
        return "inductor"  # Inductor-generated fused kernels: triton_poi_/triton_red_/triton_per_
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "wgmma",
                            "s16816", "sm90_")):
        return "gemm"
    if "memcpy" in n or "memset" in n:
        return "memcpy"
    return "other"


def kernel_breakdown(events) -> dict:
    """{category: {kernels, ms}} from (name, count, device_us) rows, plus the top 8 kernels."""
    cats: dict[str, dict] = {}
    rows = []
    for name, count, us in events:
        c = cats.setdefault(kernel_category(name), {"kernels": 0, "ms": 0.0})
        c["kernels"] += int(count)
        c["ms"] += us / 1000.0
        rows.append((us, name, count))
    total_ms = sum(c["ms"] for c in cats.values())
    for c in cats.values():
        c["ms"] = round(c["ms"], 4)
        c["share"] = round(c["ms"] / total_ms, 4) if total_ms else None
    rows.sort(reverse=True)
    return {"categories": cats, "kernels": sum(c["kernels"] for c in cats.values()),
            "device_ms": round(total_ms, 4),
            "top": [{"name": n[:120], "count": int(k), "ms": round(u / 1000, 4)}
                    for u, n, k in rows[:8]]}


# -- which model runner ran -------------------------------------------------------------------

V2_RUNNER_MODULE = "vllm.v1.worker.gpu."  # vLLM 0.26: vllm/v1/worker/gpu/model_runner.py
V1_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"


def model_runner_info(runner, has_manager: bool, env=None) -> dict:
    """Which of vLLM's model runners the engine built, and whether it has an encoder CUDA
    graph manager. vLLM 0.26 has two GPU runners, both named GPUModelRunner: the V2 runner
    (`vllm/v1/worker/gpu/model_runner.py`), the default for InternVL, and the V1 runner
    (`vllm/v1/worker/gpu_model_runner.py`), chosen with VLLM_USE_V2_MODEL_RUNNER=0
    (`VllmConfig.use_v2_model_runner`). Only the V1 runner builds an encoder CUDA graph
    manager (`_create_encoder_cudagraph_manager`, from `capture_model`); the V2 runner accepts
    `cudagraph_mm_encoder` and ignores it."""
    env = os.environ if env is None else env
    cls = type(runner)
    module = getattr(cls, "__module__", "") or ""
    if module.startswith(V2_RUNNER_MODULE):
        kind = "V2"
    elif module == V1_RUNNER_MODULE:
        kind = "V1"
    else:
        kind = f"other ({module})"
    cfg = getattr(runner, "vllm_config", None)
    try:
        use_v2 = getattr(cfg, "use_v2_model_runner", None)
        use_v2 = bool(use_v2) if use_v2 is not None else None
    except Exception:  # a property that needs a fully built config
        use_v2 = None
    return {"runner": kind, "class": f"{module}.{cls.__qualname__}",
            "VLLM_USE_V2_MODEL_RUNNER": env.get("VLLM_USE_V2_MODEL_RUNNER"),
            "use_v2_model_runner": use_v2, "encoder_cudagraph_manager": bool(has_manager),
            "source": "recorded by bench-encoder at run time"}


def cudagraph_unavailable_reason(info: dict) -> str:
    """Why the `cudagraph` mode cannot run when the runner has no encoder CUDA graph manager."""
    base = "no encoder CUDA graph manager in the model runner"
    if info.get("runner") == "V2":
        return (f"{base}: this is vLLM's V2 model runner (vllm/v1/worker/gpu/model_runner.py, "
                "the default for InternVL in vLLM 0.26), which ignores cudagraph_mm_encoder; "
                "only the V1 runner captures encoder CUDA graphs: set "
                "VLLM_USE_V2_MODEL_RUNNER=0")
    return (f"{base} ({info.get('class')}; cudagraph_mm_encoder off or unsupported; with "
            "vLLM 0.26 on a GPU set VLLM_USE_V2_MODEL_RUNNER=0)")


def model_runner_of(doc: dict) -> dict | None:
    """The runner a result file says ran. Files written before bench-encoder recorded it
    (the first H100 runs) are classified from what they do hold: the error
    'no encoder CUDA graph manager' (what the V2 runner gives; its log says 'Using V2 Model
    Runner'), or encoder CUDA graph replays / a '-v1runner' name (the V1 runner)."""
    eng = doc.get("engine") or {}
    if eng.get("model_runner"):
        return eng["model_runner"]
    if not (doc.get("device") or {}).get("cuda"):
        return None
    errs = " ".join(str(e.get("error", "")) for e in doc.get("errors") or [])
    hits = ((doc.get("evidence") or {}).get("during_timing") or {}).get("graph_hits")
    if "no encoder CUDA graph manager" in errs:
        return {"runner": "V2", "encoder_cudagraph_manager": False,
                "source": "derived after the run: the run reported 'no encoder CUDA graph "
                          "manager' (the V2 runner's behaviour)"}
    if hits or str(doc.get("name", "")).endswith("-v1runner"):
        return {"runner": "V1", "encoder_cudagraph_manager": bool(eng.get("cudagraph_manager")),
                "source": "derived after the run: encoder CUDA graph replays / the run's name"}
    return None


def runner_label(info: dict | None) -> str:
    if not info:
        return ""
    r = info.get("runner", "?")
    return f"{r} runner" if r in ("V1", "V2") else r


# -- the engine-side harness ----------------------------------------------------------------

class EncoderHarness:
    """The encoder of a running in-process vLLM engine, callable in each mode."""

    def __init__(self, llm, cuda: bool):
        import torch

        executor = getattr(llm.llm_engine, "model_executor", None)
        if executor is None:
            raise RuntimeError("the engine core is not in this process: set "
                               "VLLM_ENABLE_V1_MULTIPROCESSING=0 before starting vLLM")
        worker = executor.driver_worker
        runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
        self.runner = runner
        self.model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        self.manager = getattr(runner, "encoder_cudagraph_manager", None)
        self.cuda = cuda
        self.layers = list(self.model.vision_model.encoder.layers)
        self.layer_cls = type(self.layers[0])
        self._compiled_flags = [getattr(layer, "do_not_compile", True) for layer in self.layers]
        self.compilable = not all(self._compiled_flags)
        p = next(self.model.vision_model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cfg = self.model.config
        self.image_size = cfg.force_image_size or cfg.vision_config.image_size
        self.tokens_per_tile = int(getattr(self.model, "num_image_token", 0) or
                                   (self.image_size // cfg.vision_config.patch_size) ** 2 *
                                   cfg.downsample_ratio ** 2)
        tok = llm.get_tokenizer()
        self.image_token_id = int(tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
        self._torch = torch

    def runner_info(self) -> dict:
        return model_runner_info(self.runner, self.manager is not None)

    def modes_available(self) -> dict[str, str | None]:
        """mode -> None if it can run, else why not."""
        cg = None
        if self.manager is None:
            cg = cudagraph_unavailable_reason(self.runner_info())
        elif not self.compilable:
            cg = "the engine did not compile the encoder layers (compile_mm_encoder off)"
        return {"eager": None,
                "compiled": None if self.compilable else
                "the engine did not compile the encoder layers (compile_mm_encoder off)",
                "cudagraph": cg}

    def layer_state(self) -> dict:
        c: Counter = Counter()
        for layer in self.layers:
            c["layers"] += 1
            c["do_not_compile"] += bool(getattr(layer, "do_not_compile", True))
            c["compiled_flag"] += bool(getattr(layer, "compiled", False))
            c["aot_compiled_fn"] += getattr(layer, "aot_compiled_fn", None) is not None
            c["aot_loaded_from_disk"] += bool(getattr(layer, "was_aot_compile_fn_loaded_from_disk",
                                                      False))
            c["compiled_bytecode"] += getattr(layer, "_compiled_bytecode", None) is not None
        return dict(c)

    def inputs(self, tiles: int, seed: int) -> dict:
        """mm_kwargs as vLLM's batching builds them (pixels on the device, counts on the CPU).
        Pixel values ~ N(0, 1): the range of normalised image pixels."""
        torch = self._torch
        gen = torch.Generator(device=self.device).manual_seed(seed)
        pv = torch.randn((tiles, 3, self.image_size, self.image_size), generator=gen,
                         device=self.device, dtype=torch.float32).to(self.dtype)
        items = item_layout(tiles)
        return {"pixel_values_flat": pv,
                "image_num_patches": torch.tensor(items, dtype=torch.int64),
                "image_token_id": torch.tensor(self.image_token_id)}

    @contextmanager
    def mode(self, mode: str):
        """eager: every encoder layer's compiled wrapper is bypassed (do_not_compile)."""
        try:
            for layer, orig in zip(self.layers, self._compiled_flags):
                layer.do_not_compile = True if mode == "eager" else orig
            yield
        finally:
            for layer, orig in zip(self.layers, self._compiled_flags):
                layer.do_not_compile = orig

    def _raw(self, mode: str, mm_kwargs: dict):
        if mode == "cudagraph":
            return self.manager.execute(mm_kwargs)
        return self.model.embed_multimodal(**mm_kwargs)

    def call(self, mode: str, mm_kwargs: dict):
        with self._torch.inference_mode(), self.mode(mode):
            return self._raw(mode, mm_kwargs)

    @staticmethod
    def cat(outputs):
        import torch

        return torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs], dim=0)

    def sync(self):
        if self.cuda:
            self._torch.cuda.synchronize()

    def timed_ms(self, mode: str, mm_kwargs: dict) -> float:
        """One call's time in ms. The mode switch and inference_mode are entered before the
        clock starts, so only vLLM's own call is inside it."""
        torch = self._torch
        with torch.inference_mode(), self.mode(mode):
            if self.cuda:
                torch.cuda.synchronize()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                out = self._raw(mode, mm_kwargs)
                end.record()
                end.synchronize()
                del out
                return float(start.elapsed_time(end))
            t = time.perf_counter()
            out = self._raw(mode, mm_kwargs)
            dt = (time.perf_counter() - t) * 1e3
            del out
            return dt

    @contextmanager
    def count_layer_paths(self):
        """Count encoder-layer calls by the path vLLM 0.26's wrapper takes for them.

        Mirrors `support_torch_compile.__call__`: do_not_compile (or already inside a
        compilation) -> plain forward; a forward context with skip_compiled -> plain forward;
        an AOT-compiled function -> it; `compiled` -> the dynamo-compiled callable; otherwise
        this call compiles. A CUDA graph replay runs no Python at all: 0 calls."""
        torch = self._torch
        cls = self.layer_cls
        orig = cls.__call__
        tally: Counter = Counter()

        def skip_compiled() -> bool:
            try:
                from vllm.forward_context import get_forward_context, is_forward_context_available

                return bool(is_forward_context_available() and
                            getattr(get_forward_context(), "skip_compiled", False))
            except Exception:
                return False

        def counting_call(layer, *a, **kw):
            if getattr(layer, "do_not_compile", True) or torch.compiler.is_compiling():
                path = "eager"
            elif skip_compiled():
                path = "eager (skip_compiled)"
            elif getattr(layer, "aot_compiled_fn", None) is not None:
                path = "compiled (AOT)"
            elif getattr(layer, "compiled", False):
                path = "compiled (dynamo)"
            else:
                path = "compiling (first call)"
            tally[path] += 1
            return orig(layer, *a, **kw)

        cls.__call__ = counting_call
        try:
            yield tally
        finally:
            cls.__call__ = orig

    def manager_stats(self) -> dict | None:
        m = self.manager
        if m is None:
            return None
        try:
            s = m.get_cumulative_stats()
        except Exception:
            s = {"graph_hits": getattr(m, "graph_hits", None),
                 "graph_misses": getattr(m, "graph_misses", None)}
        s["max_batch_size"] = getattr(m, "max_batch_size", None)
        s["token_budgets"] = list(getattr(m, "token_budgets", []) or [])
        return s

    def profile(self, mode: str, mm_kwargs: dict) -> dict:
        """Kernels of one call (CUDA activity only), after one untimed call."""
        torch = self._torch
        from torch.profiler import ProfilerActivity, profile

        self.call(mode, mm_kwargs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.call(mode, mm_kwargs)
            torch.cuda.synchronize()
        return kernel_breakdown(kernel_rows(prof.events()))


def kernel_rows(events) -> list[tuple[str, int, float]]:
    """(name, count, device us) per kernel name from profiler events that ran on the GPU.

    Only device-side events (kernels, memcpy, memset): CPU-side ones (CUDA runtime calls)
    also carry the time of the kernels they launched and would count it twice."""
    from torch.autograd import DeviceType

    agg: dict[str, list] = {}
    for e in events:
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = getattr(e, "cuda_time_total", 0)
        a = agg.setdefault(e.name, [0, 0.0])
        a[0] += 1
        a[1] += float(us or 0)
    return [(n, c, us) for n, (c, us) in agg.items()]


# -- the run --------------------------------------------------------------------------------

def _vision_shape(cfg) -> dict:
    v = cfg.vision_config
    return {"hidden": v.hidden_size, "layers": v.num_hidden_layers,
            "heads": v.num_attention_heads, "mlp": v.intermediate_size,
            "norm_type": getattr(v, "norm_type", "layer_norm"),
            "qk_normalization": bool(getattr(v, "qk_normalization", False)),
            "qkv_bias": bool(getattr(v, "qkv_bias", True)),
            "image_size": cfg.force_image_size or v.image_size, "patch": v.patch_size,
            "lm_hidden": cfg.text_config.hidden_size if hasattr(cfg, "text_config")
            else cfg.llm_config.hidden_size}


def flops_per_tile(shape: dict) -> float:
    """Same count as the bench's roofline (`vit_flops_per_tile`): layers + patch embedding +
    projector; qk-norm, norms and activations are not counted."""
    patches = (shape["image_size"] // shape["patch"]) ** 2
    t = patches + 1
    h, m = shape["hidden"], shape["mlp"]
    per_layer = 2 * t * (4 * h * h + 2 * h * m) + 4 * t * t * h
    embed = 2 * patches * 3 * shape["patch"] ** 2 * h
    tokens, d_in, lm = patches // 4, 4 * h, shape["lm_hidden"]
    return shape["layers"] * per_layer + embed + 2 * tokens * (d_in * lm + lm * lm)


def tokens_per_tile_of(model_dir: Path) -> int:
    """Image tokens per tile from a checkpoint's config.json (256 for InternVL3's 448 px
    tiles): (image_size / patch)^2 * downsample_ratio^2."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        v = cfg["vision_config"]
        side = cfg.get("force_image_size") or v["image_size"]
        return int((side // v["patch_size"]) ** 2 * cfg.get("downsample_ratio", 0.5) ** 2)
    except (OSError, ValueError, KeyError, TypeError):
        return 256


def run(opts: EncoderBenchOptions, log=print) -> dict:
    """Start one in-process engine, measure, return the result document (also on disk)."""
    from ..cache import CompileCache
    from ..engine import device_name, has_cuda, llm_kwargs

    cuda = has_cuda()
    modes = resolve_modes(opts.modes, cuda)  # a user error before anything heavy
    t_start = time.perf_counter()

    def say(msg: str):
        log(f"[{time.perf_counter() - t_start:7.1f} s] {msg}")

    # engine core in this process; fresh compile caches (see the module docstring)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    tmp = Path(tempfile.mkdtemp(prefix="ivb-encoder-"))
    os.environ.update({"VLLM_CACHE_ROOT": str(tmp / "vllm"),
                       "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
                       "TRITON_CACHE_DIR": str(tmp / "triton")})
    from ..config import default_cache_dir

    spec = CompileCache(opts.cache_dir or default_cache_dir()).resolve(EngineSpec.from_options(
        asdict(opts), compile=cuda and any(m != "eager" for m in modes),
        kv_cache_gb=opts.kv_cache_gb if cuda else None))
    kw = llm_kwargs(spec, cuda=cuda)
    from .. import checkpoint

    if cuda and "cudagraph" in modes:
        kw["compilation_config"].update(cudagraph_settings(
            opts.batches, tokens_per_tile_of(Path(spec.model)), opts.cudagraph_budgets))

    name = opts.name or "encoder-" + opts.model.split(":")[-1].rstrip("/").split("/")[-1]
    doc: dict = {
        "kind": "encoder-bench", "name": name, "complete": False, "command": opts.command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": {k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in asdict(opts).items()},
        "modes": list(modes), "labels": {m: LABELS[m] for m in modes},
        "model": {"spec": opts.model, "path": spec.model,
                  "synthesized": checkpoint.is_synthesized(spec.model)},
        "engine": {"llm_kwargs": {k: v for k, v in kw.items() if k != "model"}},
        "device": {"name": device_name(), "cuda": cuda}, "versions": {"git": git_sha()},
        "tolerance": None, "weights": None, "degeneracy": {}, "evidence": {},
        "batches": [], "errors": [],
    }
    rec = Recorder(doc, Path(opts.results_dir))
    rec.save()
    llm = None
    try:
        say(f"starting vLLM in-process: {opts.model}, modes {','.join(modes)}, compilation "
            f"{kw.get('compilation_config')}")
        t0 = time.perf_counter()
        from vllm import LLM

        llm = LLM(**kw)
        doc["engine"]["init_s"] = round(time.perf_counter() - t0, 2)
        say(f"engine ready in {doc['engine']['init_s']} s")
        _measure(EncoderHarness(llm, cuda), opts, modes, rec, say)
        doc["complete"] = True
    except Exception as e:  # keep what was measured; the caller exits non-zero
        rec.error("run", e)
        say(f"FAILED: {error_line(e)}")
        import traceback

        traceback.print_exc()
    finally:
        doc["total_s"] = round(time.perf_counter() - t_start, 1)
        rec.save()
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    return doc


def _measure(h: "EncoderHarness", opts: EncoderBenchOptions, modes: tuple[str, ...],
             rec: Recorder, say):
    """Everything after the engine start, on harness `h` (a fake one in the unit tests)."""
    doc = rec.doc
    _describe(h, doc, say)
    ev = doc["evidence"]
    ev["layers_after_start"] = h.layer_state()
    ev["dynamo_after_start"] = dynamo_counters()
    ev["vllm_counter_after_start"] = vllm_compilation_counter()
    avail = h.modes_available()
    active = [m for m in modes if avail[m] is None]
    for m in modes:
        if avail[m] is not None:
            rec.error(f"mode {m}", avail[m])
            say(f"mode {m} unavailable: {avail[m]}")
    doc["modes_run"] = active
    rec.save()
    _reinit_weights(h, opts, rec, say)
    if "compiled" in active or "cudagraph" in active:
        active = _first_compiled_call(h, opts, active, rec, say)
    rec.save()
    _evidence_calls(h, opts, active, rec, say)

    # timings and agreement, batch by batch
    d_before, v_before = dynamo_counters(), vllm_compilation_counter()
    g_before = h.manager_stats()
    for b in opts.batches:
        _time_batch(h, opts, b, active, rec, say)
    ev["during_timing"] = {
        "dynamo_delta": counter_delta(d_before, dynamo_counters()),
        "vllm_counter_delta": counter_delta(v_before, vllm_compilation_counter())}
    g_after = h.manager_stats()
    if g_before is not None and g_after is not None:
        ev["during_timing"].update(_graph_delta(g_before, g_after))
    ev["layers_at_end"] = h.layer_state()
    rec.save()
    if h.cuda:
        _profile_kernels(h, opts, active, rec, say)
    else:
        ev["kernels"] = []
    doc["engine"]["cudagraph_manager_at_end"] = h.manager_stats()


def _describe(h: "EncoderHarness", doc: dict, say) -> None:
    """Versions, device, the encoder's shape and the engine's compilation settings."""
    import torch

    cuda = h.cuda
    try:
        import vllm

        doc["versions"]["vllm"] = vllm.__version__
    except Exception:
        pass
    doc["versions"]["torch"] = torch.__version__
    if cuda:
        doc["device"]["name"] = torch.cuda.get_device_name(0)
    cfg = h.model.config
    shape = _vision_shape(cfg)
    doc["model"]["vision"] = shape
    doc["model"]["tokens_per_tile"] = h.tokens_per_tile
    try:
        doc["model"]["flops_per_tile"] = flops_per_tile(shape)
    except Exception:
        doc["model"]["flops_per_tile"] = None
    doc["tolerance"] = tolerance(shape["layers"])
    cc = h.runner.vllm_config.compilation_config
    doc["engine"]["compilation"] = {k: str(getattr(cc, k, None)) for k in (
        "mode", "backend", "custom_ops", "compile_mm_encoder", "cudagraph_mm_encoder",
        "encoder_cudagraph_token_budgets", "encoder_cudagraph_max_vision_items_per_batch",
        "cudagraph_mode")}
    doc["engine"]["cudagraph_manager"] = h.manager_stats()
    if hasattr(h, "runner_info"):
        doc["engine"]["model_runner"] = h.runner_info()
        say(f"model runner: {doc['engine']['model_runner']['class']} "
            f"(VLLM_USE_V2_MODEL_RUNNER={doc['engine']['model_runner']['VLLM_USE_V2_MODEL_RUNNER']}"
            f", encoder CUDA graph manager "
            f"{'yes' if doc['engine']['model_runner']['encoder_cudagraph_manager'] else 'no'})")


def _reinit_weights(h: "EncoderHarness", opts: EncoderBenchOptions, rec: Recorder, say):
    """The encoder as loaded (dummy weights), then with trained-like weights."""
    doc = rec.doc
    try:
        doc["degeneracy"]["dummy_weights"] = token_spread(
            h.cat(h.call("eager", h.inputs(1, opts.seed))), h.tokens_per_tile)
    except Exception as e:
        rec.error("degeneracy (dummy weights)", e)
    doc["weights"] = reinit_vision_(h.model, opts.seed, opts.init_std, opts.layer_scale)
    say(f"re-initialised {doc['weights']['total']:,} vision/projector parameters in place")
    try:
        doc["degeneracy"]["reinit_weights"] = token_spread(
            h.cat(h.call("eager", h.inputs(1, opts.seed))), h.tokens_per_tile)
    except Exception as e:
        rec.error("degeneracy (re-initialised weights)", e)


def _first_compiled_call(h: "EncoderHarness", opts: EncoderBenchOptions, active: list[str],
                         rec: Recorder, say) -> list[str]:
    """Our first compiled call holds 13 tiles, whatever --batches starts with (a one-tile
    first call specialises the batch dimension). Returns the modes still to run."""
    d0, v0 = dynamo_counters(), vllm_compilation_counter()
    try:
        with h.count_layer_paths() as paths:
            h.call("compiled", h.inputs(TILES_PER_IMAGE, opts.seed))
            h.sync()
        rec.doc["evidence"]["first_compiled_call"] = {
            "tiles": TILES_PER_IMAGE, "layer_paths": dict(paths),
            "dynamo_delta": counter_delta(d0, dynamo_counters()),
            "vllm_counter_delta": counter_delta(v0, vllm_compilation_counter())}
    except Exception as e:
        rec.error("first compiled call (13 tiles)", e)
        say(f"the 13-tile compiled warm-up failed: {error_line(e)}; dropping compiled modes")
        active = [m for m in active if m == "eager"]
        rec.doc["modes_run"] = active
    return active


def _evidence_calls(h: "EncoderHarness", opts: EncoderBenchOptions, active: list[str],
                    rec: Recorder, say) -> None:
    """Which path each mode takes, one call each, at one-tile and multi-tile batches."""
    ev = rec.doc["evidence"]
    ev["calls"] = []
    for b in opts.evidence_batches:
        for m in active:
            d0, v0 = dynamo_counters(), vllm_compilation_counter()
            g0 = h.manager_stats() if m == "cudagraph" else None
            try:
                with h.count_layer_paths() as paths:
                    h.call(m, h.inputs(b, opts.seed + b))
                    h.sync()
                row = {"mode": m, "tiles": b, "layer_paths": dict(paths),
                       "layer_calls": sum(paths.values()),
                       "dynamo_delta": counter_delta(d0, dynamo_counters()),
                       "vllm_counter_delta": counter_delta(v0, vllm_compilation_counter())}
                if g0 is not None:
                    g1 = h.manager_stats()
                    row.update(_graph_delta(g0, g1))
                ev["calls"].append(row)
            except Exception as e:
                rec.error(f"evidence {m} {b} tiles", e)
    rec.save()
    say("evidence pass done: " + "; ".join(
        f"{r['mode']}@{r['tiles']}: {r['layer_paths']}" for r in ev["calls"]))


def _time_batch(h: "EncoderHarness", opts: EncoderBenchOptions, b: int, active: list[str],
                rec: Recorder, say) -> None:
    """One tile batch: agreement with eager, warm-up, interleaved timed rounds, statistics."""
    doc, cuda = rec.doc, h.cuda
    row = {"tiles": b, "items": item_layout(b), "modes": {}, "agreement": {}}
    doc["batches"].append(row)
    try:
        inputs = h.inputs(b, opts.seed + 1000 + b)
    except Exception as e:
        rec.error(f"inputs {b} tiles", e)
        row["error"] = error_line(e)
        rec.save()
        return
    live = _agree_and_warm(h, opts, b, active, inputs, row, rec)
    samples: dict[str, list[float | None]] = {m: [] for m in live}
    for r in range(opts.repeats):
        k = r % len(live) if live else 0
        for m in live[k:] + live[:k]:  # rotate the order every round
            try:
                samples[m].append(h.timed_ms(m, inputs))
            except Exception as e:
                samples[m].append(None)
                row["modes"].setdefault(m, {})["error"] = error_line(e)
                rec.error(f"{m} {b} tiles (repeat {r})", e)
                _free(cuda)
        live = [m for m in live if "error" not in row["modes"].get(m, {})]
    del inputs
    _summarize_batch(row, samples, b, doc["model"].get("flops_per_tile"))
    _free(cuda)
    rec.save()
    say(f"{b:>4} tiles: " + "  ".join(
        f"{m} {row['modes'][m]['ms']['median']:.3f} ms"
        + (f" (x{row['modes'][m]['speedup_vs_eager']['median']:.3f})"
           if m != "eager" and row['modes'][m].get('speedup_vs_eager', {}).get('median')
           else "")
        for m in row["modes"] if row["modes"][m].get("ms", {}).get("median"))
        + "".join(f"  [{m}: cos {a.get('cos', float('nan')):.6f} max|d| "
                  f"{a.get('max_abs_diff', float('nan')):.3g}]"
                  for m, a in row["agreement"].items() if m != "eager_repeat"))


def _agree_and_warm(h: "EncoderHarness", opts: EncoderBenchOptions, b: int, active: list[str],
                    inputs, row: dict, rec: Recorder) -> list[str]:
    """Each mode's first call on `inputs`, compared with eager's (eager first: it is the
    reference, and run twice for the noise floor), then its warm-up. Returns the modes that
    got through both."""
    live: list[str] = []
    ref = None
    for m in active:
        try:
            emb = h.cat(h.call(m, inputs))
            h.sync()
            if m == "eager":
                ref = emb
                again = h.cat(h.call("eager", inputs))
                row["agreement"]["eager_repeat"] = agreement(ref, again)
                del again
            elif ref is not None:
                row["agreement"][m] = agreement(ref, emb, rec.doc["tolerance"])
            del emb
            live.append(m)
        except Exception as e:
            row["modes"][m] = {"error": error_line(e)}
            rec.error(f"{m} {b} tiles (first call)", e)
            _free(h.cuda)
    ref = None
    for m in list(live):
        try:
            for _ in range(opts.warmup):
                h.call(m, inputs)
            h.sync()
        except Exception as e:
            row["modes"][m] = {"error": error_line(e)}
            rec.error(f"{m} {b} tiles (warm-up)", e)
            live.remove(m)
            _free(h.cuda)
    return live


def _summarize_batch(row: dict, samples: dict[str, list[float | None]], b: int,
                     flops_per_tile: float | None) -> None:
    """Median and interval per mode, tiles/s, TFLOP/s, and the paired speed-up vs eager."""
    eager_ms = list(samples.get("eager", []))
    for m, xs in samples.items():
        ok = [x for x in xs if x is not None]
        st = median_ci(ok)
        entry = row["modes"].setdefault(m, {})
        entry.update({"ms": st, "samples_ms": [round(x, 4) for x in ok]})
        if st["median"]:
            entry["tiles_per_s"] = b * 1000.0 / st["median"]
            entry["tflops"] = flops_per_tile * b / (st["median"] / 1000) / 1e12 \
                if flops_per_tile else None
        if m != "eager" and eager_ms:
            pairs = [(a, c) for a, c in zip(eager_ms, xs) if a is not None and c is not None]
            entry["speedup_vs_eager"] = paired_speedup([a for a, _ in pairs],
                                                       [c for _, c in pairs])


def _profile_kernels(h: "EncoderHarness", opts: EncoderBenchOptions, active: list[str],
                     rec: Recorder, say) -> None:
    """What the GPU runs in each mode: kernels by kind (GEMM, attention, Inductor, other)."""
    ev = rec.doc["evidence"]
    ev["kernels"] = []
    for b in opts.profile_batches:
        for m in active:
            try:
                k = h.profile(m, h.inputs(b, opts.seed + 2000 + b))
                ev["kernels"].append({"mode": m, "tiles": b, **k})
            except Exception as e:
                rec.error(f"profile {m} {b} tiles", e)
                _free(h.cuda)
    rec.save()
    say("kernel profile: " + "; ".join(
        f"{r['mode']}@{r['tiles']}: {r['kernels']} kernels, {r['device_ms']:.2f} ms"
        for r in ev["kernels"]))


def _graph_delta(before: dict, after: dict) -> dict:
    """Encoder CUDA-graph hits and misses between two `manager_stats()` snapshots."""
    return {k: (after.get(k) or 0) - (before.get(k) or 0) for k in ("graph_hits", "graph_misses")}


def _free(cuda: bool):
    if cuda:
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:
            pass


# -- reports --------------------------------------------------------------------------------

def _f(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "–"
    return f"{v:.{digits}f}"


def _ms_cell(st: dict | None) -> str:
    if not st or st.get("median") is None:
        return "–"
    return f"{st['median']:.3f} ({st['lo']:.3f}–{st['hi']:.3f})"


def _x_cell(st: dict | None) -> str:
    if not st or st.get("median") is None:
        return "–"
    return f"**{st['median']:.3f}×** ({st['lo']:.3f}–{st['hi']:.3f})"


def _sci(v) -> str:
    return "–" if v is None else f"{v:.2e}"


def model_title(doc: dict) -> str:
    v = doc.get("model", {}).get("vision") or {}
    what = (f"InternViT {v.get('layers')} layers × hidden {v.get('hidden')} "
            f"(MLP {v.get('mlp')}, {v.get('heads')} heads, {v.get('norm_type')}"
            f"{', qk-norm' if v.get('qk_normalization') else ''})") if v else ""
    return f"{doc['name']}: {doc['model']['spec']} — {what}"


def results_markdown(doc: dict) -> str:
    dev = doc.get("device", {})
    ver = doc.get("versions", {})
    modes = doc.get("modes_run") or doc.get("modes", [])
    others = [m for m in modes if m != "eager"]
    opts = doc.get("options", {})
    lines = [f"## {model_title(doc)}", ""]
    if not dev.get("cuda"):
        lines += ["**CPU run: a functional check, not a measurement of the GPU encoder.**", ""]
    lines += [f"- Device: {dev.get('name')} · vLLM {ver.get('vllm')} · torch {ver.get('torch')}"
              f" · git {(ver.get('git') or '?')[:12]}",
              f"- Engine start {doc.get('engine', {}).get('init_s')} s; the whole run "
              f"{doc.get('total_s')} s; {'complete' if doc.get('complete') else 'INCOMPLETE'}.",
              f"- Timed: {opts.get('repeats')} interleaved rounds after {opts.get('warmup')} "
              f"warm-up calls per mode and batch; ms per call "
              f"{'between CUDA events' if dev.get('cuda') else 'by wall clock'} "
              f"(median, {int(CONFIDENCE * 100)} % order-statistics interval); speed-up = median "
              f"of per-round eager/mode ratios with its interval.",
              "- Modes: " + "; ".join(f"`{m}` {doc.get('labels', {}).get(m, m)}" for m in modes),
              f"- Tiles grouped into images of ≤ {TILES_PER_IMAGE} tiles; pixels N(0, 1); "
              f"weights re-initialised in place (N(0, {opts.get('init_std')}) matrices, norms 1, "
              f"biases 0, layer scale {opts.get('layer_scale')}, seed {opts.get('seed')}).",
              ""]
    mr = model_runner_of(doc)
    if mr:
        lines.insert(-1, f"- vLLM model runner: **{runner_label(mr)}**"
                     + (f" (`{mr['class']}`)" if mr.get("class") else "")
                     + (f", VLLM_USE_V2_MODEL_RUNNER="
                        f"{mr['VLLM_USE_V2_MODEL_RUNNER'] if mr['VLLM_USE_V2_MODEL_RUNNER'] is not None else 'unset'}"
                        if "VLLM_USE_V2_MODEL_RUNNER" in mr else "")
                     + f"; encoder CUDA graph manager: "
                     f"{'yes' if mr.get('encoder_cudagraph_manager') else 'no'} "
                     f"({mr.get('source', '')}).")
    cg = doc.get("engine", {}).get("cudagraph_manager")
    if cg:
        lines += [f"- Encoder CUDA graphs: budgets {cg.get('token_budgets')} tokens, up to "
                  f"{cg.get('max_batch_size')} images per graph "
                  f"({opts.get('cudagraph_budgets')} budgets).", ""]
    head = ["tiles", "eager ms"] + [f"{m} ms" for m in others] + \
        [f"{m} speed-up" for m in others] + [f"{m} tiles/s" for m in modes]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in doc.get("batches", []):
        md = row.get("modes", {})
        cells = [str(row["tiles"]), _ms_cell(md.get("eager", {}).get("ms"))]
        cells += [_ms_cell(md.get(m, {}).get("ms")) if "error" not in md.get(m, {})
                  else "error" for m in others]
        cells += [_x_cell(md.get(m, {}).get("speedup_vs_eager")) for m in others]
        cells += [_f(md.get(m, {}).get("tiles_per_s"), 1) for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    tol = doc.get("tolerance") or {}
    lines += ["", f"Agreement with eager on the same inputs (vision embeddings after the "
              f"projector). Tolerance: relative L2 ≤ {tol.get('rel_l2_max')} and cos ≥ "
              f"{tol.get('cos_min')} ({tol.get('why')}).", ""]
    head = ["tiles", "eager rerun max abs Δ"] + \
        [f"{m}: max abs Δ / max abs ref · rel L2 · cos · worst token cos · ok" for m in others]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in doc.get("batches", []):
        ag = row.get("agreement", {})
        cells = [str(row["tiles"]), _sci(ag.get("eager_repeat", {}).get("max_abs_diff"))]
        for m in others:
            a = ag.get(m)
            if not a:
                cells.append("–")
            elif "error" in a:
                cells.append(f"error: {a['error']}")
            else:
                cells.append(f"{_sci(a['max_abs_diff'])} / {_f(a['ref_max_abs'], 2)} · "
                             f"{_sci(a['rel_l2'])} · {a['cos']:.6f} · {a['cos_min_token']:.4f} · "
                             f"{'yes' if a.get('ok') else '**NO**'}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *evidence_markdown(doc)]
    lines += footer_markdown(doc)
    return "\n".join(lines) + "\n"


def evidence_markdown(doc: dict) -> list[str]:
    ev = doc.get("evidence", {})
    out = ["Is the compiled graph what runs?", ""]
    ls = ev.get("layers_after_start")
    if ls:
        out.append(f"- Encoder layers after engine start: {ls.get('layers')} layers, "
                   f"{ls.get('aot_compiled_fn', 0)} hold an AOT-compiled function "
                   f"({ls.get('aot_loaded_from_disk', 0)} loaded from the AOT artefact the first "
                   f"layer saved), {ls.get('compiled_flag', 0)} marked compiled, "
                   f"{ls.get('do_not_compile', 0)} with do_not_compile.")
    vc = ev.get("vllm_counter_after_start") or {}
    if vc and "error" not in vc:
        keys = ("num_aot_compiles", "num_aot_artifacts_saved", "num_aot_artifacts_loaded",
                "num_backend_compilations", "num_inductor_compiles", "num_cudagraph_captured")
        out.append("- vLLM compilation counter after start (LM and encoder): " +
                   ", ".join(f"{k} {vc.get(k)}" for k in keys if k in vc) + ".")
    dy = ev.get("dynamo_after_start") or {}
    if dy and "error" not in dy:
        gb = sum((dy.get("graph_break") or {}).values())
        fr = dy.get("frames") or {}
        out.append(f"- torch._dynamo counters after start (whole process: LM and encoder): "
                   f"unique graphs {(dy.get('stats') or {}).get('unique_graphs', 0)}, frames "
                   f"ok/total {fr.get('ok', 0)}/{fr.get('total', 0)}, graph breaks {gb}, "
                   f"recompiles {sum((dy.get('recompiles') or {}).values())}.")
    fc = ev.get("first_compiled_call")
    if fc:
        out.append(f"- Our first compiled call ({fc['tiles']} tiles): layer paths "
                   f"{fc['layer_paths']}; dynamo counters changed by {fc['dynamo_delta'] or 'nothing'}"
                   f"; vLLM counter by {fc['vllm_counter_delta'] or 'nothing'}.")
    dt = ev.get("during_timing")
    if dt:
        out.append(f"- During all timed calls: dynamo counters changed by "
                   f"{dt.get('dynamo_delta') or 'nothing'} (no new frame = no recompilation, "
                   f"no fallback trace); vLLM counter by {dt.get('vllm_counter_delta') or 'nothing'}"
                   + (f"; encoder CUDA graph hits {dt.get('graph_hits')}, misses (eager "
                      f"fallback) {dt.get('graph_misses')}" if "graph_hits" in dt else "") + ".")
    calls = ev.get("calls") or []
    if calls:
        out += ["", "| mode | tiles | encoder-layer calls by path | graph replays (hits/misses) "
                "| dynamo counter change |", "|---|---|---|---|---|"]
        for r in calls:
            paths = ", ".join(f"{k}: {v}" for k, v in r["layer_paths"].items()) or \
                "none (no Python-level layer call)"
            gm = f"{r['graph_hits']}/{r['graph_misses']}" if "graph_hits" in r else "–"
            out.append(f"| {r['mode']} | {r['tiles']} | {paths} | {gm} | "
                       f"{r['dynamo_delta'] or 'none'} |")
    kern = ev.get("kernels") or []
    if kern:
        cats = ("gemm", "attention", "inductor", "other", "memcpy")
        out += ["", "GPU kernels of one call (torch.profiler, CUDA activity): count and ms by kind.",
                "", "| mode | tiles | kernels | device ms | " +
                " | ".join(f"{c} ms (n)" for c in cats) + " |",
                "|---|---|---|---|" + "---|" * len(cats)]
        for r in kern:
            cells = []
            for c in cats:
                v = r["categories"].get(c)
                cells.append(f"{v['ms']:.3f} ({v['kernels']})" if v else "–")
            out.append(f"| {r['mode']} | {r['tiles']} | {r['kernels']} | {r['device_ms']:.3f} | "
                       + " | ".join(cells) + " |")
    deg = doc.get("degeneracy") or {}
    if deg:
        out += ["", "Encoder output of one tile, mean cosine between its tokens (≈1: every token "
                "the same, a degenerate encoder): " + "; ".join(
                    f"{k.replace('_', ' ')} {v['mean_token_cos']:.4f} (std {v['std']:.3g})"
                    for k, v in deg.items()) + "."]
    return out


def encoder_name(doc: dict) -> str:
    """InternViT-300M / InternViT-6B from the recorded shape, else the run's name."""
    v = (doc.get("model") or {}).get("vision") or {}
    known = {(24, 1024): "InternViT-300M", (45, 3200): "InternViT-6B"}
    return known.get((v.get("layers"), v.get("hidden")), doc.get("name", "?"))


def plot(docs: list[dict], path: Path) -> Path | None:
    """Speed-up vs eager by tile batch, one line per (model, mode), interval bars. None if
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=100)
    styles = {"compiled": "-o", "cudagraph": "--s"}
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    encoders = list(dict.fromkeys(encoder_name(d) for d in docs))
    drawn = 0
    for d in docs:
        enc = encoder_name(d)
        runner = runner_label(model_runner_of(d))
        # one colour per encoder; a V2-runner run (no CUDA graph mode) drawn fainter, so
        # that the same encoder's two runs stay apart
        faint = runner == "V2 runner" and len(docs) > 1
        for m in (d.get("modes_run") or d.get("modes", [])):
            if m == "eager":
                continue
            pts = [(r["tiles"], r["modes"][m]["speedup_vs_eager"]) for r in d.get("batches", [])
                   if r.get("modes", {}).get(m, {}).get("speedup_vs_eager", {}).get("median")]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            med = [p[1]["median"] for p in pts]
            err = [[p[1]["median"] - p[1]["lo"] for p in pts],
                   [p[1]["hi"] - p[1]["median"] for p in pts]]
            ax.errorbar(xs, med, yerr=err, fmt=(":^" if faint else styles.get(m, "-^")),
                        capsize=3, ms=5, alpha=0.55 if faint else 1.0,
                        color=colors[encoders.index(enc) % len(colors)],
                        label=f"{enc}: {m}" + (f" ({runner})" if runner else ""))
            drawn += 1
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["tiles"] for d in docs for r in d.get("batches", [])})
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("tiles per encoder call (448 px tiles)")
    ax.set_ylabel("speed-up vs eager (median, 95 % interval)")
    ax.spines[["top", "right"]].set_visible(False)
    if drawn:
        ax.legend(fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no compiled mode measured", ha="center", va="center",
                transform=ax.transAxes, color="#777777")
    from .report import save_figure

    devices = ", ".join(sorted({d.get("device", {}).get("name", "?") for d in docs}))
    return save_figure(fig, path, f"InternViT encoder in vLLM · {devices}",
                       cpu=any(not d.get("device", {}).get("cuda") for d in docs))


def write_outputs(doc: dict, results_dir: Path) -> dict[str, Path]:
    """NAME.json (already written while running), NAME.md and NAME.png (if matplotlib)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    out = {"json": results_dir / f"{doc['name']}.json"}
    if not out["json"].is_file():
        Recorder(doc, results_dir).save()
    md = results_dir / f"{doc['name']}.md"
    md.write_text(f"# Encoder benchmark\n\n{results_markdown(doc)}")
    out["md"] = md
    png = plot([doc], results_dir / f"{doc['name']}.png")
    if png:
        out["png"] = png
    return out


def write_report(files: list[Path | str], out_dir: Path | str, stem: str = "ENCODER") -> dict:
    """One Markdown report and one plot for several result files (e.g. 300M and 6B)."""
    docs = []
    for f in files:
        try:
            docs.append(json.loads(Path(f).read_text()))
        except (OSError, ValueError):
            continue
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(docs, out_dir / f"{stem.lower()}.png") if docs else None
    parts = ["# InternViT encoder: eager vs compiled vs compiled + CUDA graphs", ""]
    if png:
        parts += [f"![speed-up vs tile batch]({png.name})", ""]
    parts += [results_markdown(d) for d in docs] or ["No results."]
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(parts))
    return {"md": md, "png": png, "docs": len(docs)}


def main(argv: list[str] | None = None) -> int:
    """`python -m internvl_batch.bench.encoder report [--each] OUT_DIR A.json B.json ...`

    --each also rewrites NAME.md and NAME.png next to every result file (e.g. after the
    report code changed), from the JSON alone."""
    argv = list(sys.argv[1:] if argv is None else argv)
    each = "--each" in argv
    argv = [a for a in argv if a != "--each"]
    if len(argv) < 3 or argv[0] != "report":
        print("usage: python -m internvl_batch.bench.encoder report [--each] OUT_DIR "
              "RESULT.json...", file=sys.stderr)
        return 2
    if each:
        for f in argv[2:]:
            try:
                d = json.loads(Path(f).read_text())
            except (OSError, ValueError):
                continue
            outs = write_outputs(d, Path(f).parent)
            print("wrote " + ", ".join(str(p) for k, p in outs.items() if k != "json"))
    r = write_report(argv[2:], argv[1])
    print(f"wrote {r['md']} ({r['docs']} result files)" + (f" and {r['png']}" if r["png"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
