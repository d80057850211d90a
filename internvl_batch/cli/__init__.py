"""internvl-batch command line: each command parses flags into typed config and calls a stage.

Heavy imports (vllm, torch, transformers) happen inside commands so `--help` stays instant.
User errors (ConfigError, SourceError, CacheError) print one line and exit 2; no tracebacks.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from ..config import (DEFAULT_PROMPT, ConfigError, EngineSpec, PromptSpec, RunConfig,
                     SamplingSpec, default_cache_dir, shard_from_env)
from ..sources import SourceError, SourceSpec


class UserError(click.ClickException):
    exit_code = 2


def user_errors(fn):
    """Turn the application's own error types into one-line Click errors."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from ..cache import CacheError

        try:
            return fn(*a, **kw)
        except (ConfigError, SourceError, CacheError) as e:
            raise UserError(str(e)) from None
    return wrapper


def engine_options(fn):
    opts = [
        click.option("--model", default="preset:tiny", show_default=True,
                     help="Checkpoint dir, hub id, or preset:{tiny,internvl3-1b,internvl3-2b,"
                          "internvl3-8b}[+weights|+dummy] (synthesized once under the cache dir; "
                          "tiny has random weights, the others dummy unless +weights)."),
        click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
                     help="torch.compile the InternViT encoder (CUDA only; safe warm-up)."),
        click.option("--max-dynamic-patch", type=int, default=None,
                     help="Max tiles per image (default: the checkpoint's, 12 for InternVL3)."),
        click.option("--max-model-len", type=int, default=8192, show_default=True),
        click.option("--max-num-seqs", type=int, default=None),
        click.option("--max-num-batched-tokens", type=int, default=None),
        click.option("--gpu-memory-utilization", type=float, default=None,
                     help="Fraction of GPU memory (on CPU: of RAM for the KV cache)."),
        click.option("--dtype", default="auto", show_default=True),
        click.option("--load-format", default=None,
                     help="vLLM load format (default: dummy for synthesized checkpoints "
                          "without weights)."),
        click.option("--enforce-eager", is_flag=True, help="No torch.compile, no CUDA graphs."),
        click.option("--mm-cache-gb", type=float, default=None,
                     help="vLLM multimodal processor cache size (0: off)."),
        click.option("--kv-cache-gb", type=float, default=None,
                     help="Fixed KV cache per engine instead of profiling free memory "
                          "(GPU; default 4 with --replicas > 1)."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Compile-cache root [env INTERNVL_BATCH_CACHE; default "
                          "~/.cache/internvl-batch]."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def make_engine_spec(kw: dict) -> EngineSpec:
    return EngineSpec(
        model=kw.pop("model"), compile=kw.pop("compile_"),
        max_dynamic_patch=kw.pop("max_dynamic_patch"), max_model_len=kw.pop("max_model_len"),
        max_num_seqs=kw.pop("max_num_seqs"), max_num_batched_tokens=kw.pop("max_num_batched_tokens"),
        gpu_memory_utilization=kw.pop("gpu_memory_utilization"), dtype=kw.pop("dtype"),
        load_format=kw.pop("load_format"), enforce_eager=kw.pop("enforce_eager"),
        mm_cache_gb=kw.pop("mm_cache_gb"), kv_cache_gb=kw.pop("kv_cache_gb"), seed=kw.get("seed", 0) or 0)


def _replicas(ctx, param, value):
    """'auto' -> None; a number passes through for RunConfig to range-check."""
    if value in (None, "auto"):
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: a number of engines (1-16) or auto") from None


def cache_root(value) -> Path:
    return Path(value) if value else default_cache_dir()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="internvl-batch")
def cli():
    """Caption image datasets with InternVL models on vLLM.

    \b
    Quick start (CPU, tiny synthesized model, embedded sample photos):
      internvl-batch run --dataset sample --output out/
    """


# -- run ------------------------------------------------------------------------------------

@cli.command()
@click.option("--dataset", required=True,
              help="sample | coco | folder:DIR | parquet:GLOB | hf:NAME_OR_PATH")
@click.option("--data-dir", help="coco: image directory.")
@click.option("--annotations", help="coco: captions_*.json (images[] + annotations[]).")
@click.option("--split", default="train", show_default=True, help="hf: split.")
@click.option("--image-column", default="image", show_default=True)
@click.option("--caption-column", default=None, help="hf/parquet: reference captions column.")
@click.option("--id-column", default=None, help="hf/parquet: id column (default: position).")
@click.option("--limit", type=int, default=None, help="Only the first N records.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Output directory (one Parquet + stats.json per shard).")
@engine_options
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True)
@click.option("--system-prompt", default=None)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ignore-eos", is_flag=True, help="Always decode --max-tokens (benchmarks).")
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Requests per LLM.generate call (also the commit granularity).")
@click.option("--workers", type=int, default=4, show_default=True,
              help="Image-decoding processes (0: decode inline).")
