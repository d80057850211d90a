"""Typed, self-validating configuration for a run.

Each stage gets its own frozen dataclass; `__post_init__` rejects nonsense with a message that
says what to do, so bad flags fail before any model is loaded.
"""
from __future__ import annotations

import functools
import json
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
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

# -- engine options: one field each ------------------------------------------------------------
# Every engine option is one EngineSpec field declared with `option()`: its default, its help,
# how the command line spells it and whether it names a compile-cache entry. The click options
# of `run`, `cache warm` and the benchmarks (cli/options.py), the arguments `slurm submit`
# writes into its job scripts (`engine_argv`) and the cache key (cache.key_fields) are all
# generated from these fields, so adding an option is one field plus the code that uses it.

# How an option enters the compile-cache key:
KEY = "key"  # always: it changes what is compiled (graph shapes, dtype, layers)
# only away from its default: entries built before the option existed keep their keys
# (the way to add a new option that changes what is compiled)
KEY_IF_SET = "key-if-set"
NOT_KEY = "not-key"  # changes no compiled artefact (memory sizes, the seed): one entry serves all


def option(default=MISSING, *, help: str, key: str, flag: str | None = None,
           choices: tuple | None = None, minimum: float | None = None, cli_default=None):
    """A dataclass field that is an engine option. `flag`: its spelling when not `--name-with-
    dashes` (e.g. "--compile/--no-compile"); `choices`: the values it accepts; `minimum`: the
    least value the command line accepts; `cli_default`: the command line's default for a
    field that has none (the model)."""
    if key not in (KEY, KEY_IF_SET, NOT_KEY):
        raise ValueError(f"key={key!r}: use KEY, KEY_IF_SET or NOT_KEY")
    meta = {"help": help, "key": key, "flag": flag, "choices": choices, "minimum": minimum,
            "cli_default": cli_default}
    return field(default=default, metadata={"engine_option": meta})


@dataclass(frozen=True)
class Option:
    """One engine option as the generators see it (`option_fields`)."""
    name: str                # the field's
    type: type               # bool, int, float or str (`X | None` -> X)
    default: object          # the field's; MISSING: required
    help: str
    key: str                 # KEY, KEY_IF_SET or NOT_KEY
    flag: str                # "--max-model-len", "--compile/--no-compile"
    choices: tuple | None = None
    minimum: float | None = None
    cli_default: object = None  # the command line's default where the field has none

    @property
    def spellings(self) -> list[str]:
        return self.flag.split("/")


def _base_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def option_fields(cls=None) -> tuple[Option, ...]:
    """The engine options of `cls` (EngineSpec or a subclass), in field order."""
    return _option_fields(cls or EngineSpec)


