"""Code that runs inside vLLM's worker process: the InternViT encoder, reached by name.

vLLM's `LLM` runs its model in an engine-core process; `LLM.collective_rpc("name", args=...)`
calls a method of the worker there, and `worker_extension_cls` (an engine argument, vLLM 0.26
and 0.32) adds the methods of a class of ours to the worker. Every engine of this package is
started with `EXTENSION`, so the library (compile cache probe) and the benchmarks can:

* `ivb_encoder_check(tiles, seed)`: run the encoder that serves (compiled if the engine
  compiled it) and the same layers with the compiled wrapper bypassed, on the same weights and
  pixels, and compare the vision embeddings. This replaces a second, eager engine as the
  compile cache's correctness probe: no engine start, and embeddings are a
  stronger check than first tokens of dummy-weight logits.
* `ivb_encoder_mode(mode)`: switch the serving engine between its compiled and eager encoder
  (same engine, same weights) so compiled vs eager can be timed in interleaved rounds.
* `ivb_encoder_timer(action)`: CUDA events around every `embed_multimodal` call the model
  runner makes: the encoder's GPU time and tile count, for its share of a run's GPU time.
* `ivb_call(target, *args)`: run a function of another module in the worker, named by
  `"module:function"`: how the benchmark wing runs its own worker-side code (bench-ab's
  profile of an engine step, `internvl_batch/bench/profiling.py`) without the library
  importing or carrying it.

Eager in the same engine: vLLM's `@support_torch_compile` wrapper calls the plain `forward`
when a layer's `do_not_compile` is set (vLLM 0.26 `compilation/decorators.py`, `__call__`).
That is what an engine with `compile_mm_encoder=False` runs for these layers.

Only the standard library is imported at module level: the front process imports this module
for `EXTENSION`, the worker when vLLM resolves the class.
"""
from __future__ import annotations

import math
import os
import time

EXTENSION = "internvl_batch.hooks.EncoderControl"
TILES_PER_IMAGE = 13  # InternVL3: max_dynamic_patch 12 + the thumbnail tile
BF16_UNIT_ROUNDOFF = 2.0 ** -9  # round-to-nearest, 8 significant bits
ROUNDINGS_PER_LAYER = 4  # norm, attention out, MLP act, residual: where compiled and eager may round differently
GATE_ENV = "INTERNVL_BATCH_WAIT_FOR_ENTRY"  # see install_gate

def item_layout(tiles: int, per_image: int = TILES_PER_IMAGE) -> list[int]:
    """Tiles per image for a batch of `tiles` tiles: full images of `per_image`, then the rest."""
    full, rest = divmod(tiles, per_image)
    return [per_image] * full + ([rest] if rest else [])


def tolerance(layers: int) -> dict:
    """Agreement a bf16 compiled graph must meet against eager, from the format alone.

    bf16 keeps 8 significant bits: a stored value carries a relative rounding error of up to
    u = 2^-9 (round to nearest). A compiled layer runs the same arithmetic but fuses and
    reorders it, so at a few places per layer (norm, attention output, MLP activation, the
    residual update: k = 4) it rounds where eager does not, or the other way round. These
    differences are independent from layer to layer and add like a random walk, so after L
    layers the relative L2 difference stays below about u * k * sqrt(L): 3.9 % for InternViT-300M
    (24 layers) and 5.2 % for InternViT-6B (45). cos >= 1 - tol^2 / 2 is the same bound on the
    angle. A wrong graph (stale weights, a shape specialised to the wrong batch, a dropped op)
    lands far outside: cos well below 0.99."""
    rel = BF16_UNIT_ROUNDOFF * ROUNDINGS_PER_LAYER * math.sqrt(max(layers, 1))
    return {"rel_l2_max": round(rel, 4), "cos_min": round(1 - rel * rel / 2, 6),
            "layers": layers,
            "why": f"bf16 unit roundoff 2^-9 x {ROUNDINGS_PER_LAYER} roundings per layer x "
                   f"sqrt({layers} layers), random-walk accumulation"}


