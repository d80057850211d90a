"""bench-ab's code in vLLM's worker: a torch.profiler trace of a stretch of serving, each
part of an engine step in a range of its own, summarised there into GPU time by part and
kernel class and the GPU's idle gaps; and which model runner serves.

The library's worker extension (`internvl_batch/hooks.py`) runs these by name:
`llm.collective_rpc("ivb_call", args=(PROFILE, "start"))` imports this module in the worker
and calls `profile(worker, "start")`. So the profile lives with the benchmark that reads it,
and the library neither imports nor carries it. The trace is summarised where it was taken:
its events stay in the worker, only the totals come back.

Only the standard library and the library's `hooks` are imported at module level (the
worker imports this module when the first call names it).
"""
from __future__ import annotations

import time

from ..hooks import compile_flags, serving_model

PROFILE = f"{__name__}:profile"
RUNNER_INFO = f"{__name__}:runner_info"

# The parts of an engine step that `profile` puts in record_function ranges, by range name:
# where each GPU kernel's launch lies (innermost range) names its part, so the report can give
# GPU time by part (InternViT, projector, LM prefill, decode, sampler) and the gaps.
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


def profile(worker, action: str) -> dict:
    """'start': torch.profiler over everything this worker runs until 'stop', every
    encoder call (`embed_multimodal`) inside a `record_function("ivb_encoder")` range,
    and the other parts of a step in ranges of their own (`RANGES`); 'stop': the
    profile's totals and `breakdown` (the wrappers are removed).

    On CUDA: GPU kernel time (sum of kernel, memcpy and memset durations) in all and in
    the encoder ranges (kernels whose launch lies inside one), so the encoder's share of
    the GPU's work comes from the same trace as the total. On CPU: CPU time of the
    encoder ranges against the profiled wall time. Compose with the library's
    `ivb_encoder_timer`: start this after the timer's 'start' and stop it before the timer's
    'read'/'stop' (each wraps the method the other sees)."""
    if action == "start":
        return _start(worker)
    if action != "stop":
        raise ValueError(f"action {action!r}: start or stop")
    return _stop(worker)


def _start(worker) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    model = serving_model(worker)
    if getattr(model, "_ivb_prof", None) is not None:
        raise RuntimeError("a profile is already running")
    cuda = torch.cuda.is_available()
    wrapped = wrap_ranges(model, worker.model_runner, record_function)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = torch_profile(activities=acts)
    prof.__enter__()
    model._ivb_prof = (prof, wrapped, cuda, time.perf_counter())
    return {"started": True, "cuda": cuda,
            "ranges": [label for _, _, _, label in wrapped]}


def _stop(worker) -> dict:
    import torch

    model = serving_model(worker)
    state = getattr(model, "_ivb_prof", None)
    if state is None:
        raise RuntimeError("no profile is running")
    prof, wrapped, cuda, t0 = state
    if cuda:
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    prof.__exit__(None, None, None)
    unwrap(wrapped)
    model._ivb_prof = None
    t1 = time.perf_counter()
    events = prof.events()
    out = summarize_profile(events, cuda, wall_ms, time.perf_counter() - t1)
    out["ranges_wrapped"] = [label for _, _, _, label in wrapped]
    return out


def runner_info(worker) -> dict:
    """Which model runner serves (vLLM 0.26: the V2 runner `vllm/v1/worker/gpu/` by
    default, the V1 runner with VLLM_USE_V2_MODEL_RUNNER=0) and the encoder's layers."""
    runner = worker.model_runner
    cls = type(runner)
    flags = compile_flags(worker)
    return {"class": f"{cls.__module__}.{cls.__qualname__}",
            "model": type(serving_model(worker)).__name__, "encoder_layers": len(flags),
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


def wrap_ranges(model, runner, record_function) -> list[tuple]:
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


def unwrap(wrapped: list[tuple]) -> None:
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
