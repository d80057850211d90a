"""Code that runs inside vLLM's worker process: the InternViT encoder, reached by name.

vLLM's `LLM` runs its model in an engine-core process; `LLM.collective_rpc("name", args=...)`
calls a method of the worker there, and `worker_extension_cls` (an engine argument, vLLM 0.26
and 0.32) adds the methods of a class of ours to the worker. Every engine of this package is
started with `EXTENSION`, so the library (compile cache probe) and the benchmark can:

* `ivb_encoder_check(tiles, seed)`: run the encoder that serves (compiled if the engine
  compiled it) and the same layers with the compiled wrapper bypassed, on the same weights and
  pixels, and compare the vision embeddings. This replaces a second, eager engine as the
  compile cache's correctness probe: no engine start, and embeddings are a
  stronger check than first tokens of dummy-weight logits.
* `ivb_encoder_mode(mode)`: switch the serving engine between its compiled and eager encoder
  (same engine, same weights) so compiled vs eager can be timed in interleaved rounds.
* `ivb_encoder_timer(action)`: CUDA events around every `embed_multimodal` call the model
  runner makes: the encoder's GPU time and tile count, for its share of a run's GPU time.
* `ivb_encoder_profile(action)`: torch.profiler over a stretch of serving, each part of a step
  in a range of its own: GPU time by part and kernel class, and the GPU's idle gaps.

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

# The parts of an engine step that `ivb_encoder_profile` puts in record_function ranges, by
# range name: where each GPU kernel's launch lies (innermost range) names its part. Issue 14
# asks for GPU time by part (InternViT, projector, LM prefill, decode, sampler) and the gaps.
RANGES = {
    "ivb_vit": "InternViT (vision_model)",
    "ivb_projector": "projector (mlp1)",
    "ivb_encoder": "encoder, rest (pixel shuffle, copies)",
    "ivb_prefill": "model step with prefill (LM; mixed batches too)",
    "ivb_decode": "model step, decode only (LM)",
    "ivb_step": "model step, nothing scheduled",
    "ivb_sample": "sampling (sample_tokens)",
}
OUTSIDE = "outside every range"


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


def predicted_speedup(share: float, gain: float) -> float:
    """Amdahl: a part taking `share` of the time that becomes `gain` times faster."""
    return 1.0 / ((1.0 - share) + share / gain)


class EncoderControl:
    """Mixed into vLLM's worker class (`worker_extension_cls`); methods are called through
    `LLM.collective_rpc`. Names start with `ivb_` because vLLM refuses an extension whose
    attributes clash with the worker's."""

    # -- reaching the model ------------------------------------------------------------------
    def _ivb_model(self):
        runner = self.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def _ivb_layers(self) -> list:
        return list(self._ivb_model().vision_model.encoder.layers)

    def _ivb_flags(self) -> list[bool]:
        """Each layer's do_not_compile as the engine set it (saved once, before any switch)."""
        if not hasattr(self, "_ivb_saved_flags"):
            self._ivb_saved_flags = [bool(getattr(layer, "do_not_compile", True))
                                     for layer in self._ivb_layers()]
        return self._ivb_saved_flags

    def _ivb_set(self, eager: bool):
        for layer, orig in zip(self._ivb_layers(), self._ivb_flags()):
            layer.do_not_compile = True if eager else orig

    # -- calls -------------------------------------------------------------------------------
    def ivb_encoder_mode(self, mode: str) -> dict:
        """'eager' or 'compiled' (the engine's own setting) for every later encoder call."""
        if mode not in ("eager", "compiled"):
            raise ValueError(f"mode {mode!r}: eager or compiled")
        self._ivb_set(eager=mode == "eager")
        flags = self._ivb_flags()
        return {"mode": mode, "layers": len(flags), "compilable_layers": flags.count(False)}

    def _ivb_inputs(self, tiles: int, seed: int, image_token_id: int) -> dict:
        """mm_kwargs as vLLM's batching builds them (pixels on the device, counts on the
        CPU); pixel values ~ N(0, 1), the range of normalised image pixels."""
        import torch

        model = self._ivb_model()
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

        model = self._ivb_model()
        flags = self._ivb_flags()
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

        model = self._ivb_model()
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

    # -- for bench-ab ----------------------------------------------------------------------
    def ivb_encoder_profile(self, action: str) -> dict:
        """'start': torch.profiler over everything this worker runs until 'stop', every
        encoder call (`embed_multimodal`) inside a `record_function("ivb_encoder")` range,
        and the other parts of a step in ranges of their own (`RANGES`); 'stop': the
        profile's totals and `breakdown` (the wrappers are removed).

        On CUDA: GPU kernel time (sum of kernel, memcpy and memset durations) in all and in
        the encoder ranges (kernels whose launch lies inside one), so the encoder's share of
        the GPU's work comes from the same trace as the total. On CPU: CPU time of the
        encoder ranges against the profiled wall time. Compose with `ivb_encoder_timer`:
        start this after the timer's 'start' and stop it before the timer's 'read'/'stop'
        (each wraps the method the other sees)."""
        import torch

        model = self._ivb_model()
        if action == "start":
            from torch.profiler import ProfilerActivity, profile, record_function

            if getattr(model, "_ivb_prof", None) is not None:
                raise RuntimeError("a profile is already running")
            cuda = torch.cuda.is_available()
            wrapped = _wrap_ranges(model, self.model_runner, record_function)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            prof = profile(activities=acts)
            prof.__enter__()
            model._ivb_prof = (prof, wrapped, cuda, time.perf_counter())
            return {"started": True, "cuda": cuda,
                    "ranges": [label for _, _, _, label in wrapped]}
        if action != "stop":
            raise ValueError(f"action {action!r}: start or stop")
        state = getattr(model, "_ivb_prof", None)
        if state is None:
            raise RuntimeError("no profile is running")
        prof, wrapped, cuda, t0 = state
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
        prof.__exit__(None, None, None)
        _unwrap(wrapped)
        model._ivb_prof = None
        t1 = time.perf_counter()
        events = prof.events()
        out = summarize_profile(events, cuda, wall_ms, time.perf_counter() - t1)
        out["ranges_wrapped"] = [label for _, _, _, label in wrapped]
        return out

    def ivb_runner_info(self) -> dict:
        """Which model runner serves (vLLM 0.26: the V2 runner `vllm/v1/worker/gpu/` by
        default, the V1 runner with VLLM_USE_V2_MODEL_RUNNER=0) and the encoder's layers."""
        runner = self.model_runner
        cls = type(runner)
        flags = self._ivb_flags()
        return {"class": f"{cls.__module__}.{cls.__qualname__}",
                "model": type(self._ivb_model()).__name__, "encoder_layers": len(flags),
                "compilable_layers": flags.count(False),
                "encoder_cudagraph_manager":
                    getattr(runner, "encoder_cudagraph_manager", None) is not None}


