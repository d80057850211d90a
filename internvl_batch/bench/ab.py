"""Compiled vs eager encoder end to end, where the GPU is the bound:
`internvl-batch bench-ab`.

`bench` compares two engines in two processes fed by `LLM.generate`, whose per-request host
work (preprocessing in the calling process) keeps the GPU idle much of the time at one tile;
there no encoder speed-up can show. This benchmark removes both blurs:

* **One engine, both encoders.** One vLLM engine, started in this process through the compile
  cache like every engine of this package, with `compile_mm_encoder` on (on CPU it cannot be:
  vLLM's compiled InternVL encoder fails there, so the engine is eager and both "modes" run
  the same code; the report says so). `collective_rpc("ivb_encoder_mode", ...)` (the
  library's worker extension, `internvl_batch/hooks.py`) switches its InternViT layers
  between the compiled graph and the plain forward between rounds: same weights, same KV
  cache, same scheduler.
* **Engine core in this process** (`--engine-core inline`, the default;
  `VLLM_ENABLE_V1_MULTIPROCESSING=0`). In vLLM's default layout the core runs in a process of
  its own, so inside the clock every request's pixels are serialized to it, deserialized
  by a thread that shares the core's interpreter lock with its loop, while three processes
  compete for the host's cores. In an A/A test (both modes the same code, CPU, 2 cores,
  docs/performance.md, 9 runs each) that layout's per-round ratio had a median SD
  of 34 %, the inline core's 5.6 % (3.9 % with garbage collection off inside the clock,
  `feed`); `--engine-core process` keeps vLLM's layout.
* **GPU-bound feed.** Every request of a round is turned into vLLM's `EngineCoreRequest`
  *before* the clock, by the engine's own renderer and input processor (what
  `LLM.generate` does per prompt: tokenise, run the multimodal processor, pixels to
  tensors). Inside the clock the requests are only handed over (`LLMEngine.add_request`)
  and the engine stepped until all are finished. This is the "one engine fed requests
  processed beforehand" configuration.
* **Same images for both modes of a round, never an encoder-cache hit.** vLLM identifies an
  image by its hash (its pixels) and reuses encoder outputs and processor results of an
  identical item. Every request carries its own `multi_modal_uuids` entry (round, mode,
  index), so the two modes of a round see identical pixels and tile layouts (their
  per-round ratio is paired) while vLLM treats every image as new. The processor cache is off
  by default (`--mm-cache-gb 0`): nothing could hit it, and it would hold every round's
  pixels in both processes.
* **Interleaved, alternating rounds.** Warm-up round(s) in each mode, then `repeats` rounds
  of the pair, the order alternating (eager-compiled, compiled-eager, ...), so drift lands
  on both alike. Each round uses its own images. That makes the rounds an AB/BA crossover,
  and the analysis gives its estimate beside the median (`encoder.crossover`): where the
  mode run second in a round is faster whichever it is (+2.7 % in the H200's COCO rounds),
  the per-round ratios swing with the order, and the crossover estimate takes that out.
* **Measured inside the engine.** `ivb_encoder_timer` puts CUDA events around every encoder
  call of a round: the encoder's GPU milliseconds and tiles. With the round's wall time that
  is the encoder's share; GPU busy % comes from `nvidia-smi` sampled every 100 ms. Optional
  profiled rounds (`bench/profiling.py`, torch.profiler in the worker) give the encoder's
  share of all GPU kernel time, and the step's GPU time by part (InternViT, projector,
  prefill and decode steps, sampling) and kernel class with the GPU's idle gaps: the
  breakdown of the engine's own time. From the share and the in-engine encoder gain, Amdahl's law
  predicts the end-to-end gain (`common.predicted_speedup`), reported beside the measured one.
* **Checked.** Greedy token ids of every image are compared between the modes of its round.
  With dummy weights (`load_format=dummy`, flat logits) agreement proves little: use a
  `+weights` preset for a meaningful check.
"""
from __future__ import annotations

import inspect
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

from ..config import ConfigError, DEFAULT_PROMPT, EngineSpec
from . import GpuBusy, dataset, profiling
from .common import (Recorder, crossover, error_line, footer_markdown, git_sha, median_ci,
                     paired_speedup, predicted_speedup)

MODES = ("eager", "compiled")
SIZES = ("448", "coco")
# where the engine core runs: vLLM's default separate process (the requests' pixels are
# serialized to it inside the clock), or this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as
# bench-encoder): add_request then hands the request object over and nothing else competes
# with the core's loop for the host's cores
ENGINE_CORES = ("process", "inline")
# images per round: a round of a few seconds on an H100 (~300-380 images/s at one tile, ~40
# at COCO sizes, docs/performance.md), long enough that start and tail are small
DEFAULT_IMAGES = {"448": 1024, "coco": 192}
TARGET_HALF_WIDTH = 0.02  # the precision asked of the answer: a 95 % interval within +-2 %


# -- options --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ABOptions:
    model: str = "preset:internvl3-1b"
    sizes: str = "448"
    images: int | None = None  # per round; None: DEFAULT_IMAGES[sizes]
    repeats: int = 7
    warmup_rounds: int = 1
    max_tokens: int = 32
    max_dynamic_patch: int | None = None  # None: 1 for 448, the checkpoint's for coco
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int = 8192
    mm_cache_gb: float = 0.0
    kv_cache_gb: float | None = None
    gpu_memory_utilization: float | None = None
    profile_images: int = 256  # images of one profiled round per mode (0: none)
    same_images: bool = False  # every warm-up and timed round on one processed slice
    engine_core: str = "inline"  # ENGINE_CORES
    gc_off: bool = True  # no garbage collection inside the clock (see `feed`)
    seed: int = 0
    reuse_compile_cache: bool = False
    cache_dir: str = ""
    work_dir: str = ""
    results_dir: str = "results"
    name: str = ""
    command: str = ""

    def __post_init__(self):
        if self.sizes not in SIZES:
            raise ConfigError(f"--sizes {self.sizes}: choose from {', '.join(SIZES)}")
        if self.engine_core not in ENGINE_CORES:
            raise ConfigError(f"--engine-core {self.engine_core}: choose from "
                              f"{', '.join(ENGINE_CORES)}")
        if self.images is not None and self.images < 1:
            raise ConfigError("--images must be >= 1")
        if self.repeats < 1:
            raise ConfigError("--repeats must be >= 1")
        if self.warmup_rounds < 0:
            raise ConfigError("--warmup-rounds must be >= 0")
        if self.max_tokens < 1:
            raise ConfigError("--max-tokens must be >= 1")
        if self.profile_images < 0:
            raise ConfigError("--profile-images must be >= 0")
        self.engine_spec(cuda=True)  # the engine options' own checks (ranges, the model dir)

    @property
    def images_per_round(self) -> int:
        return self.images or DEFAULT_IMAGES[self.sizes]

    @property
    def dynamic_patch(self) -> int | None:
        """448 px images are one tile: max_dynamic_patch 1 (the one-tile workload)."""
        if self.max_dynamic_patch is not None:
            return self.max_dynamic_patch
        return 1 if self.sizes == "448" else None

    def engine_spec(self, cuda: bool) -> EngineSpec:
        """The engine of the benchmark: its engine options as given, the encoder compiled on
        CUDA (the mode a round runs is switched in that engine), a fixed KV cache on GPU."""
        return EngineSpec.from_options(asdict(self), compile=cuda,
                                       max_dynamic_patch=self.dynamic_patch,
                                       kv_cache_gb=self.kv_cache_gb if cuda else None)


def default_name(opts: ABOptions) -> str:
    base = opts.model.split(":")[-1].rstrip("/").split("/")[-1].replace("+", "-")
    return f"ab-{base}-{opts.sizes}"


# -- the plan (pure) ------------------------------------------------------------------------

