"""`model synth` and `data coco-synth`: generated checkpoints and datasets."""
from __future__ import annotations

from contextlib import contextmanager

import click

from ..checkpoint import PRESETS


@contextmanager
def _writing(out: str):
    """An --out that cannot be written (read-only, full, under a file): one line, exit 2."""
    try:
        yield
    except OSError as e:
        err = click.ClickException(f"cannot write {out}: {e.strerror or e}")
        err.exit_code = 2
        raise err from None


@click.group()
def model():
    """Synthesized InternVL checkpoints (real shapes; random or dummy weights)."""


@model.command("synth")
@click.option("--preset", required=True,
              type=click.Choice(list(PRESETS)))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--weights", is_flag=True,
              help="Also write random model.safetensors at trained-like scales (outputs then "
                   "depend on the image; 1B: ~2 GB), instead of relying on dummy weights.")
def model_synth(preset, out, weights):
    """Write a loadable InternVL checkpoint directory."""
    from ..checkpoint import synthesize

    with _writing(out):
        path = synthesize(preset, out, weights=weights)
    fmt = "auto" if weights else "dummy"
    click.echo(f"wrote {preset} to {path} (vLLM: trust_remote_code=True, load_format='{fmt}')")


@click.group()
def data():
    """Generated datasets for benchmarks and tests."""


@data.command("coco-synth")
@click.option("--n", type=click.IntRange(min=1), required=True, help="Number of images.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--sizes", type=click.Choice(["coco", "448"]), default="coco", show_default=True,
              help="COCO's size mix, or 448x448 only (one tile per image).")
def data_coco_synth(n, out, seed, sizes):
    """Write N generated JPEGs and a COCO captions file."""
    from ..synthdata import COCO_SIZES, SQUARE_448, make_coco

    with _writing(out):
        images, ann = make_coco(out, n, seed=seed,
                                sizes=COCO_SIZES if sizes == "coco" else SQUARE_448)
    click.echo(f"--dataset coco --data-dir {images} --annotations {ann}")
