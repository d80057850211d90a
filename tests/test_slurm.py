"""Slurm: rendered sbatch scripts, `slurm submit`, and runs on a real local Slurm cluster.

The first part needs no Slurm: it renders the scripts, checks `slurm submit --dry-run`, runs
`slurm submit` against a stand-in sbatch, and runs the caption script under bash with a
stand-in app to check that USR1 reaches the app and that an early stop is requeued.

The tests marked `slurm` submit to a real cluster (start one with `.ci/slurm-up.sh`) and run
the real app on CPU with the tiny synthesized model; they are skipped when `sinfo` is missing
or no node is up, which fails them where nothing may skip (tests/no_skip.py: CI).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from internvl_batch import slurm as slurm_mod
from internvl_batch.cli.common import engine_option_flags
from internvl_batch.cli.slurm import slurm
from internvl_batch.slurm import default_job_files

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent / "internvl-batch")


def dry_run(*args: str) -> str:
    res = CliRunner().invoke(slurm, ["submit", "--dry-run", *args])
    assert res.exit_code == 0, res.output
    return res.output


def split_scripts(out: str) -> dict[str, str]:
    """Dry-run output -> {script name: text, 'commands': sbatch lines}."""
    parts, name = {}, None
    for line in out.splitlines(keepends=True):
        if line.startswith("==> ") and line.rstrip().endswith(" <=="):
            name = Path(line[4:].rstrip()[:-4]).name
            parts[name] = ""
        elif line.startswith("# sbatch commands"):
            name = "commands"
            parts[name] = ""
        elif name:
            parts[name] += line
    return parts


# -- rendering and submit, no Slurm needed ---------------------------------------------------

def test_dry_run_64_shards_gpu(tmp_path):
    out = dry_run("--dataset", "coco", "--model", "OpenGVLab/InternVL3-2B",
                  "--output", str(tmp_path / "out"), "--shards", "64", "--partition", "gpu",
                  "--cache-dir", str(tmp_path / "cache"),
                  "--extra-args", "--data-dir /d/val2017 --annotations /d/captions_val2017.json "
                                  "--max-tokens 32 --compile")
    parts = split_scripts(out)
    assert set(parts) == {"warm-cache.sbatch", "caption-array.sbatch", "merge.sbatch", "commands"}
    cmds = [shlex.split(c) for c in parts["commands"].strip().splitlines()]
    assert len(cmds) == 3
    warm, array, merge = cmds
    assert warm[:2] == array[:2] == merge[:2] == ["sbatch", "--parsable"]
    assert "--dependency=afterok:<warm>" in array and "--array=0-63" in array
    assert "--dependency=afterok:<array>" in merge
    assert array[-1] == str(tmp_path / "out" / "slurm" / "caption-array.sbatch")

    cap = parts["caption-array.sbatch"]
    for line in ("#SBATCH --array=0-63", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu", "#SBATCH --open-mode=append",
                 "ivb_set IVB_NUM_SHARDS 64", "ivb_set IVB_GPU 1", "ivb_set IVB_DATASET coco"):
        assert line in cap.splitlines(), line
    # engine options go to warm and run; dataset options to run only
    assert "ivb_set_args IVB_ENGINE_ARGS --compile" in cap
    assert "'--data-dir /d/val2017 --annotations /d/captions_val2017.json --max-tokens 32'" in cap
    assert 'cache warm --model "$IVB_MODEL" --cache-dir "$IVB_CACHE_DIR"' in \
        parts["warm-cache.sbatch"]
    assert '"${ivb_extra_args[@]}"' not in parts["warm-cache.sbatch"]
    assert "ivb_set_args IVB_ENGINE_ARGS --compile" in parts["warm-cache.sbatch"]
    assert "#SBATCH --gres=gpu:1" in parts["warm-cache.sbatch"]
    assert "gres" not in parts["merge.sbatch"] and "gpus-per" not in parts["merge.sbatch"]
    assert "\"$IVB_BIN\" merge \"$IVB_OUTPUT\"" in parts["merge.sbatch"]
    for text in parts.values():
        assert "@@" not in text
    assert not (tmp_path / "out").exists(), "--dry-run wrote files"


GPU_DIRECTIVES = ("#SBATCH --gres", "#SBATCH --gpus", "#SBATCH --gpus-per-task",
                  "#SBATCH --gpus-per-node")


def test_dry_run_cpu_has_no_gpu_lines(tmp_path):
    parts = split_scripts(dry_run("--dataset", "sample", "--model", "preset:tiny",
                                  "--output", str(tmp_path), "--shards", "3", "--cpu"))
    for name in ("warm-cache.sbatch", "caption-array.sbatch", "merge.sbatch"):
        directives = [ln for ln in parts[name].splitlines() if ln.startswith("#SBATCH")]
        assert directives and not [d for d in directives if d.split("=")[0] in GPU_DIRECTIVES], name
        assert "ivb_set IVB_GPU 0" in parts[name]
    assert "--array=0-2" in parts["commands"]


def test_dry_run_multi_gpu_per_node(tmp_path):
    parts = split_scripts(dry_run("--dataset", "sample", "--model", "m", "--output",
                                  str(tmp_path), "--shards", "62", "--gpus-per-node", "4",
                                  "--max-running", "3"))
    cap = parts["caption-array.sbatch"].splitlines()
    for line in ("#SBATCH --ntasks=4", "#SBATCH --gpus-per-task=1", "#SBATCH --array=0-15%3",
                 "ivb_set IVB_NUM_SHARDS 62", "#SBATCH --mem=256G"):
        assert line in cap, line
    assert "#SBATCH --gres=gpu:1" not in cap
    assert "--array=0-15%3" in parts["commands"]


def test_jobs_dir_is_the_default_render():
    rendered = default_job_files()
    on_disk = {p.name: p.read_text() for p in (ROOT / "jobs").glob("*.sbatch")}
    assert set(on_disk) == set(rendered), "jobs/ and the templates list different scripts"
    for name, text in rendered.items():
        assert on_disk[name] == text, (f"jobs/{name} differs from its template: run "
                                       "`internvl-batch slurm write-jobs jobs/`")
    multi = rendered["caption-multigpu.sbatch"]
    assert "#SBATCH --gpus-per-task=1" in multi and "#SBATCH --ntasks=4" in multi
    assert "#SBATCH --gres=gpu:1" in rendered["caption-array.sbatch"]


@pytest.mark.parametrize("name", sorted(default_job_files()))
def test_scripts_are_valid_bash(name, tmp_path):
    p = tmp_path / name
    p.write_text(default_job_files()[name])
    subprocess.run(["bash", "-n", str(p)], check=True)


def test_extra_args_split():
    engine, extra = slurm_mod.split_engine_args(
        "--data-dir '/a b' --max-model-len=4096 --compile --dtype half --max-tokens 8 "
        "--prompt 'say \"hi\"'", engine_option_flags())
    assert shlex.split(engine) == ["--max-model-len=4096", "--compile", "--dtype", "half"]
    assert shlex.split(extra) == ["--data-dir", "/a b", "--max-tokens", "8", "--prompt",
                                  'say "hi"']
    with pytest.raises(slurm_mod.SlurmError, match="--output"):
        slurm_mod.split_engine_args("--output /x", engine_option_flags())


def _fake_tool(path: Path, body: str):
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_submit_chains_job_ids(tmp_path, monkeypatch):
    """A stand-in sbatch records its calls: the ids it prints are wired into the next."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake_tool(bindir / "sbatch", f'echo "$*" >> {tmp_path}/calls\n'
               f'env | grep ^IVB_ >> {tmp_path}/env || true\n'
               f'n=$(wc -l < {tmp_path}/calls); echo "$((100 + n));cluster"\n')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("IVB_DATASET", "from-the-environment")  # must not override --dataset
    # nor an old venv that jobs/README.md's exports left in the shell override --bin/--activate
    monkeypatch.setenv("IVB_BIN", "/old/venv/bin/internvl-batch")
    monkeypatch.setenv("IVB_ACTIVATE", "source /old/venv/bin/activate")
    res = CliRunner().invoke(slurm, ["submit", "--dataset", "sample", "--model", "m",
                                     "--output", str(tmp_path / "o"), "--shards", "5", "--cpu"])
    assert res.exit_code == 0, res.output
    assert [ln for ln in res.output.splitlines() if not ln.startswith("scripts in")] == \
        ["warm 101", "array 102", "merge 103"]
    calls = (tmp_path / "calls").read_text().splitlines()
    assert "--dependency=afterok:101" in calls[1] and "--array=0-4" in calls[1]
    assert "--dependency=afterok:102" in calls[2]
    assert not (tmp_path / "env").exists() or "/old/" not in (tmp_path / "env").read_text()
    for name in slurm_mod.SCRIPTS:
        assert (tmp_path / "o" / "slurm" / name).is_file()
    assert (tmp_path / "o" / "slurm" / "logs").is_dir()


