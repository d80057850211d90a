"""Typed, self-validating configuration for a run.

Each stage gets its own frozen dataclass; `__post_init__` rejects nonsense with a message that
says what to do, so bad flags fail before any model is loaded.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .sources import SourceSpec

DEFAULT_PROMPT = "Describe this image in one sentence."
DEFAULT_MAX_ERROR_RATE = 0.5


class ConfigError(ValueError):
    """A user error in flags or environment: reported as one line, exit code 2."""


CACHE_ENV = "INTERNVL_BATCH_CACHE"


def default_cache_dir() -> Path:
    """$INTERNVL_BATCH_CACHE, else $XDG_CACHE_HOME/internvl-batch, else ~/.cache/internvl-batch."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "internvl-batch"


def default_cache_dir_shell() -> str:
    """`default_cache_dir()` as a quoted bash expression, expanded where a job runs."""
    return f'"${{{CACHE_ENV}:-${{XDG_CACHE_HOME:-$HOME/.cache}}/internvl-batch}}"'


@dataclass(frozen=True)
class PromptSpec:
    prompt: str = DEFAULT_PROMPT
    system_prompt: str | None = None

    def __post_init__(self):
        if not self.prompt.strip():
            raise ConfigError("--prompt is empty")


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # benchmarks: every variant decodes the same number of tokens

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ConfigError("--max-tokens must be >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError("--temperature must be a number >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p must be in (0, 1]")


QUANTIZATIONS = ("fp8",)  # vLLM's `quantization` values `--quantization` accepts
# the `dtype` values vLLM's LLM accepts (ModelConfig: "auto" and these torch dtypes)
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


@dataclass(frozen=True)
class EngineSpec:
    model: str
    compile: bool = False
    max_dynamic_patch: int | None = None  # None: the checkpoint's own setting
    max_model_len: int = 8192
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None  # None: 0.9 on GPU, small on CPU
    dtype: str = "auto"
    seed: int = 0
    load_format: str | None = None  # None: "dummy" for weightless synthesized ones, else "auto"
    enforce_eager: bool = False
    # vLLM's multimodal processor cache (GiB per engine; None: vLLM's 4). Off by default: a
    # dataset's images are all new, so it never hits and only holds each image's pixels in
    # the engine core (vLLM CPU, 10,200 images: its RSS 0.92 -> 3.56 GB with the cache, flat
    # at 0.68 GB without, and 16 % more images/s, 2 runs each; docs/performance.md)
    mm_cache_gb: float | None = 0.0
    kv_cache_gb: float | None = None  # a fixed KV cache instead of profiling free memory
    # vLLM's encoder CUDA graphs (`cudagraph_mm_encoder`); vLLM 0.26 honours it only on its V1
    # model runner, which Engine.start selects (VLLM_USE_V2_MODEL_RUNNER=0) when this is set
    encoder_cudagraphs: bool = False
    # vLLM's online quantization of the checkpoint's linear layers at load (None: none). "fp8":
    # weights to FP8 per tensor, activations scaled per token as they come; vLLM passes the
    # config to InternViT and to the language model (the projector, plain nn.Linear, stays bf16)
    quantization: str | None = None

    def __post_init__(self):
        if not self.model:
            raise ConfigError("--model is required")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"--quantization {self.quantization}: choose from "
                              f"{', '.join(QUANTIZATIONS)}")
        if self.max_dynamic_patch is not None and not 1 <= self.max_dynamic_patch <= 40:
            raise ConfigError("--max-dynamic-patch must be between 1 and 40")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
        if self.max_model_len < 256:
            raise ConfigError("--max-model-len must be >= 256")
        if self.kv_cache_gb is not None and not (math.isfinite(self.kv_cache_gb)
                                                 and self.kv_cache_gb > 0):
            raise ConfigError("--kv-cache-gb must be a number > 0")
        if self.mm_cache_gb is not None and not (math.isfinite(self.mm_cache_gb)
                                                 and self.mm_cache_gb >= 0):
            raise ConfigError("--mm-cache-gb must be a number >= 0")
        for flag, v in (("--max-num-seqs", self.max_num_seqs),
                        ("--max-num-batched-tokens", self.max_num_batched_tokens)):
            if v is not None and v < 1:
                raise ConfigError(f"{flag} must be >= 1")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype}: choose from {', '.join(DTYPES)}")
        if self.compile and self.enforce_eager:
            raise ConfigError("--compile and --enforce-eager contradict each other")
        check_model_dir(self.model)

    def to_dict(self) -> dict:
        d = asdict(self)
        # off: the keys of existing cache entries stay as they were
        if not d["encoder_cudagraphs"]:
            del d["encoder_cudagraphs"]
        if d["quantization"] is None:
            del d["quantization"]
        return d