@functools.cache
def _option_fields(cls) -> tuple[Option, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        meta = f.metadata.get("engine_option")
        if meta is None:
            continue
        out.append(Option(name=f.name, type=_base_type(hints[f.name]), default=f.default,
                          help=meta["help"], key=meta["key"],
                          flag=meta["flag"] or "--" + f.name.replace("_", "-"),
                          choices=meta["choices"], minimum=meta["minimum"],
                          cli_default=meta["cli_default"]))
    return tuple(out)


def engine_argv(spec: "EngineSpec", leave_out: tuple[str, ...] = ("model",)) -> list[str]:
    """The command-line words that give `spec`'s options that differ from their defaults
    (what `slurm submit` writes for `cache warm` and `run`); `leave_out` travel on their own."""
    words: list[str] = []
    for o in option_fields(type(spec)):
        value = getattr(spec, o.name)
        if o.name in leave_out or value == o.default:
            continue
        if o.type is bool:
            spellings = o.spellings
            if value:
                words.append(spellings[0])
            elif len(spellings) > 1:
                words.append(spellings[1])
            else:
                raise ConfigError(f"{o.flag} is on by default and has no spelling to turn it off")
        elif value is None:
            raise ConfigError(f"{o.flag}: its default cannot be unset on the command line")
        else:
            words += [o.spellings[0], str(value)]
    return words


@dataclass(frozen=True)
class EngineSpec:
    model: str = option(
        key=NOT_KEY, cli_default="preset:tiny",  # in the key as the checkpoint's own hash
        help="Checkpoint dir, hub id, or preset:{tiny,internvl3-1b,internvl3-2b,internvl3-8b,"
             "internvl3-14b,internvl3-38b,internvl3-78b,internvit-6b}[+weights|+dummy] "
             "(synthesized once under the cache dir; tiny has random weights, the others "
             "dummy unless +weights).")
    compile: bool = option(
        False, key=KEY, flag="--compile/--no-compile",
        help="torch.compile the InternViT encoder (CUDA only; safe warm-up).")
    max_dynamic_patch: int | None = option(
        None, key=KEY,  # None: the checkpoint's own setting
        help="Max tiles per image (default: the checkpoint's, 12 for InternVL3).")
    max_model_len: int = option(
        8192, key=KEY, help="vLLM's max_model_len: the longest prompt plus output of a request.")
    max_num_seqs: int | None = option(
        None, key=KEY, help="vLLM's max_num_seqs: requests per engine step [default: vLLM's].")
    max_num_batched_tokens: int | None = option(
        None, key=KEY,
        help="vLLM's max_num_batched_tokens: tokens per engine step [default: vLLM's].")
    gpu_memory_utilization: float | None = option(
        None, key=NOT_KEY,  # None: 0.9 on GPU, small on CPU
        help="Fraction of GPU memory (on CPU: of RAM for the KV cache).")
    dtype: str = option("auto", key=KEY, choices=DTYPES,
                        help="vLLM's dtype of weights and activations (auto: the checkpoint's).")
    seed: int = option(0, key=NOT_KEY, help="Seed of the engine and of sampling.")
    load_format: str | None = option(
        None, key=KEY,  # None: "dummy" for weightless synthesized ones, else "auto"
        help="vLLM load format (default: dummy for synthesized checkpoints without weights).")
    enforce_eager: bool = option(False, key=KEY, help="No torch.compile, no CUDA graphs.")
    # vLLM's multimodal processor cache (GiB per engine; None: vLLM's 4). Off by default: a
    # dataset's images are all new, so it never hits and only holds each image's pixels in
    # the engine core (vLLM CPU, 10,200 images: its RSS 0.92 -> 3.56 GB with the cache, flat
    # at 0.68 GB without, and 16 % more images/s, 2 runs each; docs/performance.md)
    mm_cache_gb: float | None = option(
        0.0, key=NOT_KEY, minimum=0,
        help="vLLM's multimodal processor cache per engine, GiB; off by default, as every "
             "image of a dataset is new (it only helps with repeated images).")
    kv_cache_gb: float | None = option(
        None, key=NOT_KEY,
        help="Fixed KV cache per engine instead of profiling free memory (GPU; default 4 "
             "with --replicas > 1).")
    # vLLM's encoder CUDA graphs (`cudagraph_mm_encoder`); vLLM 0.26 honours it only on its V1
    # model runner, which Engine.start selects (VLLM_USE_V2_MODEL_RUNNER=0) when this is set
    encoder_cudagraphs: bool = option(
        False, key=KEY_IF_SET,
        help="GPU: CUDA graphs for the vision encoder (vLLM cudagraph_mm_encoder, on vLLM's "
             "V1 model runner).")
    # vLLM's online quantization of the checkpoint's linear layers at load (None: none). "fp8":
    # weights to FP8 per tensor, activations scaled per token as they come; vLLM passes the
    # config to InternViT and to the language model (the projector, plain nn.Linear, stays bf16)
    quantization: str | None = option(
        None, key=KEY_IF_SET, choices=QUANTIZATIONS,
        help="GPU, opt-in: vLLM's online FP8 for the linear layers of InternViT and the "
             "language model (weights quantized at load, activations per token). Captions "
             "may differ from bf16's: compare before relying on it (bench --variants "
             "plain,pipeline,pipeline-fp8).")
    # How one engine is split over devices. Part of the key (the compiled graphs are each
    # rank's shard), but only away from 1, so entries built before the options existed keep
    # their keys
    tensor_parallel_size: int = option(
        1, key=KEY_IF_SET, minimum=1,
        help="GPUs one engine spans, each holding a slice of every layer (vLLM tensor "
             "parallel); for models whose weights do not fit one GPU (InternVL3-38B on 80 GB "
             "cards: 2). On CPU: one rank per core.")
    # vLLM 0.26's InternVLChatModel and its Qwen2 language model implement SupportsPP. Every
    # stage builds (and holds) the whole vision encoder; only the first runs it
    # (gpu_model_runner: is_first_rank), so InternViT-6B's work is not split
    pipeline_parallel_size: int = option(
        1, key=KEY_IF_SET, minimum=1,
        help="GPUs one engine's language-model layers are split over, in stages (vLLM "
             "pipeline parallel; each stage holds the whole vision encoder, the first runs "
             "it). Within one node --tensor-parallel-size splits the encoder's work too.")

    @property
    def gpus_per_engine(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def __post_init__(self):
        if not self.model:
            raise ConfigError("--model is required")
        for o in option_fields(type(self)):
            value = getattr(self, o.name)
            if o.choices and value is not None and value not in o.choices:
                raise ConfigError(f"{o.spellings[0]} {value}: choose from "
                                  f"{', '.join(o.choices)}")
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
        for flag, v in (("--tensor-parallel-size", self.tensor_parallel_size),
                        ("--pipeline-parallel-size", self.pipeline_parallel_size)):
            if v < 1:
                raise ConfigError(f"{flag} must be >= 1")
        if self.compile and self.enforce_eager:
            raise ConfigError("--compile and --enforce-eager contradict each other")
        check_model_dir(self.model)

    @classmethod
    def from_options(cls, values: Mapping, **overrides) -> "EngineSpec":
        """The spec of the engine options among `values` (a command's parsed options, a
        benchmark's settings; other keys are ignored), then `overrides`."""
        names = {o.name for o in option_fields(cls)}
        return cls(**{**{k: v for k, v in values.items() if k in names}, **overrides})

    def to_dict(self) -> dict:
        """The fields, less the KEY_IF_SET options at their defaults (as entries and results
        written before those options existed have them)."""
        d = asdict(self)
        for o in option_fields(type(self)):
            if o.key == KEY_IF_SET and d[o.name] == o.default:
                del d[o.name]
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
