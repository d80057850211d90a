"""CLI without an engine: --help is instant and imports neither vllm nor torch; every command's
help works; user errors are one line, no traceback, and fail before any engine would start."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from internvl_batch import __version__
from internvl_batch.cli import cli

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent / "internvl-batch")


def _env(tmp_path) -> dict:
    env = dict(os.environ, INTERNVL_BATCH_CACHE=str(tmp_path / "cache"))
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_NTASKS", "SLURM_PROCID",
              "IVB_TASKS_ARE_SHARDS"):
        env.pop(k, None)
    return env


def _heavy_imports(importtime_stderr: str) -> set[str]:
    mods = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            mods.add(name.split(".")[0])
    return mods & {"vllm", "torch", "transformers"}


# -- --help ------------------------------------------------------------------------------------

def test_help_is_fast_and_light(tmp_path):
    t0 = time.monotonic()
    res = subprocess.run([BIN, "--help"], capture_output=True, text=True, timeout=30,
                         env=_env(tmp_path))
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert elapsed < 3.0, elapsed
    assert res.stdout.startswith("Usage: internvl-batch [OPTIONS] COMMAND [ARGS]...")
    for cmd in ("run", "merge", "cache", "model", "data", "slurm"):
        assert f"\n  {cmd} " in res.stdout, cmd


def test_help_imports_neither_vllm_nor_torch(tmp_path):
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "internvl_batch", "--help"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT, env=_env(tmp_path))
    assert res.returncode == 0
    assert "import time:" in res.stderr  # the check below really saw the import log
    assert _heavy_imports(res.stderr) == set()
    code = ("import internvl_batch.cli, sys; "
            "print('vllm' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, cwd=ROOT)
    assert out.stdout.strip() == "False False"


def _commands(group: click.Group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


ALL_COMMANDS = list(_commands(cli))


def test_command_tree():
    for expected in [("run",), ("merge",), ("cache", "warm"), ("cache", "ls"),
                     ("cache", "verify"), ("cache", "clear"), ("model", "synth"),
                     ("data", "coco-synth"), ("slurm",)]:
        assert expected in ALL_COMMANDS, expected


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p))
def test_every_help(path):
    for flag in ("--help", "-h"):
        res = CliRunner().invoke(cli, [*path, flag])
        assert res.exit_code == 0, res.output
        assert res.output.startswith(f"Usage: cli {' '.join(path)} "), res.output[:200]
        assert "Traceback" not in res.output


def test_version():
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and res.output == f"cli, version {__version__}\n"


# -- user errors --------------------------------------------------------------------------------

@pytest.fixture
def no_engine(monkeypatch, tmp_path):
    """Any test that reached the engine would be wrong (and would os._exit pytest)."""
    from internvl_batch.cache import CompileCache

    def refuse(*a, **k):
        raise AssertionError("the engine must not start for a user error")

    monkeypatch.setattr(CompileCache, "start_engine", refuse)
    monkeypatch.setenv("INTERNVL_BATCH_CACHE", str(tmp_path / "cache"))
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_NTASKS", "SLURM_PROCID",
              "IVB_TASKS_ARE_SHARDS"):
        monkeypatch.delenv(k, raising=False)


def _cases(tmp: str):
    out = f"{tmp}/out"
    return [
        (["run", "--dataset", "nope", "-o", out],
         "Error: unknown dataset 'nope': use sample, coco, folder:DIR, parquet:GLOB, "
         "hf:NAME_OR_PATH or wds:TARS"),
        (["run", "--dataset", "folder:/nonexistent", "-o", out],
         "Error: folder /nonexistent does not exist or is not a directory"),
        (["run", "--dataset", "coco", "-o", out],
         "Error: --dataset coco needs --data-dir (images) and --annotations (captions_*.json), "
         "or coco:DIR holding both"),
        (["run", "--shard-index", "5", "--num-shards", "2", "--dataset", "sample", "-o", out],
         "Error: --shard-index 5 is outside 0..1 (--num-shards 2)"),
        (["cache", "clear", "--older-than", "xyz", "--cache-dir", f"{tmp}/cache"],
         "Error: --older-than 'xyz': use a number and d/h/m/s, e.g. 7d"),
        (["merge", "/nonexistent"], "merge: /nonexistent does not exist"),
        (["run", "--dataset", f"parquet:{tmp}/none/*.parquet", "-o", out],
         f"Error: no Parquet files match '{tmp}/none/*.parquet'"),
        (["run", "--dataset", "sample", "--limit", "-1", "-o", out],
         "Error: --limit must be >= 0"),
        (["run", "--dataset", "sample", "--top-p", "0", "-o", out],
         "Error: --top-p must be in (0, 1]"),
        (["run", "--dataset", "sample", "--compile", "--enforce-eager", "-o", out],
         "Error: --compile and --enforce-eager contradict each other"),
        (["run", "--dataset", "sample", "--max-model-len", "10", "-o", out],
         "Error: --max-model-len must be >= 256"),
        (["run", "--dataset", "sample", "--prompt", " ", "-o", out],
         "Error: --prompt is empty"),
        (["cache", "clear", "--older-than", "0d", "--cache-dir", f"{tmp}/cache"],
         "Error: --older-than must be positive, e.g. 7d"),
        (["cache", "clear", "--older-than", "-1h", "--cache-dir", f"{tmp}/cache"],
         "Error: --older-than must be positive, e.g. 7d"),
        (["run", "--dataset", "coco", "--data-dir", f"{tmp}/nope", "--annotations",
          f"{tmp}/captions_x.json", "-o", out],
         f"Error: annotations file {tmp}/captions_x.json not found"),
        # a folder that is no checkpoint: vLLM would fail after the engine started, with a
        # 74-line pydantic traceback
        (["run", "--dataset", "sample", "--model", tmp, "-o", out],
         f"Error: --model {tmp}: no config.json there; pass a Hugging Face checkpoint folder "
         "(config.json, tokenizer, weights), a hub id, or preset:NAME"),
        # accepted before, then failing in vLLM after the engine had started
        (["run", "--dataset", "sample", "--temperature", "nan", "-o", out],
         "Error: --temperature must be a number >= 0"),
        (["run", "--dataset", "sample", "--max-num-seqs", "0", "-o", out],
         "Error: --max-num-seqs must be >= 1"),
        (["run", "--dataset", "sample", "--kv-cache-gb", "inf", "-o", out],
         "Error: --kv-cache-gb must be a number > 0"),
    ]


CASE_IDS = ["dataset-nope", "folder-missing", "coco-no-paths", "shard-index", "older-than",
            "merge-missing", "parquet-none", "limit", "top-p", "compile-eager", "max-model-len",
            "empty-prompt", "older-than-zero", "older-than-negative", "coco-no-annotations",
            "model-no-config", "temperature-nan", "max-num-seqs-0", "kv-cache-inf"]


def _exit_code(args) -> int:
    """User errors exit 2 (cli.UserError); merge's report of a failed check exits 1."""
    return 1 if args[0] == "merge" else 2