def schedule(warmup_rounds: int, repeats: int, profile: bool,
             same_images: bool = False) -> list[dict]:
    """Every round in run order: {label, kind, slice, order (modes)}.

    Warm-up rounds first (eager then compiled, alternating too), then the timed pairs with
    the order alternating (E C, C E, ...), then one profiled pair. Each round has its own
    image slice; both modes of a round use the same one. `same_images`: every warm-up and
    timed round uses slice 0 (the profiled round keeps its own, of its own size)."""
    rounds, s = [], 0
    step = 0 if same_images else 1
    for w in range(warmup_rounds):
        rounds.append({"label": f"w{w}", "kind": "warmup", "slice": s,
                       "order": list(MODES if w % 2 == 0 else MODES[::-1])})
        s += step
    for k in range(repeats):
        rounds.append({"label": str(k), "kind": "timed", "slice": s,
                       "order": list(MODES if k % 2 == 0 else MODES[::-1])})
        s += step
    if same_images and rounds:
        s += 1
    if profile:
        rounds.append({"label": "p", "kind": "profile", "slice": s, "order": list(MODES)})
    return rounds


def request_id(label: str, mode: str, i: int) -> str:
    """Unique per (round, mode, image): also the image's `multi_modal_uuids` entry, so no
    two requests ever share an encoder-cache or processor-cache item."""
    return f"ab{label}-{mode}-{i}"


def index_of(rid: str) -> int:
    return int(rid.rsplit("-", 1)[1])


# -- statistics (pure) ----------------------------------------------------------------------

def round_stats(seconds: float, outputs: list[dict], encoder: dict | None,
                tokens_per_tile: int, busy_pct: float | None) -> dict:
    """One (round, mode): rates from what vLLM returned, the encoder's time and share.

    `outputs`: per request {output_tokens, prompt_tokens, image_tokens, error}.
    `encoder`: `ivb_encoder_timer` totals ({calls, tiles, gpu_ms}) for the round."""
    ok = [o for o in outputs if not o.get("error")]
    out_toks = sum(o["output_tokens"] for o in ok)
    img_toks = sum(o["image_tokens"] for o in ok)
    row = {"seconds": seconds, "images": len(ok), "errors": len(outputs) - len(ok),
           "images_per_s": len(ok) / seconds if seconds > 0 else None,
           "output_tokens": out_toks,
           "output_tokens_per_s": out_toks / seconds if seconds > 0 else None,
           "prompt_tokens": sum(o["prompt_tokens"] for o in ok), "image_tokens": img_toks,
           "tiles": img_toks / tokens_per_tile if tokens_per_tile else None,
           "gpu_busy_pct": busy_pct}
    if encoder:
        ms, tiles = float(encoder.get("gpu_ms") or 0), int(encoder.get("tiles") or 0)
        wall_ms = seconds * 1e3
        row["encoder"] = {"calls": int(encoder.get("calls") or 0), "tiles": tiles,
                          "ms": ms, "ms_per_tile": ms / tiles if tiles else None,
                          "tiles_per_call": tiles / encoder["calls"] if encoder.get("calls")
                          else None,
                          "share_of_wall": ms / wall_ms if wall_ms > 0 else None,
                          "share_of_busy": ms / (wall_ms * busy_pct / 100)
                          if busy_pct and wall_ms > 0 else None}
    return row


def token_agreement(a: list[list[int] | None], b: list[list[int] | None]) -> dict:
    """Greedy token ids of the same images under two modes: identical sequences, identical
    first tokens, and the mean share of the sequence before the first difference."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return {"compared": 0, "identical": 0, "identical_pct": None,
                "first_token_pct": None, "mean_common_prefix_pct": None}

    def prefix(x, y):
        n = 0
        for p, q in zip(x, y):
            if p != q:
                break
            n += 1
        return n / max(len(x), len(y), 1)

    same = sum(x == y for x, y in pairs)
    first = sum(bool(x) and bool(y) and x[0] == y[0] for x, y in pairs)
    return {"compared": len(pairs), "identical": same,
            "identical_pct": round(100 * same / len(pairs), 2),
            "first_token_pct": round(100 * first / len(pairs), 2),
            "mean_common_prefix_pct": round(100 * statistics.fmean(
                prefix(x, y) for x, y in pairs), 2)}


def merge_agreement(parts: list[dict]) -> dict:
    """Several rounds' `token_agreement` results as one."""
    n = sum(p["compared"] for p in parts)
    if not n:
        return token_agreement([], [])
    same = sum(p["identical"] for p in parts)
    w = lambda k: sum(p[k] * p["compared"] for p in parts if p[k] is not None) / n  # noqa: E731
    return {"compared": n, "identical": same, "identical_pct": round(100 * same / n, 2),
            "first_token_pct": round(w("first_token_pct"), 2),
            "mean_common_prefix_pct": round(w("mean_common_prefix_pct"), 2)}


def _get(row: dict, path: str):
    cur = row
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def analyse(rounds: list[dict], profile: dict | None = None) -> dict:
    """The paired comparison over the timed rounds.

    `rounds`: [{label, kind, order, modes: {eager: round_stats, compiled: round_stats}}].
    Ratios are taken per round (same images in both modes), then summarised twice: as median
    with an order-statistics 95 % interval (`median_ci`), and as the crossover estimate with
    the order effect taken out and a t interval (`crossover`, under `crossover`)."""
    timed = [r for r in rounds if r["kind"] == "timed"
             and all(m in r.get("modes", {}) and not r["modes"][m].get("error")
                     for m in MODES)]
    per_mode: dict = {}
    for m in MODES:
        rows = [r["modes"][m] for r in timed]
        per_mode[m] = {k: median_ci([v for v in (_get(x, path) for x in rows) if v is not None])
                       for k, path in (("images_per_s", "images_per_s"),
                                       ("output_tokens_per_s", "output_tokens_per_s"),
                                       ("seconds", "seconds"), ("gpu_busy_pct", "gpu_busy_pct"),
                                       ("encoder_ms", "encoder.ms"),
                                       ("encoder_ms_per_tile", "encoder.ms_per_tile"),
                                       ("encoder_tiles_per_call", "encoder.tiles_per_call"),
                                       ("encoder_share_of_wall", "encoder.share_of_wall"),
                                       ("encoder_share_of_busy", "encoder.share_of_busy"))}
        tiles = [x["tiles"] / x["images"] for x in rows if x.get("tiles") and x.get("images")]
        per_mode[m]["tiles_per_image"] = statistics.fmean(tiles) if tiles else None

    def paired(path: str, num: str, den: str) -> dict:
        pairs = [(_get(r["modes"][num], path), _get(r["modes"][den], path)) for r in timed]
        pairs = [(a, b) for a, b in pairs if a and b]
        return paired_speedup([a for a, _ in pairs], [b for _, b in pairs])

    def balanced(path: str, num: str, den: str) -> dict:
        rows = [(_get(r["modes"][num], path), _get(r["modes"][den], path),
                 list(r.get("order") or MODES)[-1] == num) for r in timed]
        rows = [(a / b, second) for a, b, second in rows if a and b]
        return crossover([x for x, _ in rows], [s for _, s in rows])

    # compiled/eager rates (> 1: compiled faster); encoder gain eager/compiled ms per tile
    e2e = {"images_per_s": paired("images_per_s", "compiled", "eager"),
           "output_tokens_per_s": paired("output_tokens_per_s", "compiled", "eager")}
    gain = paired("encoder.ms_per_tile", "eager", "compiled")
    for st in (*e2e.values(), gain):
        st["half_width_pct"] = half_width_pct(st)
    share = per_mode["eager"]["encoder_share_of_wall"]
    share_busy = per_mode["eager"]["encoder_share_of_busy"]
    out = {"rounds_timed": len(timed), "modes": per_mode, "end_to_end": e2e,
           "encoder_gain": gain, "prediction": predict(share, share_busy, gain, profile),
           "crossover": {"images_per_s": balanced("images_per_s", "compiled", "eager"),
                         "output_tokens_per_s": balanced("output_tokens_per_s", "compiled",
                                                         "eager"),
                         "encoder_gain": balanced("encoder.ms_per_tile", "eager", "compiled")}}
    meas = e2e["images_per_s"]
    out["prediction"]["measured"] = meas.get("median")
    out["prediction"]["measured_interval"] = [meas.get("lo"), meas.get("hi")]
    # the target needs a real 95 % interval: below 6 rounds [min, max] covers less
    out["interval_within_target"] = (meas.get("half_width_pct") is not None and
                                     (meas.get("coverage") or 0) >= 0.95 and
                                     meas["half_width_pct"] <= TARGET_HALF_WIDTH * 100)
    xo = out["crossover"]["images_per_s"]
    out["crossover_within_target"] = (xo.get("half_width_pct") is not None and
                                      xo["half_width_pct"] <= TARGET_HALF_WIDTH * 100)
    return out


