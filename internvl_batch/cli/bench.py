"""`bench`: the benchmark wing's command (`internvl_batch.bench`)."""
from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

import click

from ..bench import VARIANTS
from .common import cache_root, engine_options, exit_now, log, user_errors


def _variants(ctx, param, value):
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in VARIANTS]
    if bad or not items:
        raise click.BadParameter(f"{','.join(bad) or value!r}: choose from {','.join(VARIANTS)}")
    return list(dict.fromkeys(items))


def _command_line() -> str:
    """This command as typed, for the results file."""
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        return "internvl-batch bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    return " ".join(map(shlex.quote, sys.argv))


@click.command()
@engine_options(
    only=("model", "max_dynamic_patch", "gpu_memory_utilization", "encoder_cudagraphs"),
    defaults={"model": "preset:internvl3-1b"},
    helps={"model": "preset:{tiny,internvl3-1b,internvl3-2b,internvl3-8b} or a checkpoint dir.",
           "max_dynamic_patch": "Max tiles per image [default: the checkpoint's].",
           "gpu_memory_utilization": "Per engine [default: 0.9/len(variants) - 0.03 on GPU, "
                                     "0.1 on CPU].",
           "encoder_cudagraphs": "pipeline variant: vLLM's encoder CUDA graphs (run "
                                 "--encoder-cudagraphs)."})
@click.option("--images", type=click.IntRange(1), default=512, show_default=True,
              help="Images per timed repeat (each repeat gets its own images).")
@click.option("--sizes", type=click.Choice(["coco", "448"]), default="coco", show_default=True,
              help="COCO's size mix, or 448x448 only.")
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True,
              help="Output tokens per request (ignore_eos: always exactly this many).")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--warmup-images", type=click.IntRange(0), default=64, show_default=True)
@click.option("--variants", default="eager,compiled,plain,pipeline", show_default=True,
              callback=_variants,
              help="Comma list of eager, compiled, plain, pipeline, pipeline-fp8 (the run "
                   "path with --quantization fp8; GPU).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Compile-cache root (also holds presets and, by default, the data).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where the generated dataset lives [default: CACHE_DIR/bench-data].")
@click.option("--name", default=None, help="results/<name>.json and .md [default: from the config].")
@click.option("--results-dir", type=click.Path(file_okay=False), default="results",
              show_default=True)
@click.option("--pipeline-engine", type=click.Choice(["auto", "compiled", "eager"]),
              default="auto", show_default=True,
              help="Encoder of the pipeline variant (auto: compiled on GPU, eager on CPU).")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True,
              help="pipeline variant: requests per LLM.generate call.")
@click.option("--workers", type=click.IntRange(0), default=4, show_default=True,
              help="pipeline variant: decode processes.")
@click.option("--replicas", type=click.IntRange(1, 16), default=1, show_default=True,
              help="pipeline variant: vLLM engines sharing the GPU (run --replicas).")
@click.option("--cpu-ok", is_flag=True,
              help="Run without a GPU: drop `compiled` and `pipeline-fp8` with a note "
                   "instead of refusing.")
def bench(**kw):
    """Benchmark compiled vs eager encoder and internvl-batch vs a plain vLLM script.

    Each variant runs in its own process with its own engine; repeats are interleaved
    after a warm-up; results go to RESULTS_DIR/NAME.json and NAME.md.
    """
    _run_bench(kw)


@user_errors
def _run_bench(kw: dict):
    from ..bench import BenchFailed, default_name, run_bench, write_results
    from ..bench.report import results_markdown

    kw["cache_dir"] = cache_root(kw["cache_dir"])
    kw["name"] = kw["name"] or default_name(kw["model"], kw["sizes"], kw["max_dynamic_patch"])
    kw["command"] = _command_line()

    def _terminate(signum, frame):  # unwind, so the workers (own groups) are stopped too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        doc = run_bench(kw, log=log)
    except BenchFailed as e:
        raise click.ClickException(str(e)) from None
    jpath, mpath = write_results(doc, Path(kw["results_dir"]))
    click.echo(results_markdown(doc))
    click.echo(f"wrote {jpath} and {mpath}")
    exit_now(0)
