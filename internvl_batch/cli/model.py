"""`model synth` and `data coco-synth`: generated checkpoints and datasets."""
from __future__ import annotations

import click


@click.group()
def model():
    """Synthesized InternVL checkpoints (real shapes, no weights)."""


@model.command("synth")
@click.option("--preset", required=True,
              type=click.Choice(["tiny", "internvl3-1b", "internvl3-2b", "internvl3-8b"]))
@click.option("--out", required=True, type=click.Path(file_okay=False))
def model_synth(preset, out):
    """Write a loadable InternVL checkpoint directory (load with dummy weights)."""
    from ..checkpoint import synthesize

    path = synthesize(preset, out)
    click.echo(f"wrote {preset} to {path} (vLLM: trust_remote_code=True, load_format='dummy')")


@click.group()
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