def half_width_pct(st: dict) -> float | None:
    """Half the 95 % interval's width, in % of the median."""
    if not st or st.get("median") in (None, 0) or st.get("lo") is None:
        return None
    return round(100 * (st["hi"] - st["lo"]) / 2 / st["median"], 3)


def predict(share: dict, share_busy: dict, gain: dict, profile: dict | None) -> dict:
    """Amdahl: the end-to-end gain a faster encoder buys, from the eager rounds' encoder share
    (of the wall time: every encoder millisecond is on the critical path when the GPU is the
    bound) and the measured in-engine encoder gain; the gain's interval gives a range."""
    out: dict = {"share_source": "eager rounds: encoder GPU ms (CUDA events) / round wall ms",
                 "share": share.get("median"), "gain": gain.get("median")}
    s, g = share.get("median"), gain.get("median")
    if s is not None and g:
        out["predicted"] = predicted_speedup(s, g)
        lo, hi = gain.get("lo"), gain.get("hi")
        out["predicted_interval"] = [predicted_speedup(s, lo) if lo else None,
                                     predicted_speedup(s, hi) if hi else None]
    else:
        out["predicted"] = None
        out["predicted_interval"] = [None, None]
    sb = share_busy.get("median") if share_busy else None
    out["share_of_busy"] = sb
    out["predicted_from_busy_share"] = predicted_speedup(min(sb, 1.0), g) \
        if sb is not None and g else None
    ps = ((profile or {}).get("eager") or {}).get("encoder_share_of_gpu")
    out["share_of_gpu_kernels"] = ps
    out["predicted_from_kernel_share"] = predicted_speedup(ps, g) if ps is not None and g \
        else None
    return out


# -- vLLM's request path (the one place that knows its names) ---------------------------------

def engine_request(llm, rid: str, prompt: dict, params):
    """`prompt` processed into the `EngineCoreRequest` that `LLMEngine.add_request` accepts,
    by the engine's own code: what `LLM.generate` does per prompt before handing it over.

    vLLM 0.26 and 0.32 (and 0.1x): the renderer step is `LLM._preprocess_cmpl_one`
    (`entrypoints/offline_utils.py` in 0.26, `entrypoints/common/offline.py` in 0.32), the
    processor `LLMEngine.input_processor` (earlier `processor`), whose `process_inputs` takes
    `supported_tasks` from 0.11 on. Without the renderer step a raw prompt still works: the
    input processor then preprocesses it itself (a deprecated path, same result)."""
    engine = llm.llm_engine
    proc = getattr(engine, "input_processor", None) or getattr(engine, "processor")
    render = getattr(llm, "_preprocess_cmpl_one", None)
    item = render(prompt) if render is not None else prompt
    kw = {}
    if "supported_tasks" in inspect.signature(proc.process_inputs).parameters:
        kw["supported_tasks"] = engine.get_supported_tasks()
    return proc.process_inputs(rid, item, params, **kw)


def ab_sampling_params(max_tokens: int):
    """Greedy, exactly `max_tokens` tokens (ignore_eos), final outputs only (what
    `LLM.generate` sets, so `step()` returns each request once, finished)."""
    from vllm.sampling_params import RequestOutputKind

    from ..config import SamplingSpec
    from ..prompts import sampling_params

    params = sampling_params(SamplingSpec(max_tokens=max_tokens, temperature=0.0,
                                          ignore_eos=True))
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


def feed(llm, requests: list, params, gc_off: bool = False
         ) -> tuple[float, float, float, dict]:
    """The clock: hand the processed requests over, step until all are done.
    Returns (seconds, wall start, wall end as time.time() for nvidia-smi's samples,
    {request id: RequestOutput}).

    `gc_off`: collect before the clock, then no collection inside it. A round allocates
    objects per request and per step; a generation-2 collection then walks every live object
    (the engine's, the round's requests) at whatever moment the thresholds say, a pause of
    varying length landing in one mode's round and not the other's. With the engine core
    inline this covers the core's loop too."""
    import gc

    engine = llm.llm_engine
    if engine.has_unfinished_requests():
        raise RuntimeError("the engine has unfinished requests before the round")
    done: dict = {}
    was_enabled = gc.isenabled()
    if gc_off:
        gc.collect()
        gc.disable()
    try:
        w0 = time.time()
        t0 = time.perf_counter()
        for r in requests:
            engine.add_request(r.request_id, r, params)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = o
        seconds = time.perf_counter() - t0
    finally:
        if gc_off and was_enabled:
            gc.enable()
    return seconds, w0, time.time(), done


def rpc(llm, method: str, *args):
    """One call of our worker extension (hooks.EncoderControl); the first worker's answer.
    The wing's own worker-side functions go through its `ivb_call`: `rpc(llm, "ivb_call",
    profiling.PROFILE, "start")`."""
    return llm.collective_rpc(method, args=tuple(args))[0]


# -- the run --------------------------------------------------------------------------------

class Round:
    """Images of one slice, decoded once and processed once; requests per (round, mode) with
    fresh ids and uuids. `keep`: the slice serves every round (`--same-images`), so its
    processed requests are kept as the template of every later copy."""

    def __init__(self, paths: list[str], keep: bool = False):
        from ..images import load_rgb

        self.paths = paths
        self.keep = keep
        self.images = [load_rgb(p) for p in paths]
        self._unchanged: list | None = None  # processed, never fed: the copies' template
        self.copied = False  # whether the last `requests` were copies

    def requests(self, llm, label: str, mode: str, prompt_text: str, params) -> list:
        """Round `label`'s requests for `mode`. The first asked processes the images; later
        ones get copies of those under their own ids and encoder-cache identities
        (`clone_request`): the second mode of a round, and with `keep` every later round.
        That halves the untimed processing of a pair (on the H200 at COCO sizes 12.7-17.5 s
        per mode against 4.3-5.1 s timed), and with `keep` leaves one processing per run.
        Where a copy cannot be made, it processes them again."""
        from .. import prompts

        first = self._unchanged
        if not self.keep:
            self._unchanged = None  # each list is fed (and changed) once
        if first is not None:
            try:
                reqs = [clone_request(r, request_id(label, mode, i))
                        for i, r in enumerate(first)]
                self.copied = True
                return reqs
            except CloneError:
                self._unchanged = None
        self.copied = False
        reqs = []
        for i, im in enumerate(self.images):
            rid = request_id(label, mode, i)
            p = prompts.request(prompt_text, im)
            p["multi_modal_uuids"] = {"image": [rid]}
            reqs.append(engine_request(llm, rid, p, params))
        self._unchanged = [clone_request(r, r.request_id, check=False) for r in reqs]
        return reqs


class CloneError(Exception):
    """A processed request that cannot be copied under another id (vLLM changed)."""


def clone_request(req, rid: str, check: bool = True):
    """`req`, processed but not yet added, as the request `rid` would be: the same prompt
    tokens and pixel tensors (shared, read-only), its own id, sampling parameters and
    encoder-cache identity (the uuid `Round.requests` gives each image is its request id,
    and vLLM's identifier and mm_hash are built from it), so the encoder runs for it again.
    `check=False`: an unchanged copy (kept before vLLM's add_request rewrites the id)."""
    import dataclasses

    import msgspec

    old = req.request_id
    feats = []
    for f in req.mm_features or ():
        ident = f.identifier.replace(old, rid)
        if check and ident == f.identifier:
            raise CloneError(f"identifier {f.identifier!r} does not hold the request id")
        feats.append(dataclasses.replace(
            f, identifier=ident, mm_hash=f.mm_hash.replace(old, rid) if f.mm_hash else f.mm_hash))
    sp = req.sampling_params
    return msgspec.structs.replace(req, request_id=rid, mm_features=feats or req.mm_features,
                                   sampling_params=sp.clone() if sp is not None else None)


