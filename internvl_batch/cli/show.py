"""`show` (an HTML gallery of an output) and `score` (COCO caption metrics)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import UserError, user_errors


@click.command()
@click.argument("output", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="First page's path (default OUTPUT/gallery.html; more pages beside it).")
@click.option("--sample", type=int, default=500, show_default=True,
              help="Captioned rows shown, drawn with --seed (error rows are always shown, "
                   "up to --max-errors).")
@click.option("--all", "all_", is_flag=True, help="Show every row (thumbnails for all of them).")
@click.option("--page-size", type=int, default=100, show_default=True, help="Cards per page file.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--max-errors", type=int, default=200, show_default=True)
@click.option("--image-root", type=click.Path(file_okay=False), default=None,
              help="Folder that relative image paths are under, if the dataset has moved.")
@user_errors
def show(output, out, sample, all_, page_size, seed, max_errors, image_root):
    """Write a static HTML gallery of OUTPUT (images, captions, references, errors by kind)."""
    from ..gallery import GalleryOptions, build
    from ..outputs import open_output

    if sample < 0 or page_size < 1 or max_errors < 0:
        raise UserError("--sample and --max-errors must be >= 0, --page-size >= 1")
    opts = GalleryOptions(sample=None if all_ else sample, page_size=page_size, seed=seed,
                          max_errors=max_errors,
                          image_root=Path(image_root) if image_root else None)
    o = open_output(output)
    if o.note:  # a partial run: shown, but not as if it were all of it
        click.echo(o.note, err=True)
    pages = build(o, Path(out) if out else None, opts, log=lambda s: click.echo(s, err=True))
    more = f" (+{len(pages) - 1} more pages beside it)" if len(pages) > 1 else ""
    click.echo(f"{pages[0]}{more}")


@click.command()
@click.argument("output", type=click.Path())
@click.option("--no-spice", is_flag=True, help="Do not try SPICE.")
@user_errors
def score(output, no_spice):
    """COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE) of OUTPUT's captions
    against its references; writes scores.json beside the output."""
    from .. import scores
    from ..outputs import open_output

    o = open_output(output)
    if o.note:  # scores of part of the run: said before the table
        click.echo(o.note, err=True)
    result = scores.score_output(o, spice=not no_spice)
    path = scores.write(result, o.beside("scores.json"))
    click.echo(result.table())
    click.echo(f"wrote {path}")