def summarize_profile(events, cuda: bool, wall_ms: float, parse_s: float = 0.0) -> dict:
    """Totals of a torch.profiler trace whose encoder calls are `ivb_encoder` ranges.

    CUDA: every device-side event (kernels, memcpy, memset; the GPU-side spans of
    record_function annotations excluded) is GPU work; the encoder's is what its CPU ranges
    launched (`device_time_total` of a CPU event sums the kernels it and its children
    launched). CPU: the ranges' CPU time against the profiled wall time."""
    from torch.autograd import DeviceType

    enc_ranges = [e for e in events if e.name == "ivb_encoder"
                  and getattr(e, "device_type", None) == DeviceType.CPU]
    out: dict = {"cuda": cuda, "wall_ms": round(wall_ms, 3), "encoder_calls": len(enc_ranges),
                 "parse_s": round(parse_s, 2)}
    if cuda:
        total_us, kernels = 0.0, 0
        for e in events:
            # GPU-side spans of record_function ranges (ours, Inductor's "## Call
            # CompiledFxGraph" ones) cover kernels counted on their own: skip them
            if getattr(e, "device_type", None) != DeviceType.CUDA or e.name in RANGES \
                    or getattr(e, "is_user_annotation", False):
                continue
            us = getattr(e, "device_time_total", None)
            total_us += float((us if us is not None else getattr(e, "cuda_time_total", 0)) or 0)
            kernels += 1
        enc_us = 0.0
        for e in enc_ranges:
            us = getattr(e, "device_time_total", None)
            enc_us += float((us if us is not None else getattr(e, "cuda_time_total", 0)) or 0)
        out.update(gpu_ms=round(total_us / 1e3, 3), gpu_events=kernels,
                   encoder_gpu_ms=round(enc_us / 1e3, 3),
                   encoder_share_of_gpu=round(enc_us / total_us, 4) if total_us else None,
                   gpu_busy_of_wall=round(total_us / 1e3 / wall_ms, 4) if wall_ms else None)
    else:
        enc_ms = sum(float(e.cpu_time_total or 0) for e in enc_ranges) / 1e3
        out.update(encoder_cpu_ms=round(enc_ms, 3),
                   encoder_share_of_wall=round(enc_ms / wall_ms, 4) if wall_ms else None)
    out["breakdown"] = breakdown(events, cuda, wall_ms)
    return out