def run(opts: ABOptions, log=print) -> dict:
    """Start the engine, run the rounds, return the result document (also on disk)."""
    from ..cache import CompileCache
    from ..config import default_cache_dir
    from ..engine import has_cuda, llm_kwargs

    cuda = has_cuda()
    cache_root = Path(opts.cache_dir or default_cache_dir())
    spec = CompileCache(cache_root).resolve(opts.engine_spec(cuda))
    kw = llm_kwargs(spec, cuda=cuda)  # user errors before anything heavy
    t_start = time.perf_counter()

    def say(msg: str):
        log(f"[{time.perf_counter() - t_start:7.1f} s] {msg}")

    plan = schedule(opts.warmup_rounds, opts.repeats, opts.profile_images > 0,
                    same_images=opts.same_images)
    images_dir, files, bounds = _images(opts, plan, cache_root, say)
    doc = _new_document(opts, spec, kw, cuda, images_dir, plan)
    rec = Recorder(doc, Path(opts.results_dir))
    rec.save()

    # a fresh compile cache unless asked: nothing is loaded from, or written into, the
    # project's cache (as bench-encoder)
    tmp = None if opts.reuse_compile_cache else Path(tempfile.mkdtemp(prefix="ivb-ab-"))
    held = SimpleNamespace(engine=None, busy=None)  # what the cleanup below closes
    if opts.engine_core == "inline":
        # read by vLLM when the engine starts; this process runs one benchmark and exits
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        _serve(opts, spec, tmp or cache_root, plan, files, images_dir, bounds, rec, say, held)
    except Exception as e:  # keep what was measured; the caller exits non-zero
        stop = _stop_in(e)
        rec.error("run", stop or e)
        if stop is not None:  # the caller's time limit: keep the rounds measured so far
            say(f"STOPPED: {stop}")
        else:
            say(f"FAILED: {error_line(e)}")
            import traceback

            traceback.print_exc()
    finally:
        doc["total_s"] = round(time.perf_counter() - t_start, 1)
        rec.save()
        if held.busy is not None:
            held.busy.stop()
        if held.engine is not None:
            held.engine.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return doc


def _images(opts: ABOptions, plan: list[dict], cache_root: Path, say
            ) -> tuple[Path, list[str], dict]:
    """The generated images every round draws from: their folder, file names, and each
    slice's [start, end) in that list (the profiled round's slice has its own size)."""
    n = opts.images_per_round
    work_dir = Path(opts.work_dir) if opts.work_dir else cache_root / "bench-data"
    sizes = {r["slice"]: (opts.profile_images if r["kind"] == "profile" else n) for r in plan}
    total = sum(sizes.values())
    t0 = time.perf_counter()
    images_dir, ann = dataset(work_dir, opts.sizes, total, seed=opts.seed)
    files = [im["file_name"] for im in json.loads(ann.read_text())["images"]]
    bounds, at = {}, 0
    for s in sorted(sizes):
        bounds[s] = (at, at + sizes[s])
        at += sizes[s]
    say(f"dataset: {total} images ({opts.sizes}) under {images_dir.parent} "
        f"({time.perf_counter() - t0:.1f} s)")
    return images_dir, files, bounds


def _new_document(opts: ABOptions, spec: EngineSpec, kw: dict, cuda: bool, images_dir: Path,
                 plan: list[dict]) -> dict:
    """The result document before the engine starts: options, configuration, model, device,
    the schedule, and notes on what a CPU run or dummy weights can show."""
    from .. import checkpoint
    from ..engine import device_name

    doc: dict = {
        "kind": "ab-bench", "name": opts.name or default_name(opts), "complete": False,
        "command": opts.command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": asdict(opts),
        "config": {"images_per_round": opts.images_per_round,
                   "max_dynamic_patch": opts.dynamic_patch,
                   "prompt": DEFAULT_PROMPT, "ignore_eos": True, "sizes": opts.sizes,
                   "dataset": str(images_dir.parent),
                   "feed": "EngineCoreRequests processed before the clock (renderer + input "
                           "processor), then LLMEngine.add_request + step() inside it",
                   "image_identity": "multi_modal_uuids per (round, mode, image): same pixels "
                                     "in both modes of a round, never a cache hit",
                   "same_images": opts.same_images,
                   "engine_core": opts.engine_core, "gc_off_in_clock": opts.gc_off},
        "model": {"spec": opts.model, "path": spec.model,
                  "synthesized": checkpoint.is_synthesized(spec.model),
                  "load_format": kw.get("load_format")},
        "engine": {"llm_kwargs": {k: v for k, v in kw.items() if k != "model"}},
        "device": {"name": device_name(), "cuda": cuda},
        "versions": {"git": git_sha(), "python": platform.python_version()},
        "schedule": plan, "rounds": [], "errors": [], "notes": [],
    }
    if not cuda:
        doc["notes"].append(
            "CPU: the engine cannot compile the encoder (vLLM's compiled InternVL encoder "
            "fails on CPU), so `eager` and `compiled` run the same code; the A/B checks the "
            "harness, not the compiled encoder.")
    if doc["model"]["load_format"] == "dummy":
        doc["notes"].append(
            "load_format=dummy: weights U(+-0.001), logits nearly flat; token agreement says "
            "little (use a +weights preset).")
    return doc


def _serve(opts: ABOptions, spec: EngineSpec, cc_root: Path, plan: list[dict],
           files: list[str], images_dir: Path, bounds: dict, rec: Recorder, say,
           held: SimpleNamespace) -> None:
    """Start the engine (through the compile cache under `cc_root`), describe its encoder,
    run every round, analyse. The engine and the GPU sampler go into `held` as they start,
    for the caller to close whatever happens here."""
    from ..cache import CompileCache

    doc = rec.doc
    say(f"starting the engine: {opts.model} ({spec.model}), compile_mm_encoder "
        f"{bool(spec.compile)}, compile cache "
        f"{'reused: ' + str(cc_root) if opts.reuse_compile_cache else 'fresh'}")
    t0 = time.perf_counter()
    # verify=False: no second, eager engine for the cache's probe; the encoder check
    # below and the caption agreement are this benchmark's own
    engine, entry = CompileCache(cc_root).start_engine(spec, log=say, verify=False)
    held.engine = engine
    doc["engine"].update(init_s=round(time.perf_counter() - t0, 2),
                         timings=engine.timings.as_dict(), cache_hit=entry.hit,
                         cache_key=entry.key, tokens_per_tile=engine.tokens_per_tile)
    info = engine.info()
    doc["versions"].update(vllm=info["vllm"], torch=info["torch"])
    doc["device"]["name"] = info["device"]
    say(f"engine ready in {doc['engine']['init_s']} s")
    llm = engine.llm
    # what vLLM made of the layout: InprocClient (inline) or SyncMPClient (process), and
    # whether its scheduler overlaps the next step's scheduling with the GPU's work
    doc["engine"]["core_client"] = type(getattr(llm.llm_engine, "engine_core", None)).__name__
    sched = getattr(getattr(llm.llm_engine, "vllm_config", None), "scheduler_config", None)
    doc["engine"]["async_scheduling"] = getattr(sched, "async_scheduling", None)
    _describe(llm, engine, doc, rec, say)
    if doc["device"]["cuda"]:
        held.busy = GpuBusy().start()
    _rounds(llm, engine, opts, plan, files, images_dir, bounds, rec, say, held.busy)
    doc["analysis"] = analyse(doc["rounds"], doc.get("profile"))
    doc["agreement"] = merge_agreement([r["agreement"] for r in doc["rounds"]
                                        if r.get("agreement")])
    doc["complete"] = True
    a = doc["analysis"]
    say("compiled/eager images/s " + _x(a["end_to_end"]["images_per_s"]) +
        "; encoder gain " + _x(a["encoder_gain"]) +
        f"; predicted {_f(a['prediction'].get('predicted'), 4)}; token agreement "
        f"{doc['agreement']['identical_pct']} %")