@click.option("--replicas", default="auto", show_default=True, callback=_replicas,
              help="vLLM engines sharing the GPU, each in its own process: vLLM preprocesses "
                   "images serially per engine, so small models need several to fill a GPU "
                   "(auto: as many as fit in GPU memory and ~3 CPUs each, at most 4; 1 on CPU).")
@click.option("--num-shards", type=int, default=None,
              help="[default: $SLURM_ARRAY_TASK_COUNT or 1]")
@click.option("--shard-index", type=int, default=None,
              help="[default: $SLURM_ARRAY_TASK_ID or 0]")
@click.option("--max-error-rate", type=float, default=1.0, show_default=True,
              help="Stop (exit 3) when more than this fraction of rows fail.")
@click.option("--no-progress", is_flag=True)
@user_errors
def run(**kw):
    """Caption a dataset shard and write Parquet + stats.json (resumable)."""
    from ..pipeline import run as run_pipeline

    source = SourceSpec.parse(
        kw.pop("dataset"), data_dir=kw.pop("data_dir"), annotations=kw.pop("annotations"),
        split=kw.pop("split"), image_column=kw.pop("image_column"),
        caption_column=kw.pop("caption_column"), id_column=kw.pop("id_column"),
        limit=kw.pop("limit"))
    num_shards, shard_index = shard_from_env(kw.pop("num_shards"), kw.pop("shard_index"))
    cfg = RunConfig(
        source=source, engine=make_engine_spec(kw), output=Path(kw.pop("output")),
        prompt=PromptSpec(kw.pop("prompt"), kw.pop("system_prompt")),
        sampling=SamplingSpec(kw.pop("max_tokens"), kw.pop("temperature"), kw.pop("top_p"),
                              kw.pop("seed"), kw.pop("ignore_eos")),
        batch_size=kw.pop("batch_size"), workers=kw.pop("workers"), replicas=kw.pop("replicas"),
        num_shards=num_shards, shard_index=shard_index,
        max_error_rate=kw.pop("max_error_rate"), cache_dir=cache_root(kw.pop("cache_dir")),
        progress=not kw.pop("no_progress"))
    code = run_pipeline(cfg, log=lambda m: click.echo(m, err=True))
    _exit(code)


def _exit(code: int):
    # vLLM's engine teardown at interpreter exit can take many seconds or hang on CUDA;
    # everything is flushed and renamed by now, so leave at once
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@cli.command("replica", hidden=True)
@click.argument("config_path")
def replica(config_path):
    """One engine of `run --replicas N` (started by the parent, talks over pipes)."""
    from ..replicas import main as replica_main

    _exit(replica_main(config_path))


# -- model ----------------------------------------------------------------------------------

@cli.group()
def model():
    """Synthesized InternVL checkpoints (real shapes, no weights)."""


@model.command("synth")
@click.option("--preset", required=True,
              type=click.Choice(["tiny", "internvl3-1b", "internvl3-2b", "internvl3-8b"]))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--weights", is_flag=True,
              help="Also write random model.safetensors at trained-like scales (outputs then "
                   "depend on the image; 1B: ~2 GB), instead of relying on dummy weights.")
def model_synth(preset, out, weights):
    """Write a loadable InternVL checkpoint directory."""
    from ..checkpoint import synthesize

    path = synthesize(preset, out, weights=weights)
    fmt = "auto" if weights else "dummy"
    click.echo(f"wrote {preset} to {path} (vLLM: trust_remote_code=True, load_format='{fmt}')")


# -- data -----------------------------------------------------------------------------------

@cli.group()
def data():
    """Generated datasets for benchmarks and tests."""


@data.command("coco-synth")
@click.option("--n", type=int, required=True, help="Number of images.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sizes", type=click.Choice(["coco", "448"]), default="coco", show_default=True,
              help="COCO's size mix, or 448x448 only (one tile per image).")
def data_coco_synth(n, out, seed, sizes):
    """Write N generated JPEGs and a COCO captions file."""
    from ..synthdata import COCO_SIZES, SQUARE_448, make_coco

    images, ann = make_coco(out, n, seed=seed, sizes=COCO_SIZES if sizes == "coco" else SQUARE_448)
    click.echo(f"--dataset coco --data-dir {images} --annotations {ann}")


# -- cache ----------------------------------------------------------------------------------

