"""`merge`: check that every shard of an output is complete and combine their stats."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import user_errors


@click.command()
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--compact", type=click.Path(dir_okay=False), default=None,
              help="Also write all shards into this one Parquet file.")
@click.option("--max-error-rate", type=click.FloatRange(0, 1), default=None,
              help="Fail if more than this share of a shard's rows failed [default: the "
                   "rate each shard was run with].")
@user_errors
def merge(output, compact, max_error_rate):
    """Check every shard is complete and combine their stats (exit 1 naming missing shards,
    shards whose files do not agree with their stats, or shards whose failed rows are above
    the error rate; exit 5 if stats.json or the --compact file cannot be written)."""
    from ..merge import merge_output
    from ..sinks import WriteFailed

    try:
        ok, report = merge_output(Path(output), compact=Path(compact) if compact else None,
                                  max_error_rate=max_error_rate)
    except WriteFailed as e:  # a full disk: what was there before is untouched
        click.echo(f"{e}; make room and merge again", err=True)
        sys.exit(5)
    click.echo(report)
    sys.exit(0 if ok else 1)