def _describe(llm, engine, doc: dict, rec: Recorder, say) -> None:
    """The engine's encoder: layers, how many compiled, the model runner; and one embedding
    check of the serving (compiled) encoder against the same layers eager."""
    try:
        doc["engine"]["encoder_mode"] = rpc(llm, "ivb_encoder_mode", "compiled")
        doc["engine"]["compiled_encoder"] = bool(doc["engine"]["encoder_mode"]
                                                 ["compilable_layers"])
    except Exception as e:
        rec.error("ivb_encoder_mode", e)
        raise
    doc["engine"]["VLLM_USE_V2_MODEL_RUNNER"] = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    try:
        doc["engine"]["runner"] = rpc(llm, "ivb_call", profiling.RUNNER_INFO)
    except Exception as e:
        rec.error("runner_info", e)
    try:
        chk = rpc(llm, "ivb_encoder_check", engine.img_context_id, (13, 3), 0)
        doc["encoder_check"] = chk
        say(f"encoder check (serving vs eager, same weights): ok {chk.get('ok')}, "
            + ", ".join(f"{k} tiles cos {v.get('cos', float('nan')):.6f}"
                        for k, v in chk.get("batches", {}).items()))
    except Exception as e:
        rec.error("ivb_encoder_check", e)
    if not doc["engine"]["compiled_encoder"] and doc["device"]["cuda"]:
        doc["notes"].append("The engine's encoder layers are not compiled "
                            "(compilable_layers 0): both modes run the eager forward.")
    rec.save()


def _rounds(llm, engine, opts: ABOptions, plan: list[dict], files: list[str], images_dir: Path,
            bounds: dict, rec: Recorder, say, busy) -> None:
    from .. import prompts
    from ..config import PromptSpec

    doc = rec.doc
    params = ab_sampling_params(opts.max_tokens)
    prompt_text = prompts.render(PromptSpec(DEFAULT_PROMPT))
    tpt = engine.tokens_per_tile
    img_id = engine.img_context_id
    kept: dict[int, Round] = {}  # --same-images: the one slice every round uses
    for r in plan:
        a, b = bounds[r["slice"]]
        t0 = time.perf_counter()
        rnd = kept.get(r["slice"])
        if rnd is None:
            rnd = Round([str(images_dir / f) for f in files[a:b]],
                        keep=opts.same_images and r["kind"] != "profile")
            if rnd.keep:
                kept[r["slice"]] = rnd
        decode_s = time.perf_counter() - t0
        row = {"label": r["label"], "kind": r["kind"], "order": r["order"],
               "images": len(rnd.images), "decode_s": round(decode_s, 3), "modes": {}}
        doc["rounds"].append(row)
        tokens: dict[str, list] = {}
        for m in r["order"]:
            try:
                row["modes"][m], tokens[m] = _one(llm, rnd, r["label"], m, r["kind"],
                                                  prompt_text, params, tpt, img_id, busy, doc,
                                                  opts)
            except Exception as e:
                row["modes"][m] = {"error": error_line(e)}
                rec.error(f"round {r['label']} {m}", e)
                if r["kind"] != "profile":
                    raise
                # the profile is an extra: its failure keeps every timed round
                _stop_profile(llm)
                say(f"profiled round {m} failed: {error_line(e)}; going on without it")
                break
        if row["modes"] and all(not row["modes"].get(m, {}).get("error") and m in tokens
                                for m in MODES):
            row["agreement"] = token_agreement(tokens["eager"], tokens["compiled"])
        rec.save()
        if any(v.get("error") for v in row["modes"].values()):
            continue
        say(f"round {r['label']:>3} ({r['kind']}): " + "  ".join(
            f"{m} {row['modes'][m]['images_per_s']:.2f} img/s"
            + (f", enc {row['modes'][m]['encoder']['ms_per_tile']:.3f} ms/tile "
               f"({100 * (row['modes'][m]['encoder']['share_of_wall'] or 0):.1f} % of wall)"
               if (row['modes'][m].get('encoder') or {}).get('ms_per_tile') else "")
            + (f", busy {row['modes'][m]['gpu_busy_pct']} %"
               if row['modes'][m].get('gpu_busy_pct') is not None else "")
            for m in r["order"])
            + (f"  | tokens identical {row['agreement']['identical_pct']} %"
               if row.get("agreement") else ""))


def _stop_profile(llm) -> None:
    """Leave no profiler running after a failed profiled round (it may not have started)."""
    try:
        rpc(llm, "ivb_call", profiling.PROFILE, "stop")
    except Exception:
        pass


def _one(llm, rnd: Round, label: str, mode: str, kind: str, prompt_text: str, params,
         tpt: int, img_id: int, busy, doc: dict, opts: ABOptions) -> tuple[dict, list]:
    """One mode of one round: switch, process the requests (untimed), feed them (timed)."""
    rpc(llm, "ivb_encoder_mode", mode)
    t0 = time.perf_counter()
    reqs = rnd.requests(llm, label, mode, prompt_text, params)
    pre_s = time.perf_counter() - t0
    rpc(llm, "ivb_encoder_timer", "start")
    if kind == "profile":
        rpc(llm, "ivb_call", profiling.PROFILE, "start")
    seconds, w0, w1, done = feed(llm, reqs, params, gc_off=opts.gc_off)
    del reqs
    prof = rpc(llm, "ivb_call", profiling.PROFILE, "stop") if kind == "profile" else None
    enc = rpc(llm, "ivb_encoder_timer", "read")
    outs, tokens = [], [None] * len(rnd.images)
    for rid, o in done.items():
        c = o.outputs[0]
        ptoks = list(o.prompt_token_ids or [])
        ids = list(c.token_ids)
        tokens[index_of(rid)] = ids
        outs.append({"output_tokens": len(ids), "prompt_tokens": len(ptoks),
                     "image_tokens": sum(1 for t in ptoks if t == img_id),
                     "error": None if c.finish_reason in ("length", "stop") else
                     f"finish_reason {c.finish_reason}"})
    missing = len(rnd.images) - len(done)
    outs += [{"output_tokens": 0, "prompt_tokens": 0, "image_tokens": 0,
              "error": "no output"}] * missing
    row = round_stats(seconds, outs, enc, tpt, busy.mean(w0, w1) if busy else None)
    row["preprocess_s_untimed"] = round(pre_s, 3)
    row["requests_copied"] = rnd.copied
    if prof is not None:
        doc.setdefault("profile", {})[mode] = prof
        row["profile"] = prof
    return row, tokens


# -- reports --------------------------------------------------------------------------------

def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _x(st: dict | None, key: str = "median") -> str:
    """'1.0665 (1.0287–1.1250)': `key` (the median, or the crossover's estimate) and the
    interval."""
    if not st or st.get(key) is None:
        return "–"
    return f"{st[key]:.4f} ({st['lo']:.4f}–{st['hi']:.4f})"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def _gain_pct(r) -> str:
    return "–" if r is None else f"{(r - 1) * 100:+.2f} %"


def _interval(st: dict | None, digits: int = 4) -> str:
    """'lo–hi', with the coverage where fewer rounds than a 95 % interval needs."""
    if not st or st.get("lo") is None:
        return "–"
    cov = st.get("coverage")
    return (f"{st['lo']:.{digits}f}–{st['hi']:.{digits}f}"
            + (f" (covers only {100 * cov:.0f} %)" if cov is not None and cov < 0.95 else ""))


def _ci(st: dict | None, digits: int = 2) -> str:
    if not st or st.get("median") is None:
        return "–"
    return f"{st['median']:.{digits}f} ({st['lo']:.{digits}f}–{st['hi']:.{digits}f})"


def results_markdown(doc: dict) -> str:
    lines = _header_markdown(doc)
    if doc.get("analysis"):
        lines += _analysis_markdown(doc)
    lines += _checks_markdown(doc)
    lines += _profile_markdown(doc.get("profile") or {})
    lines += _rounds_markdown(doc)
    lines += footer_markdown(doc)
    return "\n".join(lines) + "\n"


