"""Engine options are declared once, as EngineSpec fields (config.option): a field added there
reaches `run --help` and the run's spec, the compile-cache key when it is marked as part of
it, and the arguments the Slurm jobs give `cache warm` and `run`. Real click, no vLLM."""
from __future__ import annotations

import importlib
import json
import subprocess
from dataclasses import make_dataclass

import pytest
from click.testing import CliRunner

from internvl_batch import cache as cache_mod
from internvl_batch import slurm as slurm_mod
from internvl_batch.cli import cli
from internvl_batch.cli.common import engine_option_flags, given_engine_options
from internvl_batch.config import (KEY, KEY_IF_SET, NOT_KEY, EngineSpec, engine_argv, option,
                                   option_fields)
from tests.test_slurm import _script_env

# the module (`internvl_batch.cli.run` the attribute is the command)
run_mod = importlib.import_module("internvl_batch.cli.run")
HELP = "Tiles of the test's made-up option."


def spec_plus(key: str = KEY_IF_SET) -> type[EngineSpec]:
    """EngineSpec plus one option, declared the way a new one is: one field."""
    return make_dataclass("SpecPlus", [("foo_level", int, option(1, key=key, help=HELP))],
                          bases=(EngineSpec,), frozen=True)


def test_a_new_field_is_an_option_of_run():
    plus = run_mod.run_command(spec_plus())
    res = CliRunner().invoke(plus, ["--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if "--foo-level" in ln)
    assert "INTEGER" in line and HELP in line and "[default: 1]" in line
    # the generated options are the real command's: same flags, plus the new one
    base = CliRunner().invoke(cli, ["run", "--help"], terminal_width=200).output
    assert "--foo-level" not in base
    flags = {w for ln in base.splitlines() for w in ln.split() if w.startswith("--")}
    assert flags <= {w for ln in res.output.splitlines() for w in ln.split()
                     if w.startswith("--")}


def test_a_new_field_reaches_the_runs_spec(tmp_path, monkeypatch):
    """`run --foo-level 5` builds a RunConfig whose engine has foo_level 5 (the pipeline is
    stubbed: no engine starts)."""
    from internvl_batch import pipeline
    from internvl_batch.processes import lifeline

    seen = {}

    def fake_run(cfg, term, started_at):
        seen["cfg"] = cfg
        return 0

    monkeypatch.setattr(pipeline, "run", fake_run)
    monkeypatch.setattr(lifeline, "become_subreaper", lambda: None)
    monkeypatch.setattr(lifeline, "reap_descendants", lambda: {"left": 0})
    monkeypatch.setattr(run_mod, "exit_now", lambda code: None)
    plus = spec_plus()
    cmd = run_mod.run_command(plus)
    args = ["--dataset", "sample", "-o", str(tmp_path / "out"), "-q", "--seed", "7"]
    res = CliRunner().invoke(cmd, [*args, "--foo-level", "5"])
    assert res.exit_code == 0, res.output
    engine = seen["cfg"].engine
    assert type(engine) is plus and engine.foo_level == 5 and engine.model == "preset:tiny"
    assert engine.seed == seen["cfg"].sampling.seed == 7  # one --seed, both places
    res = CliRunner().invoke(cmd, [*args, "--foo-level", "many"])
    assert res.exit_code == 2 and "'many' is not a valid integer" in res.output


@pytest.fixture
def fake_env(monkeypatch):
    """key_fields without torch/transformers."""
    monkeypatch.setattr(cache_mod, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(cache_mod, "model_config_hash", lambda m: "hash")


@pytest.mark.parametrize("key", [KEY, KEY_IF_SET, NOT_KEY])
def test_a_new_field_is_in_the_cache_key_when_marked(fake_env, key):
    plus = spec_plus(key)
    old = cache_mod.entry_key(cache_mod.key_fields(EngineSpec(model="/m/tiny")))
    at_default = cache_mod.key_fields(plus(model="/m/tiny"))
    changed = cache_mod.key_fields(plus(model="/m/tiny", foo_level=5))
    if key == KEY:  # always named: every entry's key changes once it is added
        assert at_default["engine"]["foo_level"] == 1 and changed["engine"]["foo_level"] == 5
        assert cache_mod.entry_key(at_default) != old
    elif key == KEY_IF_SET:  # existing entries keep their keys; set, it names a new one
        assert "foo_level" not in at_default["engine"] and changed["engine"]["foo_level"] == 5
        assert cache_mod.entry_key(at_default) == old != cache_mod.entry_key(changed)
    else:
        assert "foo_level" not in at_default["engine"] and "foo_level" not in changed["engine"]
        assert cache_mod.entry_key(at_default) == cache_mod.entry_key(changed) == old


def test_the_cache_key_is_the_fields_marked_as_in_it(fake_env):
    """The include list, as the fields declare it; the same keys as before the fields said it
    themselves (memory sizes, the seed and the model path are not options of the key)."""
    in_key = {o.name for o in option_fields() if o.key == KEY}
    assert in_key == {"compile", "max_dynamic_patch", "max_model_len", "max_num_seqs",
                      "max_num_batched_tokens", "dtype", "load_format", "enforce_eager"}
    assert {o.name for o in option_fields() if o.key == KEY_IF_SET} == \
        {"encoder_cudagraphs", "quantization", "tensor_parallel_size", "pipeline_parallel_size"}
    assert set(cache_mod.key_fields(EngineSpec(model="/m"))["engine"]) == in_key


def _plan(spec, tmp_path):
    return slurm_mod.submit_plan(
        dataset="sample", engine=spec, output=str(tmp_path / "out"), cache_dir="/c",
        run_args="--max-tokens 8", shards=2, gpus_per_node=1, partition=None, time_="00:10:00",
        mem=None, cpus_per_task=None, cpu=True, max_running=None, bin_=None, activate="")


def test_a_new_field_goes_to_the_slurm_jobs(tmp_path):
    """Set, the option is written into the jobs' engine arguments, and the scripts (run under
    bash with a stand-in app) pass it to both `cache warm` and `run`."""
    plus = spec_plus()
    assert "--foo-level" not in _plan(plus(model="m"), tmp_path).engine_args  # at its default
    plan = _plan(plus(model="m", foo_level=5, compile=True), tmp_path)
    assert plan.engine_args == "--compile --foo-level 5"
    scripts = plan.scripts()
    for name in ("warm-cache.sbatch", "caption-array.sbatch"):
        assert "ivb_set_args IVB_ENGINE_ARGS '--compile --foo-level 5'" in scripts[name]
    env = _script_env(tmp_path, SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="5")
    calls = []
    for name in ("warm-cache.sbatch", "caption-array.sbatch"):
        path = tmp_path / name
        path.write_text(scripts[name].replace(plan.bin, "internvl-batch"))
        subprocess.run(["bash", str(path)], env=env, check=True, capture_output=True)
    calls = [json.loads(ln)["argv"] for ln in (tmp_path / "app.log").read_text().splitlines()]
    assert [c[:2] for c in calls] == [["cache", "warm"], ["run", "--dataset"]]
    for argv in calls:
        i = argv.index("--foo-level")
        assert argv[i + 1] == "5" and "--compile" in argv
    # and `run` parses what it receives back to the same options
    ctx = run_mod.run_command(plus).make_context("run", calls[1][1:])
    assert plus.from_options(ctx.params) == plus(model="m", foo_level=5, compile=True)


def test_extra_args_engine_options_follow_the_fields():
    plus = spec_plus()
    assert engine_option_flags(plus)["--foo-level"] is False
    engine, extra = slurm_mod.split_engine_args("--foo-level 3 --max-tokens 8",
                                                engine_option_flags(plus))
    assert (engine, extra) == ("--foo-level 3", "--max-tokens 8")
    assert given_engine_options(["--foo-level", "3"], plus) == {"foo_level": 3}
    assert engine_argv(plus(model="m", foo_level=3)) == ["--foo-level", "3"]


def test_slurm_submit_engine_flags_are_checked_and_rendered(tmp_path):
    """`slurm submit` takes the engine options as its own flags too; those win over the same
    ones in --extra-args, and a bad one is a one-line error (exit 2) before any script."""
    # through the root group: a command invoked on its own first keeps a help option
    # without the root's -h (click caches it), which other tests' `slurm -h` would then miss
    base = ["slurm", "submit", "--dry-run", "--dataset", "sample", "--model", "m", "--output",
            str(tmp_path / "o")]
    res = CliRunner().invoke(cli, [*base, "--max-model-len", "4096", "--extra-args",
                                     "--max-model-len=2048 --dtype half --max-tokens 8"])
    assert res.exit_code == 0, res.output
    assert "ivb_set_args IVB_ENGINE_ARGS '--max-model-len 4096 --dtype half'" in res.output
    assert "ivb_set_args IVB_EXTRA_ARGS '--max-tokens 8'" in res.output
    for bad, msg in ((["--max-model-len", "100"], "--max-model-len must be >= 256"),
                     (["--extra-args", "--dtype fp4"], "--extra-args: Invalid value for "
                                                       "'--dtype'")):
        res = CliRunner().invoke(cli, [*base, *bad])
        assert res.exit_code == 2 and msg in res.output, res.output
        assert "==>" not in res.output


def test_benchmarks_take_the_same_options():
    """The benchmarks' engine flags are generated from the same fields (their own defaults
    kept), and their specs are built from them."""
    from internvl_batch.bench.ab import ABOptions

    for cmd, flags in (("bench", ["--model", "--max-dynamic-patch", "--gpu-memory-utilization",
                                  "--encoder-cudagraphs"]),
                       ("bench-ab", ["--max-num-seqs", "--mm-cache-gb", "--kv-cache-gb", "--seed"]),
                       ("bench-encoder", ["--model", "--seed", "--kv-cache-gb"])):
        out = CliRunner().invoke(cli, [cmd, "--help"], terminal_width=200).output
        for flag in flags:
            assert flag in out, (cmd, flag)
    assert "[default: preset:internvl3-1b]" in out and "[default: 1.0]" in out
    spec = ABOptions(max_num_seqs=8, seed=3, kv_cache_gb=2.0).engine_spec(cuda=True)
    assert (spec.max_num_seqs, spec.seed, spec.kv_cache_gb, spec.compile) == (8, 3, 2.0, True)
