"""`run`: caption a dataset shard."""
from __future__ import annotations

from pathlib import Path

import click

from ..config import (DEFAULT_MAX_ERROR_RATE, DEFAULT_PROMPT, EngineSpec, PromptSpec, RunConfig,
                      SamplingSpec, shard_from_env)
from ..sources import SourceSpec, dataset_help
from .common import CACHE_DIR_OPTION, cache_root, engine_options, exit_now, user_errors


def _auto_or_int(what: str):
    """A click callback: 'auto' -> None; a number passes through for RunConfig to check."""
    def parse(ctx, param, value):
        if value in (None, "auto"):
            return None
        try:
            return int(value)
        except ValueError:
            raise click.BadParameter(f"{value!r}: {what} or auto") from None
    return parse


_replicas = _auto_or_int("a number of engines (1-16)")
_workers = _auto_or_int("a number of processes (0: inline)")


def run_command(spec_cls=EngineSpec) -> click.Command:
    """`run`, with one option per engine option of `spec_cls` (tests pass a subclass)."""
    @click.command("run")
    @click.option("--dataset", required=True, help=dataset_help())
    @click.option("--data-dir", help="coco: image directory.")
    @click.option("--annotations", help="coco: captions_*.json (images[] + annotations[]).")
    @click.option("--split", default="train", show_default=True, help="hf: split.")
    @click.option("--image-column", default="image", show_default=True)
    @click.option("--caption-column", default=None, help="hf/parquet: reference captions column.")
    @click.option("--id-column", default=None, help="hf/parquet: id column (default: position).")
    @click.option("--limit", type=int, default=None, help="Only the first N records.")
    @click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
                  help="Output directory (one Parquet + stats.json per shard).")
    @engine_options(spec_cls)
    @CACHE_DIR_OPTION
    @click.option("--prompt", default=DEFAULT_PROMPT, show_default=True)
    @click.option("--system-prompt", default=None)
    @click.option("--max-tokens", type=int, default=64, show_default=True)
    @click.option("--temperature", type=float, default=0.0, show_default=True)
    @click.option("--top-p", type=float, default=1.0, show_default=True)
    @click.option("--ignore-eos", is_flag=True, help="Always decode --max-tokens (benchmarks).")
    @click.option("--batch-size", type=int, default=256, show_default=True,
                  help="Requests per LLM.generate call (also the commit granularity).")
    @click.option("--workers", default="auto", show_default=True, callback=_workers,
                  help="Image-decoding processes (0: decode inline; auto: 4, or the CPUs the "
                       "engines leave when the workers render prompts).")
    @click.option("--preprocess", type=click.Choice(["auto", "workers", "engine"]),
                  default="auto", show_default=True,
                  help="Where vLLM's input processing (tokens, InternVL tiles, pixels) runs: in "
                       "the decode workers, on every core, or in each engine's front process, "
                       "serially (auto: workers on a GPU, engine on CPU).")
    @click.option("--replicas", default="auto", show_default=True, callback=_replicas,
                  help="vLLM engines sharing the GPU, each in its own process: vLLM "
                       "preprocesses images serially per engine, so small models need several "
                       "to fill a GPU (auto: as many as fit in GPU memory and ~3 CPUs each, "
                       "at most 4; 1 on CPU).")
    @click.option("--num-shards", type=int, default=None,
                  help="[default: $SLURM_ARRAY_TASK_COUNT or 1]")
    @click.option("--shard-index", type=int, default=None,
                  help="[default: $SLURM_ARRAY_TASK_ID or 0]")
    @click.option("--max-error-rate", type=float, default=DEFAULT_MAX_ERROR_RATE,
                  show_default=True,
                  help="Exit 3 when more than this fraction of rows fail (checked after 20 "
                       "rows and over the finished shard; 1 accepts any).")
    @click.option("--overwrite", is_flag=True,
                  help="Replace the shard's rows already in --output (e.g. after changing "
                       "--prompt); they are removed once the engines have started.")
    @click.option("--wait", is_flag=True,
                  help="If another run is writing this shard, wait for it instead of exiting 2.")
    @click.option("--no-progress", is_flag=True)
    @click.option("-q", "--quiet", is_flag=True,
                  help="Print only the summary (stdout) and errors: no status lines, no bar.")
    @click.option("-v", "--verbose", is_flag=True,
                  help="Also stream vLLM's and torch's log to the terminal (always in the log "
                       "file OUTPUT/logs/SHARD.log).")
    @click.option("--json", "as_json", is_flag=True,
                  help="The summary on stdout as one JSON object instead of a table.")
    @user_errors
    def run(**kw):
        """Caption a dataset shard and write Parquet + stats.json (resumable)."""
        _run(spec_cls.from_options(kw), kw)
    return run