def _header_markdown(doc: dict) -> list[str]:
    """Title, CPU warning, what ran (device, model, engine, feed, rounds) and the notes."""
    dev, ver, cfg = doc.get("device", {}), doc.get("versions", {}), doc.get("config", {})
    opts, eng = doc.get("options", {}), doc.get("engine", {})
    a = doc.get("analysis") or {}
    lines = [f"# Compiled vs eager encoder, end to end (GPU-bound feed): {doc['name']}", ""]
    if not dev.get("cuda"):
        lines += ["**CPU run: both modes run the same eager encoder; a functional check of the "
                  "harness, not a measurement of the compiled encoder.**", ""]
    mr = eng.get("runner") or {}
    lines += [
        f"- Device: {dev.get('name')} · vLLM {ver.get('vllm')} · torch {ver.get('torch')} · "
        f"git {(ver.get('git') or '?')[:12]}",
        f"- Model: `{doc.get('model', {}).get('spec')}` (load format "
        f"{doc.get('model', {}).get('load_format')}); {cfg.get('images_per_round')} images per "
        f"round ({cfg.get('sizes')}, max_dynamic_patch {cfg.get('max_dynamic_patch') or 'default'}),"
        f" {opts.get('max_tokens')} output tokens (ignore_eos), greedy.",
        f"- Engine: one, compile_mm_encoder {'on' if dev.get('cuda') else 'off (CPU)'}; encoder "
        f"layers {(eng.get('encoder_mode') or {}).get('layers')}, compiled "
        f"{(eng.get('encoder_mode') or {}).get('compilable_layers')}; model runner "
        f"`{mr.get('class', '?')}`; async scheduling {eng.get('async_scheduling')}; start "
        f"{eng.get('init_s')} s.",
        f"- Feed: {cfg.get('feed')}; engine core "
        f"{'in this process' if cfg.get('engine_core') == 'inline' else 'in its own process'}"
        f", garbage collection {'off' if cfg.get('gc_off_in_clock') else 'on'} inside the "
        f"clock. Images: {cfg.get('image_identity')}.",
        f"- Rounds: {opts.get('warmup_rounds')} warm-up, {a.get('rounds_timed')} timed pairs "
        f"(order alternating), "
        + ("all on the same images, processed once (--same-images)"
           if opts.get("same_images") else "each its own images")
        + "; ratios per round, summarised as median "
        f"with its 95 % order-statistics interval and as the crossover estimate (order "
        f"effect removed, t interval). Whole run {doc.get('total_s')} s; "
        f"{'complete' if doc.get('complete') else 'INCOMPLETE'}.",
    ]
    lines += [f"- Note: {n}" for n in doc.get("notes", [])]
    lines.append("")
    return lines


def _analysis_markdown(doc: dict) -> list[str]:
    """The headline table (measured, order effect removed, predicted), the encoder's share,
    the order effect and the per-mode medians."""
    dev, a = doc.get("device", {}), doc["analysis"]
    e2e, gain, pr = a["end_to_end"], a["encoder_gain"], a["prediction"]
    ips = e2e["images_per_s"]
    xo = (a.get("crossover") or {}).get("images_per_s") or {}
    xg = (a.get("crossover") or {}).get("encoder_gain") or {}
    lines = [
        "| | compiled / eager | 95 % interval | half-width |",
        "|---|---|---|---|",
        f"| **end to end, images/s (measured)** | **{_f(ips.get('median'), 4)}** "
        f"({_gain_pct(ips.get('median'))}) | {_interval(ips)} "
        f"| ±{_f(ips.get('half_width_pct'), 2)} % |",
        f"| **end to end, images/s, order effect removed** (crossover: mean of the two "
        f"orders' mean log ratios, t interval, df {xo.get('df', '–')}) | "
        f"**{_f(xo.get('estimate'), 4)}** ({_gain_pct(xo.get('estimate'))}) | "
        f"{_f(xo.get('lo'), 4)}–{_f(xo.get('hi'), 4)} | "
        f"±{_f(xo.get('half_width_pct'), 2)} % |",
        f"| end to end, output tok/s | {_f(e2e['output_tokens_per_s'].get('median'), 4)} | "
        f"{_interval(e2e['output_tokens_per_s'])} | "
        f"±{_f(e2e['output_tokens_per_s'].get('half_width_pct'), 2)} % |",
        f"| encoder in the engine (eager / compiled ms per tile) | "
        f"{_f(gain.get('median'), 4)} | {_interval(gain)} | "
        f"±{_f(gain.get('half_width_pct'), 2)} % |",
        f"| **predicted end to end** (Amdahl: share {_pct(pr.get('share'))} × gain) | "
        f"**{_f(pr.get('predicted'), 4)}** ({_gain_pct(pr.get('predicted'))}) | "
        f"{_f(pr['predicted_interval'][0], 4)}–{_f(pr['predicted_interval'][1], 4)} "
        f"(from the gain's interval) | |",
        "",
        f"The encoder's share of the eager rounds: {_pct(pr.get('share'))} of the wall time "
        + ("(encoder GPU ms between CUDA events / round wall ms), " if dev.get("cuda") else
           "(encoder ms by the worker's wall clock / round wall ms), ")
        + f"{_pct(pr.get('share_of_busy'))} of the GPU's busy time (nvidia-smi)"
        + (f", {_pct(pr.get('share_of_gpu_kernels'))} of all GPU kernel time in a "
           f"profiled round (predicting {_f(pr.get('predicted_from_kernel_share'), 4)})"
           if pr.get("share_of_gpu_kernels") is not None else "")
        + f". Measured {_f(pr.get('measured'), 4)} against predicted "
        f"{_f(pr.get('predicted'), 4)}. The measured 95 % interval is "
        f"{'within' if a.get('interval_within_target') else 'NOT within'} ±2 % "
        f"(the target) as the median's interval and "
        f"{'within' if a.get('crossover_within_target') else 'NOT within'} as the "
        f"crossover's.",
        "",
        f"Order effect: the mode that ran second in a round was "
        f"{_gain_pct(xo.get('order_effect'))} faster than the one that ran first "
        f"(95 % interval {_gain_pct(xo.get('order_effect_lo'))} to "
        f"{_gain_pct(xo.get('order_effect_hi'))}; the per-round log ratio's SD within "
        f"each order {_pct(xo.get('sd_log'))}). The encoder gain with it removed: "
        f"{_f(xg.get('estimate'), 4)} ({_f(xg.get('lo'), 4)}–{_f(xg.get('hi'), 4)}).",
        "",
        "| mode | images/s | output tok/s | round s | GPU busy % | encoder ms/tile | "
        "tiles/call | encoder share of wall | tiles/image |",
        "|---|---|---|---|---|---|---|---|---|"]
    for m in MODES:
        s = a["modes"][m]
        lines.append(f"| {m} | {_ci(s['images_per_s'])} | {_ci(s['output_tokens_per_s'], 1)}"
                     f" | {_ci(s['seconds'], 3)} | {_ci(s['gpu_busy_pct'], 1)} | "
                     f"{_ci(s['encoder_ms_per_tile'], 4)} | "
                     f"{_ci(s['encoder_tiles_per_call'], 1)} | "
                     f"{_ci(s['encoder_share_of_wall'], 4)} | "
                     f"{_f(s.get('tiles_per_image'), 2)} |")
    lines.append("")
    return lines


def _checks_markdown(doc: dict) -> list[str]:
    """Greedy token agreement between the modes and the encoder embedding check."""
    lines: list[str] = []
    ag = doc.get("agreement") or {}
    if ag:
        lines += [f"Greedy token ids, compiled vs eager on the same images (every round): "
                  f"{ag.get('identical')}/{ag.get('compared')} identical "
                  f"({ag.get('identical_pct')} %), first token {ag.get('first_token_pct')} %, "
                  f"mean common prefix {ag.get('mean_common_prefix_pct')} %.", ""]
    chk = doc.get("encoder_check") or {}
    if chk.get("batches"):
        lines += ["Encoder embeddings, serving (compiled) vs the same layers eager: " + "; ".join(
            f"{k} tiles cos {v.get('cos', float('nan')):.6f}, rel L2 {v.get('rel_l2', 0):.2e}"
            for k, v in chk["batches"].items()) + f" (ok: {chk.get('ok')}).", ""]
    return lines