def step_kind(args: tuple, kw: dict) -> str:
    """The range of one `execute_model(scheduler_output, ...)` call: prefill if any request
    has more than one token scheduled (a prompt, or a chunk of one), decode if every request
    has exactly one, `ivb_step` when nothing is scheduled or the output is not vLLM's."""
    so = args[0] if args else kw.get("scheduler_output")
    counts = getattr(so, "num_scheduled_tokens", None)
    if not isinstance(counts, dict) or not counts:
        return "ivb_step"
    return "ivb_prefill" if any(n > 1 for n in counts.values()) else "ivb_decode"


def _wrap_ranges(model, runner, record_function) -> list[tuple]:
    """Instance attributes that put each part's calls in a record_function range; returns
    [(object, attribute, previous instance attribute or None, range)] for the undo. Parts a
    vLLM version lacks are skipped (their kernels land in the enclosing range). Only
    uncompiled callables are wrapped: the InternViT model and projector around the compiled
    layers, never inside them, so no graph is traced again."""
    wrapped: list[tuple] = []

    def wrap(obj, attr: str, label):
        if obj is None or not callable(getattr(obj, attr, None)):
            return
        previous = vars(obj).get(attr)
        inner = getattr(obj, attr)

        def annotated(*a, **kw):
            with record_function(label if isinstance(label, str) else label(a, kw)):
                return inner(*a, **kw)

        setattr(obj, attr, annotated)  # nn.Module: a plain attribute in the instance dict
        wrapped.append((obj, attr, previous,
                        label if isinstance(label, str) else "ivb_prefill|ivb_decode|ivb_step"))

    wrap(model, "embed_multimodal", "ivb_encoder")
    wrap(getattr(model, "vision_model", None), "forward", "ivb_vit")
    wrap(getattr(model, "mlp1", None), "forward", "ivb_projector")
    wrap(runner, "execute_model", step_kind)
    wrap(runner, "sample_tokens", "ivb_sample")
    return wrapped


def _unwrap(wrapped: list[tuple]) -> None:
    for obj, attr, previous, _ in reversed(wrapped):
        if previous is None:
            delattr(obj, attr)  # the class's method shows through again
        else:
            setattr(obj, attr, previous)