def agreement(ref, got, tol: dict | None = None) -> dict:
    """max |delta|, relative L2, cosine (whole tensor) and the worst per-token cosine."""
    import torch

    # float64: the sums behind cos and the norms must not add their own rounding
    a = ref.detach().double().reshape(-1, ref.shape[-1])
    b = got.detach().double().reshape(-1, got.shape[-1])
    if a.shape != b.shape:
        return {"ok": False, "error": f"shape {tuple(got.shape)} != {tuple(ref.shape)}"}
    d = b - a
    na, nb = a.norm().item(), b.norm().item()
    cos = float((a * b).sum().item() / (na * nb)) if na and nb else (1.0 if na == nb else 0.0)
    tok = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    out = {"max_abs_diff": float(d.abs().max().item()),
           "ref_max_abs": float(a.abs().max().item()),
           "rel_l2": float(d.norm().item() / na) if na else float(d.norm().item()),
           "cos": cos, "cos_min_token": float(tok.min().item()),
           "finite": bool(torch.isfinite(b).all().item())}
    if tol:
        out["ok"] = bool(out["finite"] and out["rel_l2"] <= tol["rel_l2_max"]
                         and out["cos"] >= tol["cos_min"])
    return out


class EncoderControl:
    """Mixed into vLLM's worker class (`worker_extension_cls`); methods are called through
    `LLM.collective_rpc`. Names start with `ivb_` because vLLM refuses an extension whose
    attributes clash with the worker's."""

    # -- reaching the model ------------------------------------------------------------------
    def _ivb_set(self, eager: bool):
        for layer, orig in zip(encoder_layers(self), compile_flags(self)):
            layer.do_not_compile = True if eager else orig

    # -- calls -------------------------------------------------------------------------------
    def ivb_encoder_mode(self, mode: str) -> dict:
        """'eager' or 'compiled' (the engine's own setting) for every later encoder call."""
        if mode not in ("eager", "compiled"):
            raise ValueError(f"mode {mode!r}: eager or compiled")
        self._ivb_set(eager=mode == "eager")
        flags = compile_flags(self)
        return {"mode": mode, "layers": len(flags), "compilable_layers": flags.count(False)}

    def _ivb_inputs(self, tiles: int, seed: int, image_token_id: int) -> dict:
        """mm_kwargs as vLLM's batching builds them (pixels on the device, counts on the
        CPU); pixel values ~ N(0, 1), the range of normalised image pixels."""
        import torch

        model = serving_model(self)
        p = next(model.vision_model.parameters())
        cfg = model.config
        side = cfg.force_image_size or cfg.vision_config.image_size
        gen = torch.Generator(device=p.device).manual_seed(seed)
        pv = torch.randn((tiles, 3, side, side), generator=gen, device=p.device,
                         dtype=torch.float32).to(p.dtype)
        return {"pixel_values_flat": pv,
                "image_num_patches": torch.tensor(item_layout(tiles), dtype=torch.int64),
                "image_token_id": torch.tensor(int(image_token_id))}

    def ivb_encoder_check(self, image_token_id: int, tiles: list[int] | tuple[int, ...] = (13, 3),
                          seed: int = 0) -> dict:
        """Serving encoder vs the same layers eager, on the same weights and pixels.

        `image_token_id`: the tokenizer's <IMG_CONTEXT> id (the model stores what it is given
        for later requests, so it must be the real one).
        `compilable_layers` 0 means the engine did not compile the encoder: both sides run
        the same code, so agreement is exact and proves only that the path works."""
        import torch

        model = serving_model(self)
        flags = compile_flags(self)
        tol = tolerance(len(flags))
        out: dict = {"layers": len(flags), "compilable_layers": flags.count(False),
                     "tolerance": tol, "batches": {}}
        t0 = time.perf_counter()
        saved_id = getattr(model, "img_context_token_id", None)
        try:
            for n in tiles:
                mm = self._ivb_inputs(int(n), seed + int(n), image_token_id)
                with torch.inference_mode():
                    self._ivb_set(eager=False)
                    got = torch.cat([o.reshape(-1, o.shape[-1])
                                     for o in model.embed_multimodal(**mm)])
                    self._ivb_set(eager=True)
                    ref = torch.cat([o.reshape(-1, o.shape[-1])
                                     for o in model.embed_multimodal(**mm)])
                out["batches"][str(n)] = agreement(ref, got, tol)
        finally:
            self._ivb_set(eager=False)
            if saved_id is not None:
                model.img_context_token_id = saved_id
        out["ok"] = all(b.get("ok") for b in out["batches"].values())
        out["seconds"] = round(time.perf_counter() - t0, 3)
        return out

    def ivb_encoder_timer(self, action: str) -> dict:
        """'start': time every encoder call from now; 'read': totals so far (synchronises);
        'stop': read and remove the timing wrapper."""
        import torch

        model = serving_model(self)
        if action == "start":
            if "embed_multimodal" not in vars(model):
                inner = model.embed_multimodal
                cuda = torch.cuda.is_available()
                calls: list = []

                def timed(**kw):
                    pv = kw.get("pixel_values_flat")
                    n = int(pv.shape[0]) if pv is not None else 0
                    if not cuda:
                        t = time.perf_counter()
                        res = inner(**kw)
                        calls.append((n, None, None, time.perf_counter() - t))
                        return res
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    res = inner(**kw)
                    b.record()
                    calls.append((n, a, b, None))
                    return res

                model.embed_multimodal = timed
                model._ivb_calls = calls
            model._ivb_calls.clear()
            return {"started": True}
        calls = getattr(model, "_ivb_calls", [])
        if calls and calls[-1][2] is not None:
            calls[-1][2].synchronize()
        ms = sum((a.elapsed_time(b) if a is not None else s * 1e3) for _, a, b, s in calls)
        res = {"calls": len(calls), "tiles": sum(c[0] for c in calls), "gpu_ms": ms}
        if action == "stop" and "embed_multimodal" in vars(model):
            del model.embed_multimodal
            del model._ivb_calls
        return res

    def ivb_call(self, target: str, *args):
        """`target` ("package.module:function") imported in this worker and called as
        function(worker, *args); its answer returned. The benchmark wing's worker-side code
        runs this way (`internvl_batch/bench/profiling.py`)."""
        import importlib

        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(self, *args)


