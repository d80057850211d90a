"""`cache warm | ls | verify | clear`: the shared compile cache."""
from __future__ import annotations

import click

from ..config import ConfigError, EngineSpec
from .common import CACHE_DIR_OPTION, cache_root, engine_options, exit_now, log, user_errors


@click.group()
def cache():
    """The shared compile cache (one entry per software/GPU/model/settings)."""


@cache.command("warm")
@engine_options()
@CACHE_DIR_OPTION
@click.option("--naive", is_flag=True, hidden=True,
              help="Trace the encoder on one tile first (builds a poisoned entry; tests only).")
@user_errors
def cache_warm(naive, **kw):
    """Build the entry for a model/config and exit (what a Slurm warm-up job runs)."""
    from ..cache import CompileCache

    cc = CompileCache(cache_root(kw.pop("cache_dir")))
    engine, entry = cc.start_engine(EngineSpec.from_options(kw), log=log, naive=naive)
    t = engine.timings
    click.echo(f"{'hit' if entry.hit else 'built'} {entry.key} init {t.total_s:.1f}s "
               f"(load {t.load_s}, compile {t.compile_s}, cudagraph {t.cudagraph_s})")
    engine.close()
    exit_now(0)


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
        state = "complete" if e.complete else "building" if cc.is_locked(e.key) else "incomplete"
        try:
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.manifest_path.stat().st_mtime))
        except OSError:
            used = "-"
        click.echo(f"{e.key:<64} {dir_size(e.path) / 2**20:>7.1f}MB {state:<10} {used:<19}")


@cache.command("verify")
@engine_options()
@CACHE_DIR_OPTION
@user_errors
def cache_verify(**kw):
    """Load the entry and check its compiled encoder against eager, in the same engine."""
    from ..cache import CacheError, CompileCache, summarize_check

    cc = CompileCache(cache_root(kw.pop("cache_dir")))
    spec = cc.resolve(EngineSpec.from_options(kw))
    entry = cc.entry(spec)
    if not entry.complete:
        raise CacheError(f"no complete entry {entry.key}; run `internvl-batch cache warm` first")
    engine, entry = cc.start_engine(spec, log=log)
    check = engine.encoder_check()
    click.echo(f"{entry.key}: {'OK' if check['ok'] else 'MISMATCH'} {summarize_check(check)}")
    engine.close()
    if not check["ok"]:
        moved = entry.quarantine(f"cache verify failed: {check}")
        click.echo(f"moved to {moved}", err=True)
    exit_now(0 if check["ok"] else 1)


def parse_age(value: str) -> float:
    """'7d', '12h', '30m', '45s' -> seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    try:
        secs = float(value[:-1]) * units[value[-1]]
    except (KeyError, ValueError, IndexError):
        raise ConfigError(f"--older-than {value!r}: use a number and d/h/m/s, e.g. 7d")
    if not secs > 0:  # also rejects nan
        raise ConfigError("--older-than must be positive, e.g. 7d")
    return secs


@cache.command("clear")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
@click.option("--older-than", default=None, help="Only entries unused for this long: 7d, 12h, 30m.")
@user_errors
def cache_clear(cache_dir, older_than):
    """Remove entries (all, or those unused for --older-than)."""
    from ..cache import CompileCache

    secs = None if older_than is None else parse_age(older_than)
    removed = CompileCache(cache_root(cache_dir)).clear(secs)
    click.echo(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}")
    for k in removed:
        click.echo(f"  {k}")
