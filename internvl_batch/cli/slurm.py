"""`slurm submit` and `slurm write-jobs`: the Slurm scripts of `internvl_batch.slurm`."""
from __future__ import annotations

import functools
import os
import shlex
from pathlib import Path

import click
from click.core import ParameterSource

from ..config import default_cache_dir
from .common import UserError, engine_option_flags, engine_options, given_engine_options


def slurm_errors(fn):
    """SlurmError -> one line, exit 1 (2 for a value that cannot work), no traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from ..slurm import SlurmError, SlurmUsageError

        try:
            return fn(*a, **kw)
        except SlurmError as e:
            err = click.ClickException(str(e))
            if isinstance(e, SlurmUsageError):
                err.exit_code = 2
            raise err from None
    return wrapper


@click.group()
def slurm():
    """Run on a Slurm cluster: warm-cache job -> caption array -> merge job."""


@slurm.command("submit")
@click.option("--dataset", required=True, help="As for `run`: sample | coco | folder:DIR | ...")
@click.option("--model", required=True, help="Checkpoint dir, hub id or preset:NAME.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Output directory; the scripts and logs go to <output>/slurm/.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Shared compile cache, visible from every node [default: the app's].")
@click.option("--shards", type=click.IntRange(min=1), default=8, show_default=True,
              help="Total number of shards.")
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="Shards per array task, one srun task (GPU) each; array size = "
                   "ceil(shards / this).")
@click.option("--partition", default=None, help="[default: the cluster's default partition]")
@click.option("--time", "time_", default="04:00:00", show_default=True,
              help="Time limit of each caption array task.")
@click.option("--mem", default=None, help="Memory per array task [default: 64G per GPU; "
                                          "8G with --cpu].")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=None,
              help="[default: 8; 2 with --cpu]")
@click.option("--cpu", is_flag=True, help="CPU-only variant: no GPU requests (CI, tests).")
@click.option("--extra-args", default="", help="More `run` options, shell-quoted, e.g. "
              "'--data-dir D --annotations A --max-tokens 32'. Engine options (those below, "
              "from --compile on) may be given here too; they also go to the warm-cache job.")
@engine_options(leave_out=("model",))
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Working directory of the jobs [default: the current one].")
@click.option("--max-running", type=click.IntRange(min=1), default=None,
              help="At most this many array tasks at once (--array=0-N%M).")
@click.option("--sbatch-args", default="", help="Added to every sbatch call, e.g. "
              "'--account=proj --qos=normal'.")
@click.option("--merge-after", type=click.Choice(["afterok", "afterany"]), default="afterok",
              show_default=True, help="afterany: merge even when shards failed, to name them.")
@click.option("--skip-warm", is_flag=True, help="No warm-cache job (the entry exists).")
@click.option("--bin", "bin_", default=None,
              help="internvl-batch executable on the nodes [default: this one].")
@click.option("--activate", default="", help="Shell line run first in each job, e.g. "
              "'source /path/venv/bin/activate'.")
@click.option("--dry-run", is_flag=True, help="Print the scripts and sbatch commands only.")
@slurm_errors
def submit_cmd(output, cache_dir, extra_args, workdir, sbatch_args, merge_after, skip_warm,
               dry_run, **kw):
    """Render warm-cache, caption-array and merge scripts into <output>/slurm/ and submit them,
    chained with afterok dependencies. Prints `warm ID`, `array ID`, `merge ID`."""
    from ..slurm import (SlurmError, sbatch_commands, split_engine_args, submit, submit_plan,
                         write_scripts)

    output = os.path.abspath(os.path.expanduser(output))
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or str(default_cache_dir())))
    workdir = os.path.abspath(workdir or os.getcwd())
    engine_words, run_args = split_engine_args(extra_args, engine_option_flags())
    engine = _engine_spec(kw, shlex.split(engine_words))
    try:
        sbatch_extra = shlex.split(sbatch_args)
    except ValueError as e:
        raise SlurmError(f"--sbatch-args: {e}") from None
    plan = submit_plan(output=output, cache_dir=cache_dir, engine=engine, run_args=run_args,
                       **kw)
    scripts = plan.scripts()
    slurm_dir = Path(output) / "slurm"
    paths = {name: slurm_dir / name for name in scripts}
    cmds = sbatch_commands(paths, plan, workdir, sbatch_extra, merge_after, skip_warm)
    if dry_run:
        for name, text in scripts.items():
            if skip_warm and name == "warm-cache.sbatch":
                continue
            click.echo(f"==> {paths[name]} <==")
            click.echo(text)
        click.echo("# sbatch commands (<warm>, <array>: the ids printed by the earlier ones)")
        for cmd in cmds:
            click.echo(shlex.join(cmd))
        return
    write_scripts(scripts, paths)
    ids = submit(paths, plan, workdir, sbatch_extra, merge_after, skip_warm)
    for name, job_id in ids.items():
        click.echo(f"{name} {job_id}")
    click.echo(f"scripts in {slurm_dir}, logs in {slurm_dir / 'logs'}", err=True)


def _engine_spec(kw: dict, extra_words: list[str]):
    """The engine options of the jobs (popped from kw): those given to `slurm submit` itself
    win over the same ones in --extra-args; both checked as `run` checks them."""
    from ..config import ConfigError, EngineSpec, option_fields
    from ..slurm import SlurmUsageError

    ctx = click.get_current_context()
    try:
        values = given_engine_options(extra_words)
    except UserError as e:
        raise SlurmUsageError(f"--extra-args: {e.message}") from None
    for o in option_fields():
        if o.name in kw and o.name != "model":
            value = kw.pop(o.name)
            if ctx.get_parameter_source(o.name) is ParameterSource.COMMANDLINE:
                values[o.name] = value
    try:
        return EngineSpec.from_options(values, model=kw.pop("model"))
    except ConfigError as e:
        raise SlurmUsageError(str(e)) from None


@slurm.command("write-jobs", hidden=True)
@click.argument("directory", type=click.Path(file_okay=False), default="jobs")
def write_jobs(directory):
    """Write the default GPU scripts (jobs/*.sbatch) from the templates."""
    from ..slurm import write_default_jobs

    for path in write_default_jobs(Path(directory)):
        click.echo(f"wrote {path}")