@pytest.mark.parametrize("i", range(len(CASE_IDS)), ids=CASE_IDS)
def test_user_error_cli_runner(no_engine, tmp_path, i):
    args, line = _cases(str(tmp_path))[i]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == _exit_code(args), (res.exit_code, res.output)
    assert isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    assert res.output.splitlines() == [line]
    assert not (tmp_path / "out").exists()  # nothing written for a run that cannot start


@pytest.mark.parametrize("i", range(len(CASE_IDS)), ids=CASE_IDS)
def test_user_error_subprocess(tmp_path, i):
    """The real entry point: one line on stderr, nothing on stdout, no heavy import."""
    args, line = _cases(str(tmp_path))[i]
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "internvl_batch", *args],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=_env(tmp_path))
    assert res.returncode == _exit_code(args), res
    other = [ln for ln in res.stderr.splitlines() if not ln.startswith("import time:")]
    assert "Traceback" not in res.stderr
    assert _heavy_imports(res.stderr) == set()  # failed before vLLM/torch would be imported
    if args[0] == "merge":  # merge reports on stdout (it is a report, exit 1)
        assert res.stdout.splitlines() == [line] and other == []
    else:
        assert other == [line] and res.stdout == ""


def test_user_errors_exit_2_as_documented(no_engine, tmp_path):
    from internvl_batch.cli.common import UserError

    res = CliRunner().invoke(cli, ["run", "--dataset", "nope", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert issubclass(UserError, click.ClickException) and UserError("x").exit_code == 2


def _cache_with_entries(tmp_path):
    from tests.test_cache_unit import _entry

    root = tmp_path / "cache"
    _entry(root, "k1")
    _entry(root, "k2")
    q = _entry(root, "kq").quarantine("bad")
    return root, q


@pytest.mark.parametrize("value", ["0d", "-1h", "-0s", "0.0m"])
def test_cache_clear_older_than_non_positive_removes_nothing(tmp_path, value):
    root, q = _cache_with_entries(tmp_path)
    res = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(root),
                                   f"--older-than={value}"])
    assert res.exit_code == 2, res.output
    assert res.output.splitlines() == ["Error: --older-than must be positive, e.g. 7d"]
    assert sorted(p.name for p in (root / "entries").iterdir()) == ["k1", "k2"]
    assert q.exists()


def test_cache_clear_older_than_empty_is_rejected(tmp_path):
    """--older-than '' (e.g. an unset shell variable) must not mean "remove everything"."""
    root, q = _cache_with_entries(tmp_path)
    res = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(root), "--older-than="])
    assert res.exit_code == 2, res.output
    assert res.output.splitlines() == [
        "Error: --older-than '': use a number and d/h/m/s, e.g. 7d"]
    assert sorted(p.name for p in (root / "entries").iterdir()) == ["k1", "k2"]
    assert q.exists()


def test_cache_clear_older_than_nan_is_rejected(tmp_path):
    root, q = _cache_with_entries(tmp_path)
    res = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(root),
                                   "--older-than", "nand"])
    assert res.exit_code == 2, res.output
    assert sorted(p.name for p in (root / "entries").iterdir()) == ["k1", "k2"]


