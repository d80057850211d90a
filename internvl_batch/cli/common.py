"""What every command shares: user-error mapping, the engine options, the exit helper.

User errors (ConfigError, SourceError, CacheError, OutputError) print one line and exit 2; no
tracebacks.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import MISSING
from pathlib import Path

import click
from click.core import ParameterSource

from ..config import ConfigError, EngineSpec, Option, default_cache_dir, option_fields
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


CACHE_DIR_OPTION = click.option(
    "--cache-dir", type=click.Path(file_okay=False), default=None,
    help="Compile-cache root [env INTERNVL_BATCH_CACHE; default ~/.cache/internvl-batch].")


def engine_options(spec_cls=EngineSpec, *, only=None, leave_out=(), defaults=None, helps=None):
    """A decorator adding one click option per engine option of `spec_cls` (config.option
    fields, in their order): all of them, or `only` these, less `leave_out`. `defaults` and
    `helps` ({field: value}) let a benchmark keep its own default or help for an option."""
    defaults, helps = defaults or {}, helps or {}
    chosen = [o for o in option_fields(spec_cls)
              if (only is None or o.name in only) and o.name not in leave_out]
    decorators = [_click_option(o, defaults.get(o.name, _cli_default(o)),
                                helps.get(o.name, o.help)) for o in chosen]

    def decorate(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn
    return decorate


def _cli_default(o: Option):
    return o.cli_default if o.default is MISSING else o.default


def _click_option(o: Option, default, help_: str):
    if o.type is bool:
        # --flag/--no-flag shows its default; a lone --flag is off unless given
        return click.option(o.flag, o.name, is_flag=True, default=bool(default),
                            show_default="/" in o.flag, help=help_)
    if o.choices:
        kind = click.Choice(o.choices)
    elif o.minimum is not None:
        kind = (click.IntRange if o.type is int else click.FloatRange)(min=o.minimum)
    else:
        kind = o.type
    return click.option(o.flag, o.name, type=kind, default=default,
                        required=default is None and o.default is MISSING,
                        show_default=default is not None, help=help_)


def engine_option_flags(spec_cls=EngineSpec) -> dict[str, bool]:
    """Every spelling of the engine options (what `run` and `cache warm` share) -> is it a
    flag (takes no value). `slurm submit` sends these from --extra-args to the warm job too."""
    return {s: o.type is bool for o in option_fields(spec_cls) for s in o.spellings}


def given_engine_options(words: list[str], spec_cls=EngineSpec) -> dict:
    """The engine options that `words` (as typed for `run`) give -> {field: value}, parsed
    and checked as `run` parses them; UserError on a bad one."""
    cmd = click.command("run")(engine_options(spec_cls)(lambda **kw: None))
    try:
        ctx = cmd.make_context("run", list(words))
    except click.ClickException as e:
        raise UserError(e.format_message()) from None
    return {k: v for k, v in ctx.params.items()
            if ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE}
