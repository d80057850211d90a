"""Sizing the engines: model weights, memory fractions, how many engines fit on one device.

Pure arithmetic on config.json and a few measured constants; used by `engine` (default memory
fraction), `replicas` (auto replica count, each replica's memory) and the benchmark (FLOPs,
each variant's memory share). No vllm, no torch.
"""
from __future__ import annotations

import json
import os
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


def usable_cpus() -> int:
    """CPUs this process may run on (a Slurm allocation's cpuset, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_replicas(model_dir: str, cuda: bool, device_gb: float | None,
                  kv_gb: float | None = None, cpus: int | None = None) -> tuple[int, str]:
    """How many engines share the device when the user did not say: as many as fit in 90 %
    of its memory and in the CPUs (each replica keeps ~3 busy: frontend, engine core, its
    share of decoding and dispatch), at most MAX_AUTO_REPLICAS; one on CPU or when the model
    size is unknown."""
    if not cuda:
        return 1, "CPU: one engine"
    kv_gb = kv_gb or DEFAULT_KV_CACHE_GB
    w = weights_gb(model_dir)
    if w is None or not device_gb:
        return 1, "model or device size unknown: one engine (pass --replicas N to override)"
    cpus = cpus or usable_cpus()
    per = w + kv_gb + REPLICA_OVERHEAD_GB
    by_mem, by_cpu = int(DEVICE_FRACTION * device_gb // per), cpus // CPUS_PER_REPLICA
    n = max(1, min(MAX_AUTO_REPLICAS, by_mem, by_cpu))
    return n, (f"{n} engine replica(s): ~{per:.1f} GB each ({w:.1f} GB weights + {kv_gb:g} GB "
               f"KV + {REPLICA_OVERHEAD_GB:g} GB) in 90 % of {device_gb:.0f} GB, "
               f"{CPUS_PER_REPLICA} of {cpus} CPUs each")


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