def test_run_on_complete_shard_needs_no_engine(tmp_path):
    """A finished shard is recognised before the source is even opened."""
    from internvl_batch.sinks import ShardWriter

    out = tmp_path / "out"
    w = ShardWriter(out, 0, 1).open()
    w.finalize({})
    w.commit()
    assert w.is_complete()
    # CliRunner would be killed by the command's os._exit on success: use a subprocess.
    # A model that does not exist: were the shard not recognised as complete, the run would
    # fail at once on it instead of starting vLLM (a minute on CPU, and orphaned engine
    # processes when the timeout kills the CLI).
    res = subprocess.run([BIN, "run", "--dataset", "sample", "--model", "/nonexistent-model-dir",
                          "-o", str(out)],
                         capture_output=True, text=True, timeout=60, env=_env(tmp_path))
    assert res.returncode == 0
    assert res.stderr.strip() == (f"{out}/part-00000-of-00001.parquet is complete: nothing to do "
                                  "(delete it to caption again)")


# -- light commands ------------------------------------------------------------------------------

def test_model_synth_cli(tmp_path):
    res = CliRunner().invoke(cli, ["model", "synth", "--preset", "tiny", "--out",
                                   str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert res.output == (f"wrote tiny to {tmp_path / 'm'} (vLLM: trust_remote_code=True, "
                          "load_format='dummy')\n")
    assert json.loads((tmp_path / "m" / "synth.json").read_text())["preset"] == "tiny"
    res = CliRunner().invoke(cli, ["model", "synth", "--preset", "tiny", "--weights", "--out",
                                   str(tmp_path / "w")])
    assert res.exit_code == 0 and res.output.endswith("load_format='auto')\n")
    assert (tmp_path / "w" / "model.safetensors").is_file()
    res = CliRunner().invoke(cli, ["model", "synth", "--preset", "huge", "--out", "x"])
    assert res.exit_code == 2 and "Invalid value for '--preset'" in res.output
    (tmp_path / "file").write_text("x")  # an --out that cannot be written: one line, exit 2
    res = CliRunner().invoke(cli, ["model", "synth", "--preset", "tiny", "--out",
                                   str(tmp_path / "file" / "m")])
    assert res.exit_code == 2 and res.output == \
        f"Error: cannot write {tmp_path / 'file' / 'm'}: Not a directory\n"


def test_a_failed_synthesis_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """checkpoint.ensure draws into a temporary folder; on a full disk (1B weights: ~2 GB)
    it stayed behind after every failed attempt."""
    from internvl_batch import checkpoint

    def full(preset, out, weights=False):
        Path(out).mkdir(parents=True)
        (Path(out) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "synthesize", full)
    with pytest.raises(OSError):
        checkpoint.ensure("tiny", tmp_path / "models", weights=True)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".tiny-weights.lock"]


def test_data_coco_synth_cli(tmp_path):
    res = CliRunner().invoke(cli, ["data", "coco-synth", "--n", "3", "--out", str(tmp_path),
                                   "--sizes", "448"])
    assert res.exit_code == 0, res.output
    images, ann = tmp_path / "images", tmp_path / "annotations" / "captions_synth.json"
    assert res.output == f"--dataset coco --data-dir {images} --annotations {ann}\n"
    doc = json.loads(ann.read_text())
    assert [i["file_name"] for i in doc["images"]] == [f"{i:012d}.jpg" for i in range(3)]
    assert all((i["width"], i["height"]) == (448, 448) for i in doc["images"])
    assert len(doc["annotations"]) == 6
    assert sorted(p.name for p in images.iterdir()) == [f"{i:012d}.jpg" for i in range(3)]
    for bad in (["--n", "-5"], ["--n", "2", "--seed", "-1"]):  # were tracebacks
        res = CliRunner().invoke(cli, ["data", "coco-synth", *bad, "--out", str(tmp_path / "b")])
        assert res.exit_code == 2 and "is not in the range" in res.output


def test_merge_cli_ok_and_missing(tmp_path):
    from tests.test_sinks_stats import complete_shard

    out = tmp_path / "out"
    complete_shard(out, 0, 2, [0, 2])
    res = CliRunner().invoke(cli, ["merge", str(out)])
    assert res.exit_code == 1
    assert res.output.splitlines()[-1] == "merge: missing shards (never started): part-00001-of-00002"
    complete_shard(out, 1, 2, [1])
    res = CliRunner().invoke(cli, ["merge", str(out), "--compact", str(tmp_path / "all.parquet")])
    assert res.exit_code == 0, res.output
    assert f"compacted 3 rows into {tmp_path / 'all.parquet'}" in res.output
    assert json.loads((out / "stats.json").read_text())["rows_in_output"] == 3
    res = CliRunner().invoke(cli, ["merge", str(out), "--max-error-rate", "0"])
    assert res.exit_code == 0, res.output  # no failed rows: even a rate of 0 holds
    res = CliRunner().invoke(cli, ["merge", str(out), "--max-error-rate", "2"])
    assert res.exit_code == 2 and "--max-error-rate" in res.output
