"""`internvl-batch bench-encoder`: the InternViT encoder alone, eager vs compiled vs compiled +
encoder CUDA graphs, inside a real vLLM engine (`internvl_batch/bench/encoder.py`)."""
from __future__ import annotations

import shlex

import click

from .common import engine_options


@click.command("bench-encoder")
@engine_options(only=("model", "seed", "kv_cache_gb"),
                defaults={"model": "preset:internvl3-1b", "kv_cache_gb": 1.0},
                helps={"model": "preset:{internvl3-1b,internvl3-2b,internvit-6b,tiny,...} or a "
                                "checkpoint dir.",
                       "seed": "Seed of the engine, the re-initialised weights and the inputs.",
                       "kv_cache_gb": "GPU: fixed KV cache, so the rest of the memory is free "
                                      "for large batches."})
@click.option("--batches", default="1,2,4,8,13,32,64,128", show_default=True,
              help="Tiles per encoder call, comma list.")
@click.option("--repeats", type=int, default=30, show_default=True,
              help="Timed calls per mode and batch (interleaved rounds).")
@click.option("--warmup", type=int, default=5, show_default=True,
              help="Untimed calls per mode and batch first.")
@click.option("--modes", default="auto", show_default=True,
              help="auto (GPU: eager,compiled,cudagraph; CPU: eager) or a comma list of eager, "
                   "compiled, cudagraph. Eager always runs: it is the baseline.")
@click.option("--cudagraph-budgets", type=click.Choice(["exact", "auto"]), default="exact",
              show_default=True,
              help="Encoder CUDA graph token budgets: one per measured batch (exact), or "
                   "vLLM's power-of-two default (auto).")
@click.option("--evidence-batches", default="1,13", show_default=True,
              help="Batches at which each mode's code path is traced (layer calls, counters).")
@click.option("--profile-batches", default="1,13", show_default=True,
              help="Batches whose GPU kernels are profiled per mode ('' for none; GPU only).")
@click.option("--init-std", type=float, default=0.02, show_default=True,
              help="Std of the re-initialised weight matrices.")
@click.option("--layer-scale", type=float, default=0.1, show_default=True,
              help="Value of the re-initialised layer scale ls1/ls2.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where presets are synthesized [env INTERNVL_BATCH_CACHE; default "
                   "~/.cache/internvl-batch]. Compile caches are always fresh.")
@click.option("--results-dir", type=click.Path(file_okay=False), default="results",
              show_default=True)
@click.option("--name", default=None, help="RESULTS_DIR/NAME.{json,md,png} [default: "
                                           "encoder-<model>].")
def bench_encoder(**kw):
    """Time the InternViT forward vLLM runs: eager, compiled, compiled + CUDA graphs.

    One in-process engine; per tile batch: agreement with eager, warm-up, interleaved timed
    rounds (CUDA events), median and 95 % interval, speed-up vs eager; plus which code path
    each mode took (encoder-layer calls, dynamo and vLLM compile counters, GPU kernels).
    Writes RESULTS_DIR/NAME.json (updated as it goes), NAME.md and NAME.png.

    vLLM 0.26 runs InternVL on its V2 model runner by default, which has no encoder CUDA
    graphs (it ignores cudagraph_mm_encoder): set VLLM_USE_V2_MODEL_RUNNER=0 to measure the
    cudagraph mode. The result records which runner ran.
    """
    from ..bench.encoder import EncoderBenchOptions, parse_ints, parse_modes
    from ..config import ConfigError
    from .common import UserError, cache_root, own_args, write_bench_and_exit

    try:
        opts = EncoderBenchOptions(
            model=kw["model"], batches=parse_ints(kw["batches"], "--batches"),
            repeats=kw["repeats"], warmup=kw["warmup"], modes=parse_modes(kw["modes"]),
            cudagraph_budgets=kw["cudagraph_budgets"],
            evidence_batches=parse_ints(kw["evidence_batches"], "--evidence-batches"),
            profile_batches=parse_ints(kw["profile_batches"], "--profile-batches"),
            seed=kw["seed"], init_std=kw["init_std"], layer_scale=kw["layer_scale"],
            kv_cache_gb=kw["kv_cache_gb"], cache_dir=str(cache_root(kw["cache_dir"])),
            results_dir=kw["results_dir"], name=kw["name"] or "",
            command="internvl-batch bench-encoder " + " ".join(shlex.quote(a) for a in
                                                                 own_args("bench-encoder")))
        doc = _run(opts)
    except ConfigError as e:
        raise UserError(str(e)) from None
    from ..bench.encoder import write_outputs

    write_bench_and_exit(doc, write_outputs, opts.results_dir)


def _run(opts):
    from ..bench.encoder import run

    return run(opts, log=lambda m: click.echo(m, err=True))