@cli.group()
def cache():
    """The shared compile cache (one entry per software/GPU/model/settings)."""


@cache.command("warm")
@engine_options
@click.option("--naive", is_flag=True, hidden=True,
              help="Trace the encoder on one tile first (builds a poisoned entry; tests only).")
@user_errors
def cache_warm(naive, **kw):
    """Build the entry for a model/config and exit (what a Slurm warm-up job runs)."""
    from ..cache import CompileCache

    cc = CompileCache(cache_root(kw.pop("cache_dir")))
    engine, entry = cc.start_engine(make_engine_spec(kw), log=lambda m: click.echo(m, err=True),
                                    naive=naive)
    t = engine.timings
    click.echo(f"{'hit' if entry.hit else 'built'} {entry.key} init {t.total_s:.1f}s "
               f"(load {t.load_s}, compile {t.compile_s}, cudagraph {t.cudagraph_s})")
    engine.close()
    _exit(0)


@cache.command("ls")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
def cache_ls(cache_dir):
    """List entries: key, size, state, model, GPU, last used."""
    import time

    from ..cache import CompileCache, dir_size

    cc = CompileCache(cache_root(cache_dir))
    entries = cc.entries()
    if not entries:
        click.echo(f"no entries in {cc.root}")
        return
    click.echo(f"{'KEY':<64} {'SIZE':>9} {'STATE':<10} {'LAST USED':<19}")
    for e in entries:
        state = "complete" if e.complete else "building" if _locked(cc, e.key) else "incomplete"
        try:
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.manifest_path.stat().st_mtime))
        except OSError:
            used = "-"
        click.echo(f"{e.key:<64} {dir_size(e.path) / 2**20:>7.1f}MB {state:<10} {used:<19}")


def _locked(cc, key) -> bool:
    import fcntl

    p = cc.root / "locks" / f"{key}.lock"
    if not p.exists():
        return False
    with open(p) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True


@cache.command("verify")
@engine_options
@user_errors
def cache_verify(**kw):
    """Load the entry and check compiled outputs against eager on the fixed probe."""
    from ..cache import CacheError, CompileCache, compare_probe, run_probe

    cc = CompileCache(cache_root(kw.pop("cache_dir")))
    spec = cc.resolve(make_engine_spec(kw))
    entry = cc.entry(spec)
    if not entry.complete:
        raise CacheError(f"no complete entry {entry.key}; run `internvl-batch cache warm` first")
    ref = cc.reference(spec, log=lambda m: click.echo(m, err=True))
    engine, entry = cc.start_engine(spec, log=lambda m: click.echo(m, err=True))
    check = compare_probe(ref, run_probe(engine))
    click.echo(f"{entry.key}: {'OK' if check['ok'] else 'MISMATCH'} "
               f"first-token agreement {check['first_token_agreement']:.0%}, "
               f"mean |dlogprob| {check['mean_abs_logprob_diff']}")
    engine.close()
    if not check["ok"]:
        moved = entry.quarantine(f"cache verify failed: {check}")
        click.echo(f"moved to {moved}", err=True)
    _exit(0 if check["ok"] else 1)


@cache.command("clear")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
@click.option("--older-than", default=None, help="Only entries unused for this long: 7d, 12h, 30m.")
@user_errors
def cache_clear(cache_dir, older_than):
    """Remove entries (all, or those unused for --older-than)."""
    from ..cache import CompileCache

    secs = None
    if older_than is not None:
        units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
        try:
            secs = float(older_than[:-1]) * units[older_than[-1]]
        except (KeyError, ValueError, IndexError):
            raise ConfigError(f"--older-than {older_than!r}: use a number and d/h/m/s, e.g. 7d")
        if not secs > 0:  # also rejects nan
            raise ConfigError("--older-than must be positive, e.g. 7d")
    removed = CompileCache(cache_root(cache_dir)).clear(secs)
    click.echo(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}")
    for k in removed:
        click.echo(f"  {k}")


# -- merge ----------------------------------------------------------------------------------

@cli.command()
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--compact", type=click.Path(dir_okay=False), default=None,
              help="Also write all shards into this one Parquet file.")
@user_errors
def merge(output, compact):
    """Check every shard is complete and combine their stats (exit 1 naming missing shards)."""
    from ..merge import merge_output

    ok, report = merge_output(Path(output), compact=Path(compact) if compact else None)
    click.echo(report)
    sys.exit(0 if ok else 1)


def _register_subcommands():
    from ..bench import bench
    from ..slurm import slurm

    cli.add_command(slurm)
    cli.add_command(bench)


_register_subcommands()


def main():
    cli(prog_name="internvl-batch")