def _profile_markdown(prof: dict) -> list[str]:
    """The profiled round per mode: encoder and all kernel time, then `breakdown_markdown`."""
    lines: list[str] = []
    if prof:
        lines += ["Profiled round per mode (torch.profiler in the worker; not timed):", "",
                  "| mode | encoder calls | encoder GPU ms | all GPU kernel ms | encoder share | "
                  "kernel time / wall |", "|---|---|---|---|---|---|"]
        for m, p in prof.items():
            if p.get("cuda"):
                lines.append(f"| {m} | {p.get('encoder_calls')} | {_f(p.get('encoder_gpu_ms'), 1)}"
                             f" | {_f(p.get('gpu_ms'), 1)} | {_pct(p.get('encoder_share_of_gpu'))}"
                             f" | {_pct(p.get('gpu_busy_of_wall'))} |")
            else:
                lines.append(f"| {m} | {p.get('encoder_calls')} | CPU ms "
                             f"{_f(p.get('encoder_cpu_ms'), 1)} | – | "
                             f"{_pct(p.get('encoder_share_of_wall'))} of wall | – |")
        lines.append("")
        lines += breakdown_markdown(prof)
    return lines


def _rounds_markdown(doc: dict) -> list[str]:
    """Every round: both modes' images/s, their ratio, encoder ms per tile, token agreement."""
    lines = ["Per round (images/s; encoder ms per tile):", "",
             "| round | order | eager img/s | compiled img/s | compiled/eager | eager enc ms/tile "
             "| compiled enc ms/tile | tokens identical |", "|---|---|---|---|---|---|---|---|"]
    for r in doc.get("rounds", []):
        e, c = r["modes"].get("eager", {}), r["modes"].get("compiled", {})
        ratio = (c.get("images_per_s") / e["images_per_s"]
                 if c.get("images_per_s") and e.get("images_per_s") else None)
        lines.append(f"| {r['label']} ({r['kind']}) | {' '.join(x[0].upper() for x in r['order'])}"
                     f" | {_f(e.get('images_per_s'), 2)} | {_f(c.get('images_per_s'), 2)} | "
                     f"{_f(ratio, 4)} | {_f((e.get('encoder') or {}).get('ms_per_tile'), 4)} | "
                     f"{_f((c.get('encoder') or {}).get('ms_per_tile'), 4)} | "
                     f"{(r.get('agreement') or {}).get('identical_pct', '–')} |")
    return lines


def breakdown_markdown(prof: dict) -> list[str]:
    """The profiled round's time by part of the engine step, per mode (`profiling.breakdown`):
    GPU ms and share with the largest kernel classes, then the GPU's idle gaps; on CPU, the
    ranges' calls and CPU ms."""
    modes = [m for m in MODES if (prof.get(m) or {}).get("breakdown")]
    if not modes:
        return []
    bds = {m: prof[m]["breakdown"] for m in modes}
    names = {**profiling.RANGES, profiling.OUTSIDE: profiling.OUTSIDE}
    lines = []
    if any(b.get("parts") for b in bds.values()):
        order = list(dict.fromkeys(k for b in bds.values() for k in (b.get("parts") or {})))
        lines += ["GPU time by part of the step in the profiled round (the innermost range "
                  "around each kernel's launch; kernel classes by name):", "",
                  "| part | " + " | ".join(f"{m} GPU ms (share)" for m in modes)
                  + " | largest kernel classes (" + modes[0] + ") |",
                  "|---|" + "---|" * len(modes) + "---|"]
        for k in order:
            cells = []
            for m in modes:
                part = (bds[m].get("parts") or {}).get(k)
                cells.append(f"{_f(part['gpu_ms'], 1)} ({_pct(part.get('share'))})" if part
                             else "–")
            top = ((bds[modes[0]].get("parts") or {}).get(k) or {}).get("classes") or {}
            lines.append(f"| {names.get(k, k)} | " + " | ".join(cells) + " | " + ", ".join(
                f"{c} {_f(v, 1)}" for c, v in list(top.items())[:3]) + " |")
        lines.append("")
        for m in modes:
            idle = bds[m].get("idle") or {}
            if idle:
                lines.append(
                    f"- {m}: GPU busy {_pct(idle.get('busy_of_wall'))} of the profiled wall "
                    f"(union of kernels); {idle.get('gaps_over_1ms')} idle gaps ≥ 1 ms "
                    f"totalling {_f(idle.get('gap_ms_over_1ms'), 1)} ms, "
                    f"{idle.get('gaps_over_0_1ms')} ≥ 0.1 ms, largest "
                    f"{_f(idle.get('largest_gap_ms'), 1)} ms; kernels placed in the table "
                    f"{_f(bds[m].get('attributed_gpu_ms'), 1)} of "
                    f"{_f(prof[m].get('gpu_ms'), 1)} GPU ms (the rest: no launch seen).")
        lines.append("")
    else:
        lines += ["Ranges in the profiled round (CPU ms, inclusive of ranges inside them):", "",
                  "| range | " + " | ".join(f"{m} calls | {m} CPU ms" for m in modes) + " |",
                  "|---|" + "---|---|" * len(modes)]
        names["ivb_encoder"] = "encoder (embed_multimodal, all of it)"  # inclusive here
        for k in profiling.RANGES:
            if any(k in (b.get("calls") or {}) for b in bds.values()):
                lines.append(f"| {names[k]} | " + " | ".join(
                    f"{(bds[m].get('calls') or {}).get(k, 0)} | "
                    f"{_f((bds[m].get('cpu_ms') or {}).get(k), 1)}" for m in modes) + " |")
        lines.append("")
    return lines


