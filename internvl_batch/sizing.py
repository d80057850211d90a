"""Sizing the engines: model weights, memory fractions, how many engines fit on one device.

Pure arithmetic on config.json and a few measured constants; used by `engine` (default memory
fraction), `replicas` (auto replica count, each replica's memory) and the benchmark (FLOPs,
each variant's memory share). No vllm, no torch.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

# the share of device memory vLLM takes by default; engines sharing a device split it
DEVICE_FRACTION = 0.9
# on CPU the fraction sizes the KV cache from host RAM instead: one engine alone, or each of
# several engine processes on one host
CPU_FRACTION = 0.2
CPU_FRACTION_SHARED = 0.1

DEFAULT_KV_CACHE_GB = 4.0  # per replica: ~340k tokens of InternVL3-1B, ~150k of 2B
MAX_AUTO_REPLICAS = 4  # measured: 4 x InternVL3-1B fill an H100 (GPU 97 % busy, 315 img/s)
# device memory per replica beyond weights and KV cache (CUDA context, activations of the
# profile run, CUDA graphs): 4 x InternVL3-1B with 4 GiB KV each peaked at 41.1 GB on H100
REPLICA_OVERHEAD_GB = 4.5
CPUS_PER_REPLICA = 3


def gpu_memory_fraction(engines: int = 1, margin: float = 0.0, cap: float = 1.0) -> float:
    """`gpu_memory_utilization` for each of `engines` engines sharing one GPU: 90 % of its
    memory split evenly, minus `margin`, at most `cap`, rounded down to 0.01."""
    return int(min(DEVICE_FRACTION / engines - margin, cap) * 100) / 100


def lm_shape(cfg: dict) -> dict:
    """The language model's size from an InternVL config.json: hidden size, layers,
    parameters in its layers (attention + MLP) and in one embedding/head matrix."""
    llm = cfg.get("llm_config") or cfg.get("text_config") or cfg
    d = llm["hidden_size"]
    heads = llm["num_attention_heads"]
    kv = llm.get("num_key_value_heads", heads)
    hd = llm.get("head_dim") or d // heads
    per_layer = d * heads * hd * 2 + 2 * d * kv * hd + 3 * d * llm["intermediate_size"]
    return {"hidden": d, "layers": llm["num_hidden_layers"],
            "layer_params": per_layer * llm["num_hidden_layers"],
            "head_params": d * llm["vocab_size"]}


def weights_gb(model_dir: str) -> float | None:
    """Checkpoint weights in GB: the files if present, else estimated from config.json (bf16;
    synthesized checkpoints have no weight files)."""
    d = Path(model_dir)
    if not d.is_dir():
        return None
    files = [f for pat in ("*.safetensors", "*.bin") for f in d.glob(pat)]
    if files:
        return sum(f.stat().st_size for f in files) / 1e9
    try:
        cfg = json.loads((d / "config.json").read_text())
        lm = lm_shape(cfg)
        v = cfg["vision_config"]
        h, m, layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
        tied = (cfg.get("llm_config") or {}).get("tie_word_embeddings", False)
        params = lm["layer_params"] + lm["head_params"] * (1 if tied else 2) + \
            layers * (4 * h * h + 2 * h * m) + 4 * h * lm["hidden"] + lm["hidden"] ** 2
        return params * 2 / 1e9
    except (OSError, KeyError, ValueError, TypeError):
        return None


def host_memory_gb() -> float:
    """This host's RAM, or the cgroup's limit where lower (a Slurm job's --mem)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total / 1e9


def usable_cpus() -> int:
    """CPUs this process may run on (a Slurm allocation's cpuset, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_replicas(model_dir: str, cuda: bool, device_gb: float | None,
                  kv_gb: float | None = None, cpus: int | None = None) -> tuple[int, str]:
    """How many engines share one device when the user did not say (`plan_engines` on one
    GPU): as many as fit in 90 % of its memory and in the CPUs, at most MAX_AUTO_REPLICAS;
    one on CPU, when the model size is unknown, or when it does not fit (the reason)."""
    if not cuda:
        return 1, "CPU: one engine"
    model = model_size(model_dir)
    if model is None or not device_gb:
        return 1, "model or device size unknown: one engine (pass --replicas N to override)"
    layout = plan_engines(model, Devices(gpus=1, memory_gb=device_gb, cpus=cpus or usable_cpus()),
                          kv_gb=kv_gb)
    return (1, layout.refusal) if layout.refusal else (layout.engines, layout.why)


# -- engines over devices: the planner -----------------------------------------------------

GB = 1e9
MAX_ENGINES = 16  # RunConfig's limit of --replicas
# tensor-parallel sizes a refusal suggests: the GPU counts of common nodes
SUGGESTED_TP = (2, 4, 8)


@dataclass(frozen=True)
class ModelSize:
    """The parts of a model that split differently over GPUs (GB of bf16 weights), and its
    attention shapes. vLLM shards the language model's layers over tensor- and pipeline-
    parallel ranks; InternViT's layers over tensor-parallel ranks only (every pipeline stage
    holds the whole encoder), its attention only when the ranks divide its heads (InternViT-
    6B's 25 heads: never, it is then replicated); the projector is replicated."""
    name: str
    lm_gb: float
    vit_attn_gb: float
    vit_mlp_gb: float
    replicated_gb: float  # the projector, InternViT's embeddings and norms
    lm_heads: int
    lm_kv_heads: int
    lm_layers: int
    head_dim: int
    vit_heads: int

    @property
    def weights_gb(self) -> float:
        return self.lm_gb + self.vit_attn_gb + self.vit_mlp_gb + self.replicated_gb

    def weights_per_gpu_gb(self, tp: int = 1, pp: int = 1) -> float:
        attn = self.vit_attn_gb / tp if self.vit_heads % tp == 0 else self.vit_attn_gb
        return self.lm_gb / (tp * pp) + attn + self.vit_mlp_gb / tp + self.replicated_gb

    def kv_per_gpu_gb(self, tokens: int, tp: int = 1, pp: int = 1) -> float:
        """bf16 K and V of `tokens` tokens on one rank (KV heads are replicated where the
        ranks outnumber them)."""
        kv_heads = -(-self.lm_kv_heads // tp)
        layers = -(-self.lm_layers // pp)
        return 2 * layers * kv_heads * self.head_dim * 2 * tokens / GB


def model_size_of_config(cfg: dict, name: str, weights_gb_: float | None = None) -> ModelSize:
    """`ModelSize` from an InternVL config.json; `weights_gb_` (the weight files' size)
    scales the estimate where the checkpoint has files."""
    lm = lm_shape(cfg)
    llm = cfg.get("llm_config") or cfg.get("text_config") or cfg
    v = cfg["vision_config"]
    h, m, layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    tied = llm.get("tie_word_embeddings", False)
    shuffled = h * int(1 / cfg.get("downsample_ratio", 0.5)) ** 2
    parts = {"lm": lm["layer_params"] + lm["head_params"] * (1 if tied else 2),
             "attn": layers * 4 * h * h, "mlp": layers * 2 * h * m,
             "rest": shuffled * lm["hidden"] + lm["hidden"] ** 2 +
             ((v.get("image_size", 448) // v.get("patch_size", 14)) ** 2 + 1) * h}
    scale = 2 / GB  # bf16
    if weights_gb_:
        scale = weights_gb_ / sum(parts.values())
    heads = llm["num_attention_heads"]
    return ModelSize(name=name, lm_gb=parts["lm"] * scale, vit_attn_gb=parts["attn"] * scale,
                     vit_mlp_gb=parts["mlp"] * scale, replicated_gb=parts["rest"] * scale,
                     lm_heads=heads, lm_kv_heads=llm.get("num_key_value_heads", heads),
                     lm_layers=llm["num_hidden_layers"],
                     head_dim=llm.get("head_dim") or llm["hidden_size"] // heads,
                     vit_heads=v["num_attention_heads"])


def model_size(model: "str | os.PathLike") -> ModelSize | None:
    """`ModelSize` of a checkpoint folder or a `preset:NAME` (from the preset's shapes,
    before it is synthesized); None for a hub id or an unreadable config."""
    model = str(model)
    try:
        if model.startswith("preset:"):
            from .checkpoint import PRESETS, build_config, parse_preset

            name, _ = parse_preset(model.split(":", 1)[1])
            return model_size_of_config(build_config(PRESETS[name]),
                                        PRESETS[name].real_name.split("/")[-1])
        d = Path(model)
        cfg = json.loads((d / "config.json").read_text())
        files = [f for pat in ("*.safetensors", "*.bin") for f in d.glob(pat)]
        name = _real_name(d) or d.name
        return model_size_of_config(cfg, name, sum(f.stat().st_size for f in files) / GB
                                    if files else None)
    except (OSError, KeyError, ValueError, TypeError, ZeroDivisionError):
        return None


def _real_name(d: Path) -> str | None:
    """A synthesized checkpoint's published model name ("InternVL3-38B")."""
    try:
        mirrors = json.loads((d / "synth.json").read_text())["mirrors"]
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return mirrors.split("/")[-1] if mirrors.startswith("OpenGVLab/InternVL3-") else None



@dataclass(frozen=True)
class Devices:
    """What the engines may run on: `gpus` GPUs of `memory_gb` each (0 GPUs: the CPU, with
    `memory_gb` of host RAM), `cpus` usable CPUs, and the GPUs' CUDA_VISIBLE_DEVICES names."""
    gpus: int
    memory_gb: float
    cpus: int
    ids: tuple[str, ...] = ()

    def gpu_ids(self) -> tuple[str, ...]:
        return self.ids if len(self.ids) == self.gpus else tuple(map(str, range(self.gpus)))


@dataclass(frozen=True)
class Layout:
    """The engines of a run: `engines` engines of `gpus_per_engine` GPUs each, at most
    `engines_per_gpu` sharing one GPU; `devices[k]`: engine k's CUDA_VISIBLE_DEVICES (None:
    the process's own). `refusal`: why the model cannot run here (then nothing else holds)."""
    engines: int = 1
    gpus_per_engine: int = 1
    engines_per_gpu: int = 1
    devices: tuple[str | None, ...] = (None,)
    why: str = ""
    refusal: str | None = None


def place(engines: int, gpus_per_engine: int, ids: tuple[str, ...]) -> tuple[tuple, int]:
    """(each engine's CUDA_VISIBLE_DEVICES, engines per GPU): engine k on group k mod G of
    the G = len(ids) // gpus_per_engine disjoint groups of GPUs. With one group in use the
    engines keep the process's devices (None)."""
    groups = len(ids) // gpus_per_engine
    if groups <= 1 or engines <= 1:
        return (None,) * engines, engines
    used = min(engines, groups)
    names = [",".join(ids[j * gpus_per_engine:(j + 1) * gpus_per_engine]) for j in range(used)]
    return tuple(names[k % used] for k in range(engines)), math.ceil(engines / used)


def cpu_bind(cpus: list[int], ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for an engine of `ranks` CPU workers: the CPUs split into
    `ranks` disjoint runs ("0|1" for 2 ranks on 2 CPUs). vLLM's own default binds each rank
    to a NUMA node and refuses more ranks than nodes ("Not enough allowed NUMA nodes")."""
    per = len(cpus) // ranks
    if per < 1:
        raise ValueError(f"{ranks} ranks need {ranks} CPUs, {len(cpus)} usable")
    return "|".join(",".join(map(str, cpus[r * per:(r + 1) * per])) for r in range(ranks))


def _tp_refusal(model: ModelSize, tp: int, pp: int) -> str | None:
    """vLLM's own conditions on the parallel sizes, as one line."""
    kv = model.lm_kv_heads
    if model.lm_heads % tp or not (kv % tp == 0 or tp % kv == 0):
        ok = [t for t in (1, 2, 4, 8) if model.lm_heads % t == 0 and (kv % t == 0 or t % kv == 0)]
        return (f"--tensor-parallel-size {tp}: {model.name}'s {model.lm_heads} attention "
                f"heads ({kv} KV heads) do not split {tp} ways; use one of "
                f"{', '.join(map(str, ok))}")
    if pp > model.lm_layers:
        return (f"--pipeline-parallel-size {pp}: {model.name} has only {model.lm_layers} "
                "language-model layers")
    return None


def plan_engines(model: ModelSize, dev: Devices, *, tp: int = 1, pp: int = 1,
                 replicas: int | None = None, kv_gb: float | None = None,
                 max_model_len: int = 8192) -> Layout:
    """The engines for `model` on `dev`, or a one-line refusal (`Layout.refusal`).

    One engine spans tp x pp GPUs. It fits if its share of the weights, the KV cache of one
    `max_model_len` request (vLLM refuses to start without it) and REPLICA_OVERHEAD_GB fit
    in DEVICE_FRACTION of each GPU. Then, unless `replicas` says: one engine per group of
    tp x pp GPUs for models split over GPUs, else as many per GPU as fit with a
    `kv_gb` (DEFAULT_KV_CACHE_GB) KV cache each, at most MAX_AUTO_REPLICAS a GPU, and at
    most one per CPUS_PER_REPLICA CPUs overall."""
    g = tp * pp
    bad = _tp_refusal(model, tp, pp)
    if bad:
        return Layout(refusal=bad)
    if dev.gpus == 0:
        return _plan_cpu(model, dev, g, replicas)
    if g > dev.gpus:
        sizes = f"--tensor-parallel-size {tp}" + (f" --pipeline-parallel-size {pp}"
                                                  if pp > 1 else "")
        return Layout(refusal=f"{sizes} needs {g} GPUs per engine; {dev.gpus} visible: "
                              f"request {g} (Slurm: --gres=gpu:{g}) or pass smaller sizes")
    usable = DEVICE_FRACTION * dev.memory_gb
    w = model.weights_per_gpu_gb(tp, pp)
    need = w + model.kv_per_gpu_gb(max_model_len, tp, pp) + REPLICA_OVERHEAD_GB
    if need > usable:
        return Layout(refusal=_no_fit(model, dev, tp, pp, max_model_len))
    groups = dev.gpus // g
    # kv_cache_gb is GiB (vLLM's kv_cache_memory_bytes = GiB x 2**30)
    kv = max((kv_gb or DEFAULT_KV_CACHE_GB) * 2**30 / GB, model.kv_per_gpu_gb(max_model_len, tp, pp))
    per_engine = w + kv + REPLICA_OVERHEAD_GB
    if replicas is None:
        per_gpu = 1 if g > 1 else max(1, min(MAX_AUTO_REPLICAS, int(usable // per_engine)))
        n = max(1, min(groups * per_gpu, dev.cpus // CPUS_PER_REPLICA, MAX_ENGINES))
    else:
        n = replicas
    devices, per_gpu = place(n, g, dev.gpu_ids())
    span = f", {g} GPUs each (tensor parallel {tp}" + (f", pipeline {pp})" if pp > 1 else ")") \
        if g > 1 else ""
    return Layout(engines=n, gpus_per_engine=g, engines_per_gpu=per_gpu, devices=devices,
                  why=f"{n} engine(s){span}, up to {per_gpu} per GPU: ~{per_engine:.1f} GB "
                      f"per GPU each ({w:.1f} GB weights + {kv:.1f} GB KV + "
                      f"{REPLICA_OVERHEAD_GB:g} GB) in 90 % of {dev.memory_gb:.0f} GB; "
                      f"{dev.gpus} GPU(s), {dev.cpus} CPUs")


def _no_fit(model: ModelSize, dev: Devices, tp: int, pp: int, max_model_len: int) -> str:
    """"InternVL3-38B needs ~77 GB of weights: pass --tensor-parallel-size 2 or use a GPU
    with more memory", naming the least tensor-parallel size that fits."""
    usable = DEVICE_FRACTION * dev.memory_gb

    def fits(t):
        return _tp_refusal(model, t, pp) is None and \
            model.weights_per_gpu_gb(t, pp) + model.kv_per_gpu_gb(max_model_len, t, pp) + \
            REPLICA_OVERHEAD_GB <= usable

    g = tp * pp
    head = f"{model.name} needs ~{model.weights_gb:.0f} GB of weights"
    if g > 1:
        head += f", ~{model.weights_per_gpu_gb(tp, pp):.0f} GB on each of its {g} GPUs"
    bigger = next((t for t in SUGGESTED_TP if t > tp and fits(t)), None)
    if bigger is None:
        return (f"{head}: it does not fit {max(SUGGESTED_TP) * pp} GPUs of "
                f"{dev.memory_gb:.0f} GB either; use GPUs with more memory")
    gpu = "a GPU" if g == 1 else "GPUs"
    if bigger * pp <= dev.gpus:
        return f"{head}: pass --tensor-parallel-size {bigger} or use {gpu} with more memory"
    return (f"{head}: pass --tensor-parallel-size {bigger} on a machine with {bigger * pp} "
            f"such GPUs ({dev.gpus} visible here) or use {gpu} with more memory")


def _plan_cpu(model: ModelSize, dev: Devices, g: int, replicas: int | None) -> Layout:
    """On CPU: one engine unless `replicas` says; each of its ranks bound to its own CPUs;
    its weights in host RAM."""
    if g > dev.cpus:
        return Layout(refusal=f"tensor x pipeline parallel size {g} on CPU needs a CPU per "
                              f"rank: {dev.cpus} usable here")
    if model.weights_gb > DEVICE_FRACTION * dev.memory_gb:
        return Layout(refusal=f"{model.name} needs ~{model.weights_gb:.0f} GB of weights: this "
                              f"host has {dev.memory_gb:.0f} GB of memory; run it on GPUs")
    n = replicas or 1
    return Layout(engines=n, gpus_per_engine=g, engines_per_gpu=n, devices=(None,) * n,
                  why=f"CPU: {n} engine(s)" + (f" of {g} ranks" if g > 1 else ""))


# -- the feed: decode workers and batches --------------------------------------------------

# What one batch of rendered requests may hold (bf16 pixels), so that the batches in flight
# (up to two per replica and 2 x replicas + 1 queued by the main process: replicas.imap)
# stay a few GB: 256 COCO images of 13 tiles are ~4 GB rendered, ~0.25 GB as decoded RGB.
BATCH_BYTES = 512 << 20
# the decode workers `run` starts when nobody said and the engines render their own prompts
DEFAULT_WORKERS = 4


def max_tiles(model_dir: str, max_dynamic_patch: int | None) -> tuple[int, int]:
    """(tiles of the largest image, tile side in pixels) from config.json: InternVL tiles an
    image into at most `max_dynamic_patch` tiles plus a thumbnail when it has more than one."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return 13, 448
    mdp = max_dynamic_patch or cfg.get("max_dynamic_patch") or 12
    side = cfg.get("force_image_size") or cfg.get("vision_config", {}).get("image_size") or 448
    thumb = 1 if cfg.get("use_thumbnail", True) and mdp > 1 else 0
    return int(mdp) + thumb, int(side)


def plan_feed(*, render_in_workers: bool, replicas: int, cpus: int, workers: int | None,
              batch_size: int, tiles: int, side: int) -> dict:
    """Decode workers, batch size and read-ahead window for a run.

    Workers rendering prompts take the cores the engines leave (each replica keeps two busy:
    its front process and its engine core; the main process one); otherwise DEFAULT_WORKERS.
    Rendered batches are capped at BATCH_BYTES of bf16 pixels of the largest image, and the
    window (images decoded ahead) at two batches."""
    if workers is None:
        workers = max(2, cpus - 2 * replicas - 1) if render_in_workers else DEFAULT_WORKERS
    per_image = tiles * 3 * side * side * 2
    batch = batch_size
    if render_in_workers:
        batch = max(1, min(batch_size, BATCH_BYTES // per_image))
    return {"preprocess": "workers" if render_in_workers else "engine", "workers": workers,
            "batch_size": batch, "window": max(2 * batch, 2 if render_in_workers else 64),
            "max_tiles": tiles, "rendered_mb_per_image": round(per_image / 2**20, 1)
            if render_in_workers else None}