def _run(engine: EngineSpec, kw: dict):
    import json

    from ..processes.lifeline import become_subreaper, reap_descendants
    from ..console import NORMAL, QUIET, VERBOSE, Console
    from ..pipeline import Terminal, run as run_pipeline
    from .. import STARTED_AT
    from ..sinks import shard_name

    source = SourceSpec.parse(
        kw.pop("dataset"), data_dir=kw.pop("data_dir"), annotations=kw.pop("annotations"),
        split=kw.pop("split"), image_column=kw.pop("image_column"),
        caption_column=kw.pop("caption_column"), id_column=kw.pop("id_column"),
        limit=kw.pop("limit"))
    num_shards, shard_index = shard_from_env(kw.pop("num_shards"), kw.pop("shard_index"))
    cfg = RunConfig(
        source=source, engine=engine, output=Path(kw.pop("output")),
        prompt=PromptSpec(kw.pop("prompt"), kw.pop("system_prompt")),
        # one --seed: the engine's and sampling's
        sampling=SamplingSpec(kw.pop("max_tokens"), kw.pop("temperature"), kw.pop("top_p"),
                              engine.seed, kw.pop("ignore_eos")),
        batch_size=kw.pop("batch_size"), workers=kw.pop("workers"), replicas=kw.pop("replicas"),
        preprocess=kw.pop("preprocess"),
        num_shards=num_shards, shard_index=shard_index,
        max_error_rate=kw.pop("max_error_rate"), cache_dir=cache_root(kw.pop("cache_dir")),
        progress=not kw.pop("no_progress"), overwrite=kw.pop("overwrite"), wait=kw.pop("wait"))
    quiet, verbose, as_json = kw.pop("quiet"), kw.pop("verbose"), kw.pop("as_json")
    if quiet and verbose:
        raise click.UsageError("-q and -v contradict each other: pick one")
    log_path = cfg.output / "logs" / f"{shard_name(cfg.shard_index, cfg.num_shards)}.log"
    with Console(log_path, QUIET if quiet else VERBOSE if verbose else NORMAL) as con:

        def summary(doc: dict, table: str):
            print(json.dumps(doc, sort_keys=True) if as_json else table, file=con.out,
                  flush=True)

        def reap():
            # the command ends when its processes have: a vLLM engine core left running (its
            # fork server stopped by the same signal as we were) would hold the GPU's memory
            reaped = reap_descendants()
            if reaped["left"]:
                con.info(f"{reaped['left']} process(es) of the run were still running after "
                         f"it ended; stopped ({reaped['killed']} killed) {reaped['waited_s']} "
                         "s after")
        term = Terminal(info=con.info, error=con.error, summary=summary, stream=lambda: con.err,
                        quiet=quiet, starting=con.capture, ending=reap)
        become_subreaper()  # before any process starts: orphans below us stay ours
        # the clock starts when this package was imported, not at the process's start in
        # /proc: a `bash -c "... && internvl-batch run"` forked it long before it exec'ed us
        code = run_pipeline(cfg, term=term, started_at=STARTED_AT)
        reap()  # again: a run that stopped before its engines never called `ending`
    exit_now(code)


run = run_command()