def check_model_dir(model: str) -> None:
    """A checkpoint folder must hold a readable config.json: without this check vLLM fails
    minutes later, after the engine started, with a long pydantic traceback."""
    if model.startswith("preset:") or not os.path.isdir(model):
        return  # presets are synthesized; hub ids and missing paths: engine.resolve_model
    cfg = os.path.join(model, "config.json")
    try:
        with open(cfg) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--model {model}: no config.json there; pass a Hugging Face "
                          "checkpoint folder (config.json, tokenizer, weights), a hub id, "
                          "or preset:NAME") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {model}: cannot read config.json ({e})") from None
    if not isinstance(doc, dict) or not (doc.get("model_type") or doc.get("architectures")):
        raise ConfigError(f"--model {model}: config.json names no model_type or architectures")


@dataclass(frozen=True)
class RunConfig:
    source: SourceSpec
    engine: EngineSpec
    output: Path
    prompt: PromptSpec = field(default_factory=PromptSpec)
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    batch_size: int = 256
    num_shards: int = 1
    shard_index: int = 0
    workers: int | None = None  # decode processes; None: planned (sizing.plan_feed)
    # where vLLM renders prompts (tokens, tiles, pixels): "workers", "engine" or "auto"
    # (preprocess.choose)
    preprocess: str = "auto"
    replicas: int | None = None  # vLLM engines sharing the GPU (own frontend each); None: auto
    # More than half the rows failing means the input is wrong (a --data-dir that does not
    # match the annotations, the wrong column), not a few bad files in a crawl, which stays
    # well below: exit 3 rather than publish a shard of error rows as a success.
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    min_rows_for_error_rate: int = 20
    cache_dir: Path = field(default_factory=default_cache_dir)
    progress: bool = True
    overwrite: bool = False  # remove the shard's old rows (under its lock) and start afresh
    wait: bool = False  # wait for another run holding the shard instead of exiting 2

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if self.num_shards < 1:
            raise ConfigError("--num-shards must be >= 1")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"--shard-index {self.shard_index} is outside "
                              f"0..{self.num_shards - 1} (--num-shards {self.num_shards})")
        if self.replicas is not None and not 1 <= self.replicas <= 16:
            raise ConfigError(f"--replicas {self.replicas}: must be between 1 and 16, or auto")
        if self.workers is not None and self.workers < 0:
            raise ConfigError("--workers must be >= 0")
        if self.preprocess not in ("auto", "workers", "engine"):
            raise ConfigError(f"--preprocess {self.preprocess}: choose from auto, workers, "
                              "engine")
        if not 0 <= self.max_error_rate <= 1:
            raise ConfigError("--max-error-rate must be between 0 and 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        d["cache_dir"] = str(self.cache_dir)
        return d


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None:
        return default
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"{name}={v!r} is not a whole number (set by Slurm, or by hand?); "
                          "unset it or pass --num-shards and --shard-index") from None


def shard_from_env(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """Explicit flags win; otherwise a Slurm array task is one shard of the array."""
    tasks_are_shards = os.environ.get("IVB_TASKS_ARE_SHARDS") == "1"
    if num_shards is None:
        num_shards = _env_int("SLURM_ARRAY_TASK_COUNT", 1)
        if tasks_are_shards:
            num_shards *= _env_int("SLURM_NTASKS", 1)
    if shard_index is None:
        shard_index = _env_int("SLURM_ARRAY_TASK_ID", 0)
        if tasks_are_shards:
            # several srun tasks (one per GPU) inside one array task: each is its own shard
            shard_index = shard_index * _env_int("SLURM_NTASKS", 1) + _env_int("SLURM_PROCID", 0)
        if not 0 <= shard_index < num_shards and "SLURM_ARRAY_TASK_ID" in os.environ:
            # the task id is the shard index: --array=1-N leaves shard 0 out and N beyond
            raise ConfigError(
                f"Slurm array task {os.environ['SLURM_ARRAY_TASK_ID']} is shard {shard_index}, "
                f"outside 0..{num_shards - 1} (--num-shards {num_shards}): submit a 0-based "
                f"array (--array=0-{num_shards - 1}), or pass --num-shards for the whole "
                "array when resubmitting some of its tasks")
    return num_shards, shard_index