def serving_model(worker):
    """The model the worker's runner serves (`get_model()` where the runner has it)."""
    runner = worker.model_runner
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def encoder_layers(worker) -> list:
    return list(serving_model(worker).vision_model.encoder.layers)


def compile_flags(worker) -> list[bool]:
    """Each encoder layer's do_not_compile as the engine set it (saved on the worker once,
    before any switch): False where the layer runs its compiled graph."""
    if not hasattr(worker, "_ivb_saved_flags"):
        worker._ivb_saved_flags = [bool(getattr(layer, "do_not_compile", True))
                                   for layer in encoder_layers(worker)]
    return worker._ivb_saved_flags


# -- waiting for a compile-cache entry inside the engine ------------------------------------

def install_gate() -> None:
    """Hold this worker before its first compiled forward until a cache entry is complete.

    An engine that finds its compile-cache entry being built by another process need not wait
    for it to start: process start, imports and weight loading do not read the entry, only the
    first forward (vLLM's memory profile run, inside `determine_available_memory`) does. So
    such an engine starts at once with GATE_ENV=<entry dir>; this wrapper, installed when vLLM
    imports this module in the worker, blocks `determine_available_memory` until
    `<entry>/.complete` exists, and fails if the builder gave up (the entry's lock is free and
    the entry still incomplete)."""
    entry = os.environ.get(GATE_ENV)
    if not entry:
        return
    import sys

    for modname in ("vllm.v1.worker.gpu_worker", "vllm.v1.worker.cpu_worker"):
        mod = sys.modules.get(modname)
        for cls in vars(mod).values() if mod else ():
            fn = getattr(cls, "determine_available_memory", None) if isinstance(cls, type) else None
            if fn is None or getattr(fn, "_ivb_gated", False) or cls.__module__ != modname:
                continue

            def gated(self, *a, _fn=fn, **kw):
                waited = wait_for_entry(entry)
                # the start timeline reads this line (engine log)
                print(f"internvl-batch: waited {waited:.1f} s for compile-cache entry "
                      f"{os.path.basename(entry)}", flush=True)
                return _fn(self, *a, **kw)

            gated._ivb_gated = True
            cls.determine_available_memory = gated


def wait_for_entry(entry_dir: str, poll_s: float = 0.2, lock_path: str | None = None) -> float:
    """Block until entry_dir/.complete exists; seconds waited. RuntimeError if no one is
    building it any more (its lock is free and it is still incomplete)."""
    import fcntl
    from pathlib import Path

    entry = Path(entry_dir)
    lock = Path(lock_path) if lock_path else entry.parent.parent / "locks" / f"{entry.name}.lock"
    t0 = time.monotonic()
    while not (entry / ".complete").is_file():
        time.sleep(poll_s)
        if lock.exists() and not (entry / ".complete").is_file():
            with open(lock) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # still being built
                fcntl.flock(f, fcntl.LOCK_UN)
            if not (entry / ".complete").is_file():
                raise RuntimeError(f"compile cache entry {entry.name}: its build stopped "
                                   "without completing it")
    return time.monotonic() - t0


install_gate()
