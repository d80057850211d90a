"""`internvl-batch bench-ab`: compiled vs eager encoder end to end in one engine fed requests
processed beforehand (`internvl_batch/bench/ab.py`)."""
from __future__ import annotations

import shlex
from dataclasses import fields

import click

from .common import engine_options


@click.command("bench-ab")
@engine_options(
    only=("model", "max_dynamic_patch", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
          "mm_cache_gb", "kv_cache_gb", "gpu_memory_utilization", "seed"),
    defaults={"model": "preset:internvl3-1b"},
    helps={"model": "preset:{internvl3-1b,internvl3-2b,tiny,...}[+weights|+dummy] or a "
                    "checkpoint dir (+weights for a meaningful token agreement).",
           "max_dynamic_patch": "Max tiles per image [default: 1 at 448, the checkpoint's "
                                "at coco].",
           "kv_cache_gb": "GPU: a fixed KV cache instead of profiling free memory.",
           "seed": "Engine seed and generated dataset."})
@click.option("--sizes", type=click.Choice(["448", "coco"]), default="448", show_default=True,
              help="448x448 images (one tile: max_dynamic_patch 1) or COCO's size mix "
                   "(default tiles).")
@click.option("--images", type=int, default=None,
              help="Images per round [default: 1024 at 448, 192 at coco].")
@click.option("--repeats", type=int, default=7, show_default=True,
              help="Timed rounds of the pair (eager, compiled), order alternating.")
@click.option("--warmup-rounds", type=int, default=1, show_default=True,
              help="Untimed rounds of the pair first.")
@click.option("--max-tokens", type=int, default=32, show_default=True,
              help="Output tokens per image (ignore_eos: always exactly this many).")
@click.option("--profile-images", type=int, default=256, show_default=True,
              help="Images of one extra, untimed round per mode under torch.profiler in the "
                   "worker (the encoder's share of GPU kernel time); 0: none.")
@click.option("--same-images", is_flag=True,
              help="Every warm-up and timed round on the same images, processed once before "
                   "the first round (each request still new to the encoder): no untimed "
                   "decoding and processing between rounds (on the H100 at one tile, 14 s "
                   "of each 27 s pair: docs/performance.md).")
@click.option("--engine-core", type=click.Choice(["inline", "process"]), default="inline",
              show_default=True,
              help="vLLM's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0; "
                   "the lower-noise layout) or in its own (vLLM's default: each request's "
                   "pixels are serialized to it inside the clock).")
@click.option("--gc-off/--gc-on", default=True, show_default=True,
              help="Collect garbage before each timed feed and none inside it (inside the "
                   "engine core too with --engine-core inline), or let Python collect "
                   "whenever its thresholds say.")
@click.option("--reuse-compile-cache", is_flag=True,
              help="Use (and fill) the compile cache under --cache-dir instead of a fresh "
                   "temporary one.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where presets are synthesized (and the data generated) [env "
                   "INTERNVL_BATCH_CACHE; default ~/.cache/internvl-batch].")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where the generated images live [default: CACHE_DIR/bench-data].")
@click.option("--results-dir", type=click.Path(file_okay=False), default="results",
              show_default=True)
@click.option("--name", default=None,
              help="RESULTS_DIR/NAME.{json,md,png} [default: ab-<model>-<sizes>].")
def bench_ab(**kw):
    """Compiled vs eager InternViT end to end, where the GPU is the bound.

    One engine (compile_mm_encoder on; eager on CPU, where both modes then run the same
    code). Each round's requests are processed before the clock by the engine's own input
    processor, then handed over with LLMEngine.add_request and stepped to completion. Rounds
    alternate the order (eager-compiled, compiled-eager, ...) and switch the same engine's
    encoder. Reports compiled/eager images/s (median, 95 % interval of the per-round ratios),
    the in-engine encoder gain, the encoder's share of the round, the end-to-end gain Amdahl
    predicts from both, and greedy token agreement. Writes RESULTS_DIR/NAME.json (updated
    after every round), NAME.md and NAME.png.
    """
    from ..bench.ab import ABOptions, default_name
    from ..cache import CacheError
    from ..config import ConfigError
    from .common import UserError, cache_root, own_args, write_bench_and_exit

    try:
        given = {f.name: kw[f.name] for f in fields(ABOptions) if f.name in kw}
        opts = ABOptions(**dict(
            given, cache_dir=str(cache_root(kw["cache_dir"])), work_dir=kw["work_dir"] or "",
            name=kw["name"] or "",
            command="internvl-batch bench-ab " + " ".join(shlex.quote(a) for a in
                                                          own_args("bench-ab"))))
        if not opts.name:
            from dataclasses import replace

            opts = replace(opts, name=default_name(opts))
        doc = _run(opts)
    except (ConfigError, CacheError) as e:
        raise UserError(str(e)) from None
    from ..bench.ab import write_outputs

    write_bench_and_exit(doc, write_outputs, opts.results_dir)


def _run(opts):
    import signal

    from ..bench.ab import Stopped, run

    # a `timeout` around the benchmark (the GPU scripts' per-workload limit) sends SIGTERM:
    # the rounds measured so far are then analysed and written, not lost
    def stop(signum, frame):
        raise Stopped(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)
    return run(opts, log=lambda m: click.echo(m, err=True))
