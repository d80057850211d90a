"""What every command shares: user-error mapping, the engine options, the exit helper.

User errors (ConfigError, SourceError, CacheError, OutputError) print one line and exit 2; no
tracebacks.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from ..config import DTYPES, ConfigError, EngineSpec, default_cache_dir
from ..sources import SourceError


class UserError(click.ClickException):
    exit_code = 2


def user_errors(fn):
    """Turn the application's own error types into one-line Click errors."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from ..cache import CacheError
        from ..outputs import OutputError

        try:
            return fn(*a, **kw)
        except (ConfigError, SourceError, CacheError, OutputError) as e:
            raise UserError(str(e)) from None
    return wrapper


def exit_now(code: int):
    """Leave at once: vLLM's engine teardown at interpreter exit can take many seconds or
    hang on CUDA; callers have flushed and renamed everything by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def log(message: str) -> None:
    click.echo(message, err=True)


def own_args(command: str) -> list[str]:
    """This command's own arguments, as typed (for a results file's `command`)."""
    argv = sys.argv[1:]
    return argv[argv.index(command) + 1:] if command in argv else argv


def write_bench_and_exit(doc: dict, write_outputs, results_dir: str) -> None:
    """A one-engine benchmark's ending: its files, then leave at once (the engine is
    already shut down; vLLM's interpreter-exit teardown is slow); exit 1 if incomplete."""
    paths = write_outputs(doc, Path(results_dir))
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()), err=True)
    exit_now(0 if doc.get("complete") else 1)


def cache_root(value) -> Path:
    return Path(value) if value else default_cache_dir()


ENGINE_OPTIONS = [
    click.option("--model", default="preset:tiny", show_default=True,
                 help="Checkpoint dir, hub id, or preset:{tiny,internvl3-1b,internvl3-2b,"
                      "internvl3-8b,internvit-6b}[+weights|+dummy] (synthesized once under the "
                      "cache dir; tiny has random weights, the others dummy unless +weights)."),
    click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
                 help="torch.compile the InternViT encoder (CUDA only; safe warm-up)."),
    click.option("--max-dynamic-patch", type=int, default=None,
                 help="Max tiles per image (default: the checkpoint's, 12 for InternVL3)."),
    click.option("--max-model-len", type=int, default=8192, show_default=True),
    click.option("--max-num-seqs", type=int, default=None),
    click.option("--max-num-batched-tokens", type=int, default=None),
    click.option("--gpu-memory-utilization", type=float, default=None,
                 help="Fraction of GPU memory (on CPU: of RAM for the KV cache)."),
    click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True),
    click.option("--load-format", default=None,
                 help="vLLM load format (default: dummy for synthesized checkpoints "
                      "without weights)."),
    click.option("--enforce-eager", is_flag=True, help="No torch.compile, no CUDA graphs."),
    click.option("--encoder-cudagraphs", is_flag=True,
                 help="GPU: CUDA graphs for the vision encoder (vLLM cudagraph_mm_encoder, "
                      "on vLLM's V1 model runner)."),
    click.option("--quantization", type=click.Choice(["fp8"]), default=None,
                 help="GPU, opt-in: vLLM's online FP8 for the linear layers of InternViT and "
                      "the language model (weights quantized at load, activations per "
                      "token). Captions may differ from bf16's: compare before relying on "
                      "it (bench --variants plain,pipeline,pipeline-fp8)."),
    click.option("--mm-cache-gb", type=click.FloatRange(min=0), default=0.0, show_default=True,
                 help="vLLM's multimodal processor cache per engine, GiB; off by default, as "
                      "every image of a dataset is new (it only helps with repeated images)."),
    click.option("--kv-cache-gb", type=float, default=None,
                 help="Fixed KV cache per engine instead of profiling free memory "
                      "(GPU; default 4 with --replicas > 1)."),
    click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                 help="Compile-cache root [env INTERNVL_BATCH_CACHE; default "
                      "~/.cache/internvl-batch]."),
]


def engine_options(fn):
    for o in reversed(ENGINE_OPTIONS):
        fn = o(fn)
    return fn


def engine_option_flags() -> dict[str, bool]:
    """Every spelling of the engine options (what `run` and `cache warm` share) -> is it a
    flag (takes no value). `slurm submit` sends these from --extra-args to the warm job too."""
    probe = engine_options(lambda: None)  # the decorators collect into __click_params__
    out = {}
    for p in probe.__click_params__:
        for o in [*p.opts, *p.secondary_opts]:
            out[o] = bool(p.is_flag or p.secondary_opts or p.count)
    return out


def make_engine_spec(kw: dict) -> EngineSpec:
    return EngineSpec(
        model=kw.pop("model"), compile=kw.pop("compile_"),
        max_dynamic_patch=kw.pop("max_dynamic_patch"), max_model_len=kw.pop("max_model_len"),
        max_num_seqs=kw.pop("max_num_seqs"), max_num_batched_tokens=kw.pop("max_num_batched_tokens"),
        gpu_memory_utilization=kw.pop("gpu_memory_utilization"), dtype=kw.pop("dtype"),
        load_format=kw.pop("load_format"), enforce_eager=kw.pop("enforce_eager"),
        mm_cache_gb=kw.pop("mm_cache_gb"), kv_cache_gb=kw.pop("kv_cache_gb"),
        encoder_cudagraphs=kw.pop("encoder_cudagraphs", False),
        quantization=kw.pop("quantization", None), seed=kw.get("seed", 0) or 0)