KERNEL_CLASSES = (  # first match wins: attention kernels often carry an arch tag too
    ("attention", ("flash", "fmha", "attn", "attention", "sdpa")),
    ("GEMM", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "splitk")),
    ("copy/memset", ("memcpy", "memset")),
    ("Triton (fused by Inductor)", ("triton",)),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def _innermost_range(event) -> str:
    p = getattr(event, "cpu_parent", None)
    while p is not None:
        if p.name in RANGES:
            return p.name
        p = getattr(p, "cpu_parent", None)
    return OUTSIDE


def gaps(intervals: list[tuple[float, float]], wall_ms: float) -> dict:
    """GPU busy and idle from kernel intervals (µs, any streams): their union is busy; the
    holes between consecutive busy stretches are the idle gaps, counted by size."""
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    busy_us = sum(b - a for a, b in merged)
    holes = [(merged[i + 1][0] - merged[i][1]) / 1e3 for i in range(len(merged) - 1)]
    big = [h for h in holes if h >= 1.0]
    return {"busy_ms": round(busy_us / 1e3, 3),
            "busy_of_wall": round(busy_us / 1e3 / wall_ms, 4) if wall_ms else None,
            "span_ms": round((merged[-1][1] - merged[0][0]) / 1e3, 3) if merged else 0.0,
            "gaps_over_0_1ms": sum(h >= 0.1 for h in holes), "gaps_over_1ms": len(big),
            "gap_ms_over_1ms": round(sum(big), 3),
            "largest_gap_ms": round(max(holes), 3) if holes else 0.0}


def breakdown(events, cuda: bool, wall_ms: float) -> dict:
    """GPU time by part (innermost range at each kernel's launch) and kernel class, and the
    idle gaps; on CPU, each range's calls and CPU time (inclusive of ranges inside it).

    A CPU event's `kernels` are the device kernels correlated with its launch; its
    `cpu_parent` chain leads to the ranges around it."""
    from torch.autograd import DeviceType

    calls: dict[str, int] = {}
    cpu_ms: dict[str, float] = {}
    parts: dict[str, dict] = {}
    for e in events:
        if getattr(e, "device_type", None) != DeviceType.CPU:
            continue
        if e.name in RANGES:
            calls[e.name] = calls.get(e.name, 0) + 1
            cpu_ms[e.name] = cpu_ms.get(e.name, 0.0) + float(e.cpu_time_total or 0) / 1e3
        # a range's own kernels: launched with no op in between (a CUDA graph's replay)
        here = e.name if e.name in RANGES else None
        for k in getattr(e, "kernels", None) or ():
            part = parts.setdefault(here or _innermost_range(e), {"gpu_ms": 0.0, "kernels": 0,
                                                                 "classes": {}})
            ms = float(k.duration) / 1e3
            part["gpu_ms"] += ms
            part["kernels"] += 1
            cls = kernel_class(k.name)
            part["classes"][cls] = part["classes"].get(cls, 0.0) + ms
    out: dict = {"calls": calls, "cpu_ms": {k: round(v, 3) for k, v in cpu_ms.items()}}
    if not cuda:
        return out
    total = sum(p["gpu_ms"] for p in parts.values())
    for p in parts.values():
        p["share"] = round(p["gpu_ms"] / total, 4) if total else None
        p["gpu_ms"] = round(p["gpu_ms"], 3)
        p["classes"] = {c: round(v, 3) for c, v in sorted(p["classes"].items(),
                                                          key=lambda cv: -cv[1])}
    out["parts"] = dict(sorted(parts.items(), key=lambda kv: -kv[1]["gpu_ms"]))
    out["attributed_gpu_ms"] = round(total, 3)
    spans = [(e.time_range.start, e.time_range.end) for e in events
             if getattr(e, "device_type", None) == DeviceType.CUDA
             and not getattr(e, "is_user_annotation", False) and e.name not in RANGES
             and getattr(e, "time_range", None) is not None]
    out["idle"] = gaps(spans, wall_ms)
    return out


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
