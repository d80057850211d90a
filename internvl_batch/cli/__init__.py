"""internvl-batch command line: each command parses flags into typed config and calls a stage.

This package is the only code that imports click; the library below never imports it. One
module per command group; `common` holds what they share. Heavy imports (vllm, torch,
transformers) happen inside commands so `--help` stays instant.
"""
from __future__ import annotations

import click

from .bench import bench
from .bench_ab import bench_ab
from .bench_encoder import bench_encoder
from .cache import cache
from .merge import merge
from .model import data, model
from .run import run
from .show import score, show
from .slurm import slurm


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="internvl-batch")
def cli():
    """Caption image datasets with InternVL models on vLLM.

    \b
    Quick start (CPU, tiny synthesized model, embedded sample photos):
      internvl-batch run --dataset sample --output out/
    """


cli.add_command(run)
cli.add_command(model)
cli.add_command(data)
cli.add_command(cache)
cli.add_command(merge)
cli.add_command(slurm)
cli.add_command(bench)
cli.add_command(bench_encoder)
cli.add_command(bench_ab)
cli.add_command(show)
cli.add_command(score)


def main():
    cli(prog_name="internvl-batch")