def plot(doc: dict, path: Path) -> Path | None:
    """Per timed round: compiled/eager images/s, and encoder ms per tile by mode. None if
    matplotlib is missing or nothing was timed."""
    timed = [r for r in doc.get("rounds", []) if r["kind"] == "timed"
             and all(r["modes"].get(m, {}).get("images_per_s") for m in MODES)]
    if not timed:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    from .report import save_figure

    xs = list(range(len(timed)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    ratios = [r["modes"]["compiled"]["images_per_s"] / r["modes"]["eager"]["images_per_s"]
              for r in timed]
    ax1.plot(xs, ratios, "o-", color="#1f77b4", label="measured per round")
    a = doc.get("analysis") or {}
    med = (a.get("end_to_end") or {}).get("images_per_s", {}).get("median")
    pred = (a.get("prediction") or {}).get("predicted")
    if med:
        ax1.axhline(med, color="#1f77b4", ls="--", lw=1, label=f"median {med:.4f}")
    xo = (a.get("crossover") or {}).get("images_per_s") or {}
    if xo.get("estimate"):
        ax1.axhspan(xo["lo"], xo["hi"], color="#9467bd", alpha=0.12, lw=0)
        ax1.axhline(xo["estimate"], color="#9467bd", lw=1,
                    label=f"order effect removed {xo['estimate']:.4f} "
                          f"({xo['lo']:.4f}–{xo['hi']:.4f})")
    if pred:
        ax1.axhline(pred, color="#d62728", ls=":", lw=1.2, label=f"predicted {pred:.4f}")
    ax1.axhline(1.0, color="black", lw=0.8)
    ax1.set_xlabel("timed round")
    ax1.set_ylabel("compiled / eager images/s")
    ax1.legend(fontsize=8, frameon=False)
    for m, color in (("eager", "#7f7f7f"), ("compiled", "#2ca02c")):
        ys = [(r["modes"][m].get("encoder") or {}).get("ms_per_tile") for r in timed]
        ax2.plot(xs, [y if y is not None else float("nan") for y in ys], "o-", color=color,
                 label=m)
    ax2.set_xlabel("timed round")
    ax2.set_ylabel("encoder ms per tile (in the engine)")
    ax2.legend(fontsize=8, frameon=False)
    for ax in (ax1, ax2):
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_xticks(xs)
    return save_figure(fig, path, f"bench-ab {doc['name']} · {doc.get('device', {}).get('name')}",
                       cpu=not doc.get("device", {}).get("cuda"))


class Stopped(Exception):
    """Raised in the main thread by bench-ab's SIGTERM handler (a `timeout` around it)."""


def _stop_in(e: BaseException | None) -> Stopped | None:
    """The Stopped behind `e`, if any: a stop that lands inside vLLM's input processor comes
    back wrapped in its ValueError ("Failed to apply InternVLProcessor", seen on an H100)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, Stopped):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def analyse_partial(doc: dict) -> dict:
    """A run that ended early (stopped at its time limit, or failed) keeps its timed rounds:
    their analysis goes into the document, which stays `complete: false` and says how many
    pairs it has (on the H200, 6 of 8 COCO pairs fitted in a 400 s call)."""
    if "analysis" not in doc and any(r.get("kind") == "timed" for r in doc.get("rounds", ())):
        doc["analysis"] = analyse(doc["rounds"], doc.get("profile"))
        doc["agreement"] = merge_agreement([r["agreement"] for r in doc["rounds"]
                                            if r.get("agreement")])
        timed = sum(1 for r in doc.get("schedule", ()) if r.get("kind") == "timed")
        doc.setdefault("notes", []).append(
            f"Incomplete: the analysis covers the {doc['analysis']['rounds_timed']} timed "
            f"pairs finished of {timed} planned.")
    return doc


def write_outputs(doc: dict, results_dir: Path) -> dict[str, Path]:
    """NAME.json (already written while running), NAME.md and NAME.png (if matplotlib); a
    run that ended early is analysed over the rounds it finished (`analyse_partial`)."""
    analyse_partial(doc)
    results_dir.mkdir(parents=True, exist_ok=True)
    out = {"json": results_dir / f"{doc['name']}.json"}
    Recorder(doc, results_dir).save()
    md = results_dir / f"{doc['name']}.md"
    md.write_text(results_markdown(doc))
    out["md"] = md
    png = plot(doc, results_dir / f"{doc['name']}.png")
    if png:
        out["png"] = png
    return out


# -- several runs, one analysis --------------------------------------------------------------------

# what must be equal for two runs' pairs to measure the same thing
SAME = ("model", "sizes", "images", "max_tokens", "max_dynamic_patch", "max_num_seqs",
        "max_num_batched_tokens", "max_model_len", "mm_cache_gb", "kv_cache_gb",
        "gpu_memory_utilization", "engine_core", "gc_off", "same_images")
# what an option read in a result written before it existed
OLD_DEFAULTS = {"same_images": False}


class MergeError(ValueError):
    """Runs that did not measure the same configuration."""


def merge(docs: list[dict], name: str) -> dict:
    """The timed pairs of several bench-ab runs of one configuration, analysed together.
    An interval within ±2 % (TARGET_HALF_WIDTH) needs more pairs than one 600 s device call
    holds (on the H200: ~13-21 COCO pairs at a per-round SD of 3.7 %, 6 fitted), and each
    pair is a comparison within one round, so pairs from separate engine starts can be
    pooled where the settings, device and versions are the same (checked). Rounds are
    relabelled `<run>:<label>`; the profile and encoder check are the first run's."""
    if len(docs) < 2:
        raise MergeError("give two or more result files")
    first = docs[0]
    for d in docs[1:]:
        for k in SAME:
            mine, theirs = (x.get("options", {}).get(k, OLD_DEFAULTS.get(k)) for x in (d, first))
            if mine != theirs:
                raise MergeError(f"{d.get('name')}: option {k} is {mine!r}, not {theirs!r} "
                                 f"as in {first.get('name')}")
        for where, k in (("device", "name"), ("versions", "vllm"), ("versions", "torch")):
            if d.get(where, {}).get(k) != first.get(where, {}).get(k):
                raise MergeError(f"{d.get('name')}: {where} {k} is {d.get(where, {}).get(k)!r}, "
                                 f"not {first.get(where, {}).get(k)!r} as in {first.get('name')}")
    rounds, schedule = [], []
    for i, d in enumerate(docs):
        rounds += [dict(r, label=f"{i}:{r['label']}") for r in d.get("rounds", ())]
        schedule += [dict(s, label=f"{i}:{s.get('label')}") for s in d.get("schedule", ())]
    out = {k: v for k, v in first.items() if k not in ("analysis", "agreement", "rounds",
                                                       "schedule", "notes", "errors")}
    out.update(name=name, rounds=rounds, schedule=schedule,
               complete=all(d.get("complete") for d in docs),
               merged_from=[{"name": d.get("name"), "created": d.get("created"),
                             "git": d.get("versions", {}).get("git"),
                             "command": d.get("command"), "complete": d.get("complete")}
                            for d in docs],
               errors=[e for d in docs for e in d.get("errors", ())],
               notes=list(dict.fromkeys(n for d in docs for n in d.get("notes", ())
                                        if not n.startswith("Incomplete:"))))
    out["notes"].append(f"Merged: the timed pairs of {len(docs)} runs "
                        f"({', '.join(d.get('name', '?') for d in docs)}), each from its own "
                        "engine start; the profile and the encoder check are the first run's.")
    out["command"] = "python -m internvl_batch.bench.ab merge " + " ".join(
        f"{d.get('name')}.json" for d in docs)
    out["analysis"] = analyse(rounds, first.get("profile"))
    out["agreement"] = merge_agreement([r["agreement"] for r in rounds if r.get("agreement")])
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m internvl_batch.bench.ab",
                                 description="bench-ab's result files, pooled.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="analyse the timed pairs of several runs of one "
                                     "configuration together; writes NAME.json/.md/.png")
    m.add_argument("files", nargs="+", help="bench-ab result files (NAME.json)")
    m.add_argument("--name", required=True)
    m.add_argument("--results-dir", default=None, help="default: the first file's folder")
    r = sub.add_parser("report", help="analyse a result file's rounds again with this code "
                                      "and rewrite NAME.json/.md/.png beside it")
    r.add_argument("files", nargs="+", help="bench-ab result files (NAME.json)")
    a = ap.parse_args(argv)
    try:
        docs = [json.loads(Path(f).read_text()) for f in a.files]
        if a.cmd == "merge":
            todo = [(merge(docs, a.name), Path(a.results_dir or Path(a.files[0]).parent))]
        else:
            todo = [(reanalyse(d), Path(f).parent) for d, f in zip(docs, a.files)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        # a missing or broken file, or runs that differ
        print(f"error: {e}", file=sys.stderr)
        return 2
    for doc, where in todo:
        paths = write_outputs(doc, where)
        a_ = doc["analysis"]
        print(f"{a_['rounds_timed']} pairs: compiled/eager images/s {_x(a_['end_to_end']['images_per_s'])}"
              f", order effect removed {_x(a_['crossover']['images_per_s'], 'estimate')}; wrote "
              + ", ".join(str(p) for p in paths.values()))
    return 0


def reanalyse(doc: dict) -> dict:
    """`doc` with its analysis computed again from its recorded rounds (a result written
    before the analysis gained a part, such as the crossover estimate)."""
    if not any(r.get("kind") == "timed" for r in doc["rounds"]):
        raise ValueError(f"{doc.get('name')}: no timed rounds to analyse")
    doc["analysis"] = analyse(doc["rounds"], doc.get("profile"))
    doc["agreement"] = merge_agreement([r["agreement"] for r in doc["rounds"]
                                        if r.get("agreement")])
    note = f"Analysis recomputed from the recorded rounds by git {(git_sha() or '?')[:12]}."
    doc["notes"] = [n for n in doc.get("notes", ())
                    if not n.startswith("Analysis recomputed")] + [note]
    return doc



if __name__ == "__main__":
    sys.exit(main())