def test_submit_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch at all
    res = CliRunner().invoke(slurm, ["submit", "--dataset", "sample", "--model", "m",
                                     "--output", str(tmp_path / "o")])
    assert res.exit_code == 1 and "sbatch not found" in res.output
    assert "Traceback" not in res.output

    _fake_tool(tmp_path / "sbatch", 'echo "sbatch: error: Invalid partition name specified" >&2\n'
                                    'exit 1\n')
    _fake_tool(tmp_path / "scancel", "exit 0\n")
    res = CliRunner().invoke(slurm, ["submit", "--dataset", "sample", "--model", "m",
                                     "--output", str(tmp_path / "o"), "--partition", "nope"])
    assert res.exit_code == 1
    assert "sbatch failed (exit 1): sbatch: error: Invalid partition name specified" in res.output
    assert "Traceback" not in res.output


def test_paths_with_spaces_and_hashes_stay_whole_in_sbatch_lines(tmp_path):
    """sbatch ends an unquoted #SBATCH value at a space and takes # for a comment: the logs
    of `--output "/data/my run#1"` went to /data/my. A newline would run as a command."""
    out = tmp_path / "my run#1"
    res = CliRunner().invoke(slurm, ["submit", "--dataset", "sample", "--model", "m", "--cpu",
                                     "--output", str(out), "--mem", "4 G", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f'#SBATCH --output="{out}/slurm/logs/%x-%A_%a.out"' in res.output
    assert '#SBATCH --mem="4 G"' in res.output
    for bad in (["--output", f"{tmp_path}/o\ntouch {tmp_path}/PWNED"], ["--time", '1:00"']):
        res = CliRunner().invoke(slurm, ["submit", "--dataset", "sample", "--model", "m",
                                         "--cpu", "--output", str(tmp_path / "o"), *bad,
                                         "--dry-run"])
        assert res.exit_code == 2 and "cannot go into a job script" in res.output
        assert "Traceback" not in res.output and not (tmp_path / "PWNED").exists()


# -- the caption script's signal handling, under plain bash -----------------------------------

FAKE_APP = r'''#!/usr/bin/env python3
import json, os, signal, sys, time
got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(n))
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "tmpdir": os.environ.get("TMPDIR"),
                        "hf_home": os.environ.get("HF_HOME"), "pid": os.getpid()}) + "\n")
t0 = time.time()
while time.time() - t0 < float(os.environ.get("FAKE_SECONDS", "0")):
    time.sleep(0.05)
    if got:
        print("fake app: stopping on signal", got[0], flush=True)
        sys.exit(75)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
'''


def _script_env(tmp_path: Path, **extra) -> dict:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    app = bindir / "internvl-batch"
    app.write_text(FAKE_APP)
    app.chmod(0o755)
    _fake_tool(bindir / "scontrol", f'echo "$*" >> {tmp_path}/scontrol.calls\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "IVB_"))}
    env.update(PATH=f"{bindir}:{env['PATH']}", FAKE_LOG=str(tmp_path / "app.log"),
               SLURM_TMPDIR=str(tmp_path / "scratch"), **extra)
    return env


def _run_caption(tmp_path, env, signal_after: float | None = None):
    script = tmp_path / "caption.sbatch"
    script.write_text(default_job_files()["caption-array.sbatch"])
    p = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    if signal_after is not None:
        deadline = time.time() + 10
        while not (tmp_path / "app.log").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(signal_after)
        p.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@120` does
    out, _ = p.communicate(timeout=30)
    return p.returncode, out


def test_caption_script_runs_its_shard(tmp_path):
    env = _script_env(tmp_path, SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_COUNT="4",
                      SLURM_JOB_ID="77", IVB_DATASET="coco", IVB_OUTPUT="/o",
                      IVB_CACHE_DIR="/c", IVB_EXTRA_ARGS="--data-dir '/x y' --max-tokens 8")
    rc, out = _run_caption(tmp_path, env)
    assert rc == 0, out
    call = json.loads((tmp_path / "app.log").read_text().splitlines()[0])
    assert call["argv"] == ["run", "--dataset", "coco", "--model", "OpenGVLab/InternVL3-2B",
                            "--output", "/o", "--cache-dir", "/c", "--data-dir", "/x y",
                            "--max-tokens", "8", "--num-shards", "4", "--shard-index", "2"]
    assert call["tmpdir"] == str(tmp_path / "scratch" / "ivb-77")
    assert call["hf_home"] == "/c/hf"
    assert not (tmp_path / "scratch" / "ivb-77").exists(), "scratch not cleaned up"
    assert not (tmp_path / "scontrol.calls").exists()


def test_caption_script_forwards_usr1_and_requeues(tmp_path):
    env = _script_env(tmp_path, SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="1",
                      SLURM_JOB_ID="78", FAKE_SECONDS="20")
    t0 = time.time()
    rc, out = _run_caption(tmp_path, env, signal_after=0.5)
    assert time.time() - t0 < 15, "the app did not get USR1"
    assert "fake app: stopping on signal 10" in out
    assert rc == 75, out
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "78"]


def test_caption_script_no_requeue_when_complete_or_failed(tmp_path):
    env = _script_env(tmp_path, SLURM_JOB_ID="79", FAKE_RC="3")
    rc, out = _run_caption(tmp_path, env)
    assert rc == 3 and "internvl-batch failed (exit 3)" in out
    assert not (tmp_path / "scontrol.calls").exists()


def test_caption_script_gives_up_after_max_restarts(tmp_path):
    env = _script_env(tmp_path, SLURM_JOB_ID="80", FAKE_SECONDS="20", SLURM_RESTART_COUNT="3",
                      IVB_MAX_RESTARTS="3")
    rc, out = _run_caption(tmp_path, env, signal_after=0.5)
    assert rc == 75 and "not requeueing after 3 restarts" in out
    assert not (tmp_path / "scontrol.calls").exists()


# -- a real Slurm cluster ---------------------------------------------------------------------

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def _cluster_up() -> str | None:
    """None when a node is up, else why not."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "no Slurm client (sinfo/sbatch); start a cluster with .ci/slurm-up.sh"
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                           timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer"
    states = p.stdout.split()
    if p.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated")
                                    for s in states):
        return f"no Slurm node up ({(p.stderr or p.stdout).strip() or 'sinfo: nothing'})"
    return None


# a skip here is listed, and fails under IVB_NO_SKIP (CI): tests/no_skip.py
needs_cluster = pytest.mark.skipif(_cluster_up() is not None, reason=str(_cluster_up()))


def job_states(job_id: str) -> dict[str, str]:
    """{job or array task id: state} for a job id (all tasks of an array)."""
    p = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i %T"],
                       capture_output=True, text=True)
    return dict(line.split() for line in p.stdout.splitlines() if line.strip())


def job_field(job_id: str, name: str) -> str:
    p = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    for tok in p.stdout.split():
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return ""


def wait_jobs(job_ids: list[str], timeout: float, logs: Path | None = None) -> dict[str, str]:
    deadline = time.time() + timeout
    while True:
        states = {}
        for j in job_ids:
            states.update(job_states(j))
        if states and all(s in TERMINAL for s in states.values()) and \
                all(any(k == j or k.startswith(j + "_") for k in states) for j in job_ids):
            return states
        if time.time() > deadline:
            subprocess.run(["scancel", *job_ids])
            dump_logs(logs)
            pytest.fail(f"jobs not done after {timeout:.0f}s: {states}")
        time.sleep(3)


def dump_logs(logs: Path | None):
    if logs and logs.is_dir():
        for p in sorted(logs.iterdir()):
            print(f"----- {p}\n{p.read_text()[-4000:]}")


def rows(output: Path, column: str = "id") -> list:
    import pyarrow.parquet as pq

    out = []
    for p in sorted(output.glob("part-*.parquet")):
        out += pq.read_table(p, columns=[column]).column(column).to_pylist()
    return out


def _tiny_model(request) -> str:
    return str(request.getfixturevalue("tiny_model"))


def _make_coco(root: Path, n: int):
    from tests.helpers import make_coco

    return make_coco(root, n)


N_IMAGES = 24  # the dataset of the end-to-end run
RUN_ARGS = "--max-tokens 8 --workers 0 --no-progress"


def _submit(args: list[str]) -> dict[str, str]:
    p = subprocess.run([BIN, "slurm", "submit", *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    ids = dict(line.split() for line in p.stdout.splitlines() if line.strip())
    print("submitted:", ids)
    return ids


@pytest.fixture(scope="module")
def e2e_run(request, tmp_path_factory):
    """warm -> 3-shard array -> merge, submitted with `slurm submit --cpu`, waited for."""
    if _cluster_up():
        pytest.skip(_cluster_up())
    model = _tiny_model(request)
    root = tmp_path_factory.mktemp("slurm-e2e")
    images, annotations = _make_coco(root / "coco", N_IMAGES)
    out, cache = root / "out", root / "cache"
    ids = _submit(["--cpu", "--shards", "3", "--dataset", "coco", "--model", model,
                   "--output", str(out), "--cache-dir", str(cache), "--cpus-per-task", "1",
                   "--mem", "6G", "--time", "00:20:00", "--workdir", str(root),
                   "--extra-args", f"--data-dir {shlex.quote(str(images))} --annotations "
                                   f"{shlex.quote(str(annotations))} {RUN_ARGS}"])
    t0 = time.time()
    states = wait_jobs([ids["warm"], ids["array"], ids["merge"]], timeout=15 * 60,
                       logs=out / "slurm" / "logs")
    print(f"end-to-end jobs after {time.time() - t0:.0f}s: {states}")
    return {"ids": ids, "states": states, "out": out, "root": root, "model": model,
            "cache": cache, "images": images, "annotations": annotations}


@pytest.mark.slurm
@needs_cluster
def test_e2e_warm_array_merge(e2e_run):
    out, states = e2e_run["out"], e2e_run["states"]
    if set(states.values()) != {"COMPLETED"}:
        dump_logs(out / "slurm" / "logs")
    assert set(states.values()) == {"COMPLETED"}, states
    assert len(states) == 5  # warm, 3 array tasks, merge
    ids = rows(out)
    print(f"merged rows {len(ids)} / dataset {N_IMAGES}")
    assert len(ids) == N_IMAGES and len(set(ids)) == N_IMAGES
    assert [e for e in rows(out, "error") if e] == []
    assert sorted(p.name for p in out.glob("part-*.parquet")) == \
        [f"part-0000{i}-of-00003.parquet" for i in range(3)]
    merged = json.loads((out / "stats.json").read_text())
    assert merged["rows_in_output"] == N_IMAGES and merged["shards"] == 3
    merge_log = (out / "slurm" / "logs" / f"ivb-merge-{e2e_run['ids']['merge']}.out").read_text()
    assert "merged 3 shards" in merge_log


@pytest.mark.slurm
@needs_cluster
def test_merge_names_the_failed_shard(e2e_run, tmp_path):
    """A shard that never finished: `merge` (as a Slurm job and directly) fails, naming it."""
    broken = tmp_path / "out"
    shutil.copytree(e2e_run["out"], broken, ignore=shutil.ignore_patterns("slurm", "stats.json"))
    (broken / "part-00001-of-00003.parquet").unlink()
    (broken / "part-00001-of-00003.stats.json").unlink()

    p = subprocess.run([BIN, "merge", str(broken)], capture_output=True, text=True)
    assert p.returncode != 0
    assert "part-00001-of-00003" in p.stdout + p.stderr and "Traceback" not in p.stderr

    script = e2e_run["out"] / "slurm" / "merge.sbatch"
    log = tmp_path / "merge.out"
    env = {**os.environ, "IVB_OUTPUT": str(broken)}
    job = subprocess.run(["sbatch", "--parsable", f"--output={log}", str(script)], env=env,
                         capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    states = wait_jobs([job], timeout=120)
    print(f"merge of the broken output: job {job} {states}")
    assert states == {job: "FAILED"}
    text = log.read_text()
    assert "part-00001-of-00003" in text and "merge exited 1" in text


@pytest.mark.slurm
@needs_cluster
@pytest.mark.parametrize("how", ["scontrol-requeue", "usr1"])
def test_requeue_resumes_without_duplicates(request, tmp_path, how):
    """A running array task is interrupted after it committed rows; it comes back and resumes.

    scontrol-requeue: `scontrol requeue` (as an admin or a preemption would): Slurm stops
    the job with SIGTERM and requeues it itself.
    usr1: what `--signal=B:USR1@120` does before the time limit: the batch script gets USR1,
    forwards it to the app, which stops after its batch (exit 75); the script requeues.
    """
    if _cluster_up():
        pytest.skip(_cluster_up())
    model = _tiny_model(request)
    n = int(os.environ.get("IVB_TEST_REQUEUE_IMAGES", "120"))
    images, annotations = _make_coco(tmp_path / "coco", n)
    out = tmp_path / "out"
    ids = _submit(["--cpu", "--shards", "1", "--skip-warm", "--dataset", "coco",
                   "--model", model, "--output", str(out), "--cache-dir", str(tmp_path / "cache"),
                   "--cpus-per-task", "2", "--mem", "6G", "--workdir", str(tmp_path),
                   "--extra-args", f"--data-dir {shlex.quote(str(images))} --annotations "
                                   f"{shlex.quote(str(annotations))} {RUN_ARGS} --batch-size 4"])
    task = f"{ids['array']}_0"
    logs = out / "slurm" / "logs"
    deadline = time.time() + 8 * 60
    while not list((out / "_parts").glob("part-*/chunk-*.parquet")):
        state = job_states(ids["array"]).get(task)
        if state in TERMINAL or (out / "part-00000-of-00001.parquet").exists() \
                or time.time() > deadline:
            subprocess.run(["scancel", ids["array"], ids["merge"]])
            dump_logs(logs)
            pytest.fail(f"no committed chunk before the shard ended ({state}); "
                        "raise IVB_TEST_REQUEUE_IMAGES")
        time.sleep(0.5)
    chunks = len(list((out / "_parts").glob("part-*/chunk-*.parquet")))
    if how == "usr1":
        subprocess.run(["scancel", "--batch", "--signal=USR1", task], check=True)
    else:
        subprocess.run(["scontrol", "requeue", task], check=True)
    print(f"{how}: {task} interrupted after {chunks} committed chunk(s)")
    states = wait_jobs([ids["array"], ids["merge"]], timeout=10 * 60, logs=logs)
    restarts = int(job_field(task, "Restarts") or 0)
    print(f"{how}: jobs {states}, restarts {restarts}")
    if set(states.values()) != {"COMPLETED"}:
        dump_logs(logs)
    assert set(states.values()) == {"COMPLETED"}, states
    assert restarts >= 1
    got = rows(out)
    log = (logs / f"ivb-caption-{task}.out").read_text()
    errors = [e for e in rows(out, "error") if e]
    print(f"{how}: rows {len(got)} / dataset {n}, unique {len(set(got))}, "
          f"error rows {len(errors)}")
    assert len(got) == n and len(set(got)) == n, (len(got), len(set(got)))
    assert "resuming" in log, log[-3000:]
    if how == "usr1":
        assert "got SIGUSR1, forwarding" in log and "requeued job" in log, log[-3000:]
    # Slurm's requeue sends SIGTERM to every process of the job, vLLM's engine included: the
    # batch in flight must be dropped and captioned after the restart, never kept as errors
    assert errors == []
