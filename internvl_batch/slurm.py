"""Slurm: render the sbatch scripts from templates and submit warm-cache -> caption array -> merge.

The scripts live as templates in `internvl_batch/templates/` with `@@NAME@@` markers (bash
uses `$` and `{}` itself). `jobs/*.sbatch` in the repository are the templates rendered with
the GPU defaults (`internvl-batch slurm write-jobs jobs/`); a test keeps them equal.

`internvl-batch slurm submit` renders the three scripts for one run into `<output>/slurm/`
and submits them with `sbatch --parsable`, chained with `--dependency=afterok`.

Only the standard library is imported here: no vllm, no torch; the commands are in
`cli/slurm.py`.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from .config import EngineSpec, default_cache_dir, default_cache_dir_shell, engine_argv

MARKER = re.compile(r"@@([A-Z_]+)@@")
SCRIPTS = ("warm-cache.sbatch", "caption-array.sbatch", "merge.sbatch")
# IVB_* variables the rendered scripts take from the environment before their own defaults;
# `slurm submit` removes them from sbatch's environment so the options given to it win.
BAKED_ENV = ("IVB_DATASET", "IVB_MODEL", "IVB_OUTPUT", "IVB_CACHE_DIR", "IVB_ENGINE_ARGS",
             "IVB_EXTRA_ARGS", "IVB_GPU", "IVB_GPUS_PER_TASK", "IVB_NUM_SHARDS",
             "IVB_MERGE_ARGS", "IVB_ACTIVATE", "IVB_BIN")
# options that `slurm submit` sets itself and so may not appear in --extra-args
OWN_OPTIONS = ("--dataset", "--output", "-o", "--model", "--cache-dir", "--num-shards",
               "--shard-index")


class SlurmError(RuntimeError):
    """One-line user-facing error (the command line reports it: exit 1, no traceback)."""


class SlurmUsageError(SlurmError):
    """A value given to `slurm submit` that cannot work (exit 2)."""


# -- rendering --------------------------------------------------------------------------------

def template(name: str) -> str:
    return resources.files("internvl_batch").joinpath("templates", name).read_text()


def fill(text: str, values: dict[str, str]) -> str:
    """Replace every @@NAME@@ in text; a marker without a value is an error."""
    def sub(m):
        if m.group(1) not in values:
            raise KeyError(f"template marker @@{m.group(1)}@@ has no value")
        return values[m.group(1)]
    return MARKER.sub(sub, text)


def q(value) -> str:
    """A shell word for the configuration block (`ivb_set NAME WORD`)."""
    return shlex.quote(str(value))


def sb(value) -> str:
    """A `#SBATCH` value. sbatch ends an unquoted one at a space and takes `#` for a comment
    (`--output=/data/my run#1/...` logged to `/data/my`); in double quotes it keeps both
    (checked with sbatch on the test cluster). `one_line` has refused newlines and quotes."""
    v = str(value)
    return f'"{v}"' if any(c.isspace() or c == "#" for c in v) else v


def one_line(flag: str, value):
    """`value`, if a script line can carry it: a newline would end the #SBATCH line or the
    comment it is written into and run the rest as a command; a double quote would end sb's
    quoting."""
    if value is not None and any(c in str(value) for c in '\n\r"'):
        raise SlurmUsageError(f"{flag} {str(value)!r}: a newline or a double quote cannot go "
                              "into a job script; choose another value")
    return value


@dataclass
class Resources:
    partition: str | None = None
    time: str = "04:00:00"
    mem: str | None = "64G"
    cpus_per_task: int = 8
    ntasks: int = 1           # srun tasks per job (array task): one per shard
    gpu: bool = True          # GPUs for each task
    gpus: int = 1             # GPUs per task: one engine's (tensor x pipeline parallel size)
    partition_hint: bool = False  # a commented-out --partition line when there is none

    def lines(self) -> list[str]:
        out = []
        if self.partition:
            out.append(f"#SBATCH --partition={sb(self.partition)}")
        elif self.partition_hint:
            out.append("##SBATCH --partition=gpu   # (remove one # to use; default: the cluster's)")
        out += [f"#SBATCH --time={sb(self.time)}",
               "#SBATCH --nodes=1",
               f"#SBATCH --ntasks={self.ntasks}",
               f"#SBATCH --cpus-per-task={self.cpus_per_task}"]
        if self.mem:
            out.append(f"#SBATCH --mem={sb(self.mem)}")
        if self.gpu:
            out.append(f"#SBATCH --gres=gpu:{self.gpus}" if self.ntasks == 1 else
                       f"#SBATCH --gpus-per-task={self.gpus}")
        return out


@dataclass
class Plan:
    """Everything the three scripts of one run need. Values are plain strings (not shell)."""

    dataset: str = "sample"
    model: str = "OpenGVLab/InternVL3-2B"
    output: str = "ivb-output"
    cache_dir: str = field(default_factory=lambda: str(default_cache_dir()))
    engine_args: str = ""
    extra_args: str = ""
    merge_args: str = ""
    shards: int = 8
    gpu: bool = True
    gpus_per_task: int = 1      # GPUs of one engine (tensor x pipeline parallel size)
    tasks_per_job: int = 1      # --gpus-per-node: srun tasks (shards) per array task
    caption: Resources = field(default_factory=Resources)
    warm: Resources = field(default_factory=lambda: Resources(time="01:00:00"))
    merge: Resources = field(default_factory=lambda: Resources(
        time="00:30:00", mem="8G", cpus_per_task=2, gpu=False))
    log_dir: str | None = None  # None: the job's working directory
    max_running: int | None = None
    bin: str = "internvl-batch"
    activate: str = ""
    generated: str = ""
    # raw shell words overriding q(field) in the configuration block (the jobs/ defaults use
    # them for values that expand at run time, like "${SLURM_SUBMIT_DIR:-$PWD}/ivb-output")
    shell_values: dict[str, str] = field(default_factory=dict)

    @property
    def array_size(self) -> int:
        return math.ceil(self.shards / self.tasks_per_job)

    @property
    def array_spec(self) -> str:
        spec = f"0-{self.array_size - 1}"
        return f"{spec}%{self.max_running}" if self.max_running else spec

    def _values(self) -> dict[str, str]:
        v = {"DATASET": q(self.dataset), "MODEL": q(self.model), "OUTPUT": q(self.output),
             "CACHE_DIR": q(self.cache_dir), "ENGINE_ARGS": q(self.engine_args),
             "EXTRA_ARGS": q(self.extra_args), "MERGE_ARGS": q(self.merge_args),
             "GPU": "1" if self.gpu else "0", "GPUS_PER_TASK": q(self.gpus_per_task),
             "ACTIVATE": q(self.activate), "BIN": q(self.bin),
             "NUM_SHARDS": q(self.shards), "GENERATED": self.generated}
        v.update(self.shell_values)
        return v

    def _log(self, pattern: str) -> str:
        return sb(f"{self.log_dir.rstrip('/')}/{pattern}" if self.log_dir else pattern)

    def _render(self, name: str, title: str, description: list[str], sbatch: list[str]) -> str:
        text = template(name).replace("@@COMMON@@", template("_common.sh").rstrip("\n"))
        values = self._values()
        values.update(TITLE=title, SBATCH="\n".join(sbatch),
                      DESCRIPTION="\n".join(f"# {d}".rstrip() for d in description))
        return fill(text, values)

    def caption_script(self, array_in_script: bool = True) -> str:
        k = self.tasks_per_job
        res = replace(self.caption, ntasks=k, gpu=self.gpu, gpus=self.gpus_per_task)
        sbatch = ["#SBATCH --job-name=ivb-caption", f"#SBATCH --output={self._log('%x-%A_%a.out')}",
                  "#SBATCH --open-mode=append"]
        if array_in_script:
            sbatch.append(f"#SBATCH --array={self.array_spec}")
        sbatch += res.lines() + ["#SBATCH --requeue", "#SBATCH --signal=B:USR1@120"]
        unit = "GPU" if self.gpu else "task"
        if k == 1:
            title = "caption a dataset, one shard per Slurm array task"
            desc = ["Array task i captions shard i of the array's task count (or IVB_NUM_SHARDS)",
                    "and writes <output>/part-0000i-of-N.parquet; rerunning resumes."]
        else:
            g = self.gpus_per_task
            per = f"{g} {unit}s" if self.gpu and g > 1 else unit
            title = f"caption a dataset, {k} shards per array task (one srun task per {per})"
            desc = [f"Each array task holds one node with {k} srun tasks (--gpus-per-task="
                    f"{g if self.gpu else 1}),",
                    "each its own shard: shard = array task id x tasks + SLURM_PROCID, shard",
                    "count = array task count x tasks (or IVB_NUM_SHARDS)."]
        if self.gpu and self.gpus_per_task > 1:
            desc.append(f"Each task's engine spans {self.gpus_per_task} GPUs (tensor/pipeline "
                        "parallel, in IVB_ENGINE_ARGS).")
        return self._render("caption.sbatch", title, desc, sbatch)

    def warm_script(self) -> str:
        sbatch = ["#SBATCH --job-name=ivb-warm", f"#SBATCH --output={self._log('%x-%j.out')}"]
        sbatch += replace(self.warm, gpu=self.gpu, ntasks=1, gpus=self.gpus_per_task).lines()
        desc = ["Builds the compile-cache entry for the model and engine settings once, so the",
                "caption array tasks start from it instead of each compiling on its own."]
        return self._render("warm-cache.sbatch", "warm the shared compile cache", desc, sbatch)

    def merge_script(self) -> str:
        sbatch = ["#SBATCH --job-name=ivb-merge", f"#SBATCH --output={self._log('%x-%j.out')}"]
        sbatch += replace(self.merge, gpu=False, ntasks=1).lines()
        desc = ["Runs after the caption array: checks that every shard is complete and",
                "combines their stats into <output>/stats.json."]
        return self._render("merge.sbatch", "merge the shards of a run", desc, sbatch)

    def scripts(self) -> dict[str, str]:
        return {"warm-cache.sbatch": self.warm_script(),
                "caption-array.sbatch": self.caption_script(),
                "merge.sbatch": self.merge_script()}


def default_plan(tasks_per_job: int = 1) -> Plan:
    """The GPU defaults rendered into jobs/: every value can be overridden by IVB_* variables."""
    sv = {"OUTPUT": '"${SLURM_SUBMIT_DIR:-$PWD}/ivb-output"',
          "CACHE_DIR": default_cache_dir_shell(),
          "NUM_SHARDS": "''"}
    return Plan(tasks_per_job=tasks_per_job, shards=8 * tasks_per_job, shell_values=sv,
                caption=Resources(mem=f"{64 * tasks_per_job}G", partition_hint=True),
                warm=Resources(time="01:00:00", partition_hint=True),
                merge=Resources(time="00:30:00", mem="8G", cpus_per_task=2, gpu=False,
                                partition_hint=True),
                generated="Rendered from internvl_batch/templates/ by `internvl-batch slurm "
                          "write-jobs jobs/`.")


def default_job_files() -> dict[str, str]:
    """The files of jobs/ (without README.md), rendered from the templates."""
    plan, multi = default_plan(), default_plan(tasks_per_job=4)
    return {"caption-array.sbatch": plan.caption_script(),
            "caption-multigpu.sbatch": multi.caption_script(),
            "warm-cache.sbatch": plan.warm_script(),
            "merge.sbatch": plan.merge_script()}


# -- options: which of --extra-args also go to `cache warm` -----------------------------------

def split_engine_args(args: str, shared: dict[str, bool]) -> tuple[str, str]:
    """Split --extra-args into (engine options for warm + run, options for run only).
    `shared`: the option spellings `run` and `cache warm` both accept -> is it a flag."""
    try:
        tokens = shlex.split(args)
    except ValueError as e:
        raise SlurmError(f"--extra-args: {e}") from None
    engine, extra = [], []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        name = tok.split("=", 1)[0] if tok.startswith("--") else tok
        if name in OWN_OPTIONS:
            raise SlurmError(f"--extra-args: {name} is set by `slurm submit` itself; use its "
                             f"own option")
        if name in shared:
            n = 1 if shared[name] or "=" in tok else 2
            engine += tokens[i:i + n]
            i += n
        else:
            extra.append(tok)
            i += 1
    return shlex.join(engine), shlex.join(extra)


# -- submitting -------------------------------------------------------------------------------

def default_bin() -> str:
    here = Path(sys.executable).parent / "internvl-batch"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("internvl-batch") or "internvl-batch"


def sbatch_commands(paths: dict[str, Path], plan: Plan, workdir: str, sbatch_args: list[str],
                    merge_after: str = "afterok", skip_warm: bool = False) -> list[list[str]]:
    """The sbatch command lines; <warm> and <array> stand for the ids of the earlier jobs."""
    base = ["sbatch", "--parsable", f"--chdir={workdir}", *sbatch_args]
    cmds = []
    if not skip_warm:
        cmds.append([*base, str(paths["warm-cache.sbatch"])])
    array = [*base]
    if not skip_warm:
        array.append("--dependency=afterok:<warm>")
    cmds.append([*array, f"--array={plan.array_spec}", str(paths["caption-array.sbatch"])])
    cmds.append([*base, f"--dependency={merge_after}:<array>", str(paths["merge.sbatch"])])
    return cmds


def _sbatch(cmd: list[str], env: dict[str, str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: run this on a Slurm login node (or use --dry-run "
                         "to only render the scripts)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"sbatch did not answer in 120 s: {shlex.join(cmd)}") from None
    if p.returncode != 0:
        msg = (p.stderr.strip() or p.stdout.strip() or "no message").splitlines()[-1]
        raise SlurmError(f"sbatch failed (exit {p.returncode}): {msg}")
    job_id = p.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {p.stdout.strip()!r}")
    return job_id


def submit(paths: dict[str, Path], plan: Plan, workdir: str, sbatch_args: list[str],
           merge_after: str = "afterok", skip_warm: bool = False) -> dict[str, str]:
    """Submit the chain; on failure cancel what was already submitted. Returns name -> id."""
    env = {k: v for k, v in os.environ.items() if k not in BAKED_ENV}
    ids: dict[str, str] = {}
    names = ([] if skip_warm else ["warm"]) + ["array", "merge"]
    try:
        for name, cmd in zip(names, sbatch_commands(paths, plan, workdir, sbatch_args,
                                                     merge_after, skip_warm)):
            cmd = [c.replace("<warm>", ids.get("warm", "")).replace("<array>", ids.get("array", ""))
                   for c in cmd]
            ids[name] = _sbatch(cmd, env)
    except SlurmError:
        if ids:
            subprocess.run(["scancel", *ids.values()], capture_output=True)
        raise
    return ids



def submit_plan(*, dataset: str, engine: EngineSpec, output: str, cache_dir: str,
                run_args: str, shards: int, gpus_per_node: int, partition: str | None,
                time_: str, mem: str | None, cpus_per_task: int | None, cpu: bool,
                max_running: int | None, bin_: str | None, activate: str) -> Plan:
    """The Plan of `slurm submit`: resources per job from its options (paths absolute). The
    engine options go to `cache warm` and `run` alike, written from `engine`'s fields (those
    not at their defaults), so that both build or look up the same compile-cache entry."""
    # what goes into #SBATCH lines and the scripts' header comment (the rest is shell-quoted)
    for flag, v in (("--output", output), ("--partition", partition), ("--time", time_),
                    ("--mem", mem)):
        one_line(flag, v)
    k = min(gpus_per_node, shards)  # no array task with only idle GPUs
    cpus = cpus_per_task or (2 if cpu else 8)
    g = engine.gpus_per_engine  # GPUs per task: one engine of tensor x pipeline parallel size
    caption_mem = mem or ("8G" if cpu else f"{64 * k * g}G")
    return Plan(
        dataset=dataset, model=engine.model, output=output, cache_dir=cache_dir,
        engine_args=shlex.join(engine_argv(engine)), extra_args=run_args, shards=shards,
        gpu=not cpu, gpus_per_task=1 if cpu else g,
        tasks_per_job=k, max_running=max_running, bin=bin_ or default_bin(), activate=activate,
        log_dir=str(Path(output) / "slurm" / "logs"),
        caption=Resources(partition=partition, time=time_, mem=caption_mem, cpus_per_task=cpus),
        warm=Resources(partition=partition, time="01:00:00",
                       mem=mem or ("8G" if cpu else f"{64 * g}G"),
                       cpus_per_task=cpus),
        merge=Resources(partition=partition, time="00:30:00", mem="8G" if not cpu else "2G",
                        cpus_per_task=1 if cpu else 2, gpu=False),
        generated=f"Rendered by `internvl-batch slurm submit` for {output}.")


def write_scripts(scripts: dict[str, str], paths: dict[str, Path]) -> None:
    """Write the rendered scripts (executable) and create their logs directory."""
    try:
        for name, text in scripts.items():
            paths[name].parent.joinpath("logs").mkdir(parents=True, exist_ok=True)
            paths[name].write_text(text)
            paths[name].chmod(0o755)
    except OSError as e:
        raise SlurmError(f"cannot write the scripts to {paths[name].parent}: {e}") from None


def write_default_jobs(directory: Path) -> list[Path]:
    """Write the default GPU scripts (jobs/*.sbatch) from the templates."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text in default_job_files().items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
        out.append(directory / name)
    return out
