"""End to end with real vLLM on CPU and the tiny synthesized InternVL.

Most tests share the session engine (one ~40 s start); the CLI tests start their own
processes on purpose: kill -9, resume and the compile cache are about process boundaries.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from internvl_batch import stats as stats_mod
from internvl_batch.config import PromptSpec, RunConfig, SamplingSpec
from internvl_batch.engine import CLOSE_GRACE_S
from internvl_batch.pipeline import (EXIT_ENGINE_DIED, EXIT_ERROR_RATE, EXIT_OK,
                                     EXIT_PREEMPTED, run)
from internvl_batch.sources import SourceSpec
from tests.conftest import needs_vllm
from tests.helpers import BAD_IMAGES, make_coco

pytestmark = [needs_vllm, pytest.mark.vllm]


def _cfg(engine_spec, images, ann, out, **kw):
    return RunConfig(
        source=SourceSpec.parse("coco", data_dir=str(images), annotations=str(ann)),
        engine=engine_spec, output=Path(out), sampling=SamplingSpec(max_tokens=kw.pop("max_tokens", 6)),
        batch_size=kw.pop("batch_size", 8), workers=kw.pop("workers", 2), progress=False, **kw)


def _rows(path):
    return pq.read_table(path).to_pylist()


def test_coco_with_bad_images(engine, engine_spec, coco_bad, tmp_path):
    images, ann = coco_bad
    out = tmp_path / "out"
    assert run(_cfg(engine_spec, images, ann, out), started=engine) == EXIT_OK

    rows = _rows(out / "part-00000-of-00001.parquet")
    doc = json.loads(ann.read_text())
    assert len(rows) == len(doc["images"]) == 20 + len(BAD_IMAGES)
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
    by_ref = {r["image_ref"]: r for r in rows}
    for name, must_fail in BAD_IMAGES.items():
        assert (by_ref[name]["error"] is not None) == must_fail, (name, by_ref[name]["error"])
        if must_fail:
            assert "\n" not in by_ref[name]["error"] and by_ref[name]["caption"] is None
    good = [r for r in rows if r["error"] is None]
    assert len(good) == 20 + sum(1 for v in BAD_IMAGES.values() if not v)
    for r in good:
        assert r["output_tokens"] == 6 or r["finish_reason"] == "stop"
        assert r["prompt_tokens"] > r["image_tokens"] > 0
        assert r["tiles"] >= 1 and r["image_tokens"] == r["tiles"] * 64  # tiny: 224 px tiles
        assert isinstance(r["caption"], str)
    # references travel from the COCO annotations
    assert by_ref["000000000003.jpg"]["references"] and by_ref["ok_cmyk.jpg"]["references"] == ["ok_cmyk.jpg"]

    st = json.loads((out / "part-00000-of-00001.stats.json").read_text())
    assert set(stats_mod.KEYS) <= set(st)
    assert st["rows"] == len(rows) and st["errors"] == len(rows) - len(good)
    assert st["images"] == st["requests"] == len(good)
    assert st["output_tokens"] == sum(r["output_tokens"] for r in good)
    assert st["input_tokens"] == sum(r["prompt_tokens"] for r in good)
    assert st["total_tokens"] == st["input_tokens"] + st["output_tokens"]
    assert st["images_per_s"] == pytest.approx(st["images"] / st["generate_s"], rel=1e-2)
    assert st["generate_s"] < st["total_s"]
    # host memory at the end, every process of the run: this (test) process, the decode
    # workers, and vLLM's engine core below the fork server
    end = st["host_rss"][-1]
    assert end["end"] and end["images"] == len(good)
    by_role = {}
    for p in end["by_process"]:
        by_role.setdefault(p["role"], []).append(p)
    assert {"main", "decode worker", "vLLM engine core", "fork server"} <= set(by_role), by_role
    assert len(by_role["decode worker"]) == 2  # --workers 2
    # vLLM's processes hold the model and the KV cache (vLLM CPU: in a worker process)
    vllm_procs = by_role["vLLM engine core"] + by_role.get("vLLM worker", [])
    assert sum(p["pss_gb"] for p in vllm_procs) > 0.5, vllm_procs
    print(f"host memory at the end: {end['total_pss_gb']} GB PSS, {end['total_rss_gb']} GB RSS")
    md = pq.read_schema(out / "part-00000-of-00001.parquet").metadata
    meta = json.loads(md[b"internvl_batch"])
    assert meta["versions"]["vllm"] and meta["model_config_hash"] and meta["cache_key"]


def test_shards_partition_and_merge(engine, engine_spec, tmp_path, clean_env):
    images, ann = make_coco(tmp_path / "coco", 13)
    out = tmp_path / "out"
    for i in range(3):
        assert run(_cfg(engine_spec, images, ann, out, num_shards=3, shard_index=i),
                   started=engine) == EXIT_OK
    ids = [r["id"] for i in range(3) for r in _rows(out / f"part-{i:05d}-of-00003.parquet")]
    assert sorted(ids, key=int) == [str(i) for i in range(13)]
    from internvl_batch.merge import merge_output

    ok, report = merge_output(out)
    assert ok, report
    assert json.loads((out / "stats.json").read_text())["rows_in_output"] == 13


def _wait_for_chunks(parts: Path, k: int, timeout_s: float) -> None:
    """Until `k` chunks of rows are committed (rows are being written), or `timeout_s`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and len(list(parts.glob("chunk-*.parquet"))) < k:
        time.sleep(0.02)


def _kept_then_resumed(cfg, engine, out: Path, n: int) -> None:
    """After a run stopped mid-shard: some but not all of the `n` rows kept as chunks, no
    final file; the rerun completes the shard with every id once."""
    parts = out / "_parts" / "part-00000-of-00001"
    assert not (out / "part-00000-of-00001.parquet").exists()
    partial = sum(pq.read_metadata(c).num_rows for c in parts.glob("chunk-*.parquet"))
    assert 0 < partial < n

    assert run(cfg, started=engine) == EXIT_OK
    ids = [r["id"] for r in _rows(out / "part-00000-of-00001.parquet")]
    assert sorted(ids, key=int) == [str(i) for i in range(n)]


def test_signal_stops_cleanly_then_resumes(engine, engine_spec, tmp_path):
    images, ann = make_coco(tmp_path / "coco", 24)
    out = tmp_path / "out"
    cfg = _cfg(engine_spec, images, ann, out, batch_size=2, workers=0)
    parts = out / "_parts" / "part-00000-of-00001"

    def preempt():  # what Slurm does before a requeue: SIGUSR1 while rows are being written
        _wait_for_chunks(parts, 2, 60)
        os.kill(os.getpid(), signal.SIGUSR1)

    t = threading.Thread(target=preempt)
    t.start()
    assert run(cfg, started=engine) == EXIT_PREEMPTED
    t.join()
    _kept_then_resumed(cfg, engine, out, 24)
    st = json.loads((out / "part-00000-of-00001.stats.json").read_text())
    assert len(st["runs"]) == 2 and st["rows"] == 24
    # a third run has nothing to do
    assert run(cfg, started=engine) == EXIT_OK


def _decode_workers() -> list[int]:
    from internvl_batch.stats import _process_tree, _role

    me = os.getpid()
    return [pid for pid, _ in _process_tree(me)[1:] if _role(pid, me) == "decode worker"]


def test_a_decode_worker_killed_mid_run_is_exit_4_then_resumes(engine, engine_spec, tmp_path):
    """The OOM killer takes a decode worker while rows are being written: one line naming
    it, exit 4 (not a run that waits forever: CPython's pool can miss the death), the rows
    written are kept, and the rerun captions the rest, each image once."""
    images, ann = make_coco(tmp_path / "coco", 400)
    out = tmp_path / "out"
    cfg = _cfg(engine_spec, images, ann, out, batch_size=2, workers=2)
    parts = out / "_parts" / "part-00000-of-00001"
    before = set(_decode_workers())  # pools of earlier tests, on their way out
    killed = []

    def oom_kill():
        _wait_for_chunks(parts, 2, 120)
        pid = next(iter(set(_decode_workers()) - before), None)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    said = []
    t = threading.Thread(target=oom_kill)
    t.start()
    t0 = time.time()
    code = run(cfg, started=engine, log=said.append)
    t.join()
    assert killed, "no decode worker found to kill"
    assert code == EXIT_ENGINE_DIED, said
    assert time.time() - t0 < 120
    assert any(f"decode worker (pid {killed[0]}) killed by SIGKILL" in m and "\n" not in m
               for m in said), said
    _kept_then_resumed(cfg, engine, out, 400)
    assert not any(r["error"] for r in _rows(out / "part-00000-of-00001.parquet"))


def test_max_error_rate_stops_and_keeps_rows(engine, engine_spec, tmp_path):
    images, ann = make_coco(tmp_path / "coco", 4, bad=True)
    doc = json.loads(ann.read_text())
    # mostly failing: move the bad images first
    doc["images"].sort(key=lambda im: not str(im["file_name"]).startswith("bad_"))
    ann.write_text(json.dumps(doc))
    out = tmp_path / "out"
    cfg = _cfg(engine_spec, images, ann, out, batch_size=4, max_error_rate=0.3,
               min_rows_for_error_rate=4)
    assert run(cfg, started=engine) == EXIT_ERROR_RATE
    chunks = list((out / "_parts" / "part-00000-of-00001").glob("chunk-*.parquet"))
    assert chunks and sum(pq.read_metadata(c).num_rows for c in chunks) >= 4


def test_prompt_too_long_is_an_error_row_not_a_crash(engine, engine_spec, tmp_path):
    """A request vLLM rejects fails alone; the rest of its batch is captioned."""
    images, ann = make_coco(tmp_path / "coco", 3)
    out = tmp_path / "out"
    cfg = _cfg(engine_spec, images, ann, out)
    # every row fails: accepted only when asked to (the default 0.5 would exit 3)
    cfg = dataclasses.replace(cfg, prompt=PromptSpec("word " * 5000), max_error_rate=1.0)
    assert run(cfg, started=engine) == EXIT_OK
    rows = _rows(out / "part-00000-of-00001.parquet")
    assert len(rows) == 3 and all(r["error"] and r["error"].startswith("engine:") for r in rows)


# -- real processes: the CLI, kill -9, the compile cache ---------------------------------

def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "internvl_batch", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _wait_for_holder(lock: Path, p: subprocess.Popen):
    deadline = time.time() + 60
    while time.time() < deadline and f'"pid": {p.pid},' not in (
            lock.read_text() if lock.exists() else ""):
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.05)
    assert f'"pid": {p.pid},' in lock.read_text()


def test_cli_kill9_resume_and_cache_hit(tiny_model, tmp_path, clean_env):
    """kill -9 mid-run, then resume; meanwhile other runs on the same output: one is refused
    (exit 2, naming the holder), one waits (--wait) and then finds the shard complete. No
    extra engine starts: the refused and the waiting runs never reach theirs."""
    images, ann = make_coco(tmp_path / "coco", 40)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["run", "--dataset", "coco", "--data-dir", str(images), "--annotations", str(ann),
            "--model", tiny_model, "--output", str(out), "--cache-dir", str(cache),
            "--max-tokens", "6", "--batch-size", "2", "--no-progress", "--max-model-len", "4096"]
    p = _cli(*args)
    parts = out / "_parts" / "part-00000-of-00001"
    lock = out / "part-00000-of-00001.lock"
    _wait_for_holder(lock, p)
    # a second writer while the first holds the shard (starting its engine, seconds before
    # its first row): a duplicated Slurm task; refused at once
    second = subprocess.run([sys.executable, "-m", "internvl_batch", *args],
                            capture_output=True, text=True, timeout=120)
    _assert_refused_while_held(second, p.pid, out)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(parts.glob("chunk-*.parquet"))) < 3:
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the engine core child dies with it
    p.wait()
    written = sum(pq.read_metadata(c).num_rows for c in parts.glob("chunk-*.parquet"))
    assert 0 < written < 40

    p2 = _cli(*args)  # takes over the dead holder's lock
    _wait_for_holder(lock, p2)
    p3 = _cli(*args, "--wait")  # waits for p2, then has nothing to do
    log = p2.communicate(timeout=300)[0]
    log3 = p3.communicate(timeout=60)[0]
    assert p2.returncode == 0, log
    assert f"took over the lock of pid {p.pid} on host {socket.gethostname()}" in log
    assert f"resuming part-00000-of-00001: {written} rows already written" in log
    assert p3.returncode == 0, log3
    assert log3.splitlines() == [
        log3.splitlines()[0],
        f"{out}/part-00000-of-00001.parquet is complete: nothing to do (delete it to caption "
        "again)"] and log3.startswith(f"waiting for another internvl-batch (pid {p2.pid} ")
    assert not lock.exists()
    ids = [r["id"] for r in _rows(out / "part-00000-of-00001.parquet")]
    assert len(ids) == len(set(ids)) == 40
    st = json.loads((out / "part-00000-of-00001.stats.json").read_text())
    _assert_stats_of_a_killed_then_resumed_shard(st, written, log)
    assert "images captioned" in log and "Traceback" not in log
    entries = list((cache / "entries").iterdir())
    assert len(entries) == 1 and (entries[0] / ".complete").is_file()
    manifest = json.loads((entries[0] / "manifest.json").read_text())
    assert manifest["fields"]["model"] == os.path.realpath(tiny_model)


def _assert_refused_while_held(second: subprocess.CompletedProcess, holder: int, out: Path):
    """A second writer of a held shard: exit 2 and one line naming the holder."""
    assert second.returncode == 2, second
    assert second.stderr.splitlines() == [
        f"Error: another internvl-batch (pid {holder} on host {socket.gethostname()}, since "
        f"{second.stderr.split('since ')[1].split(')')[0]}) is writing part-00000-of-00001 "
        f"in {out}; wait for it, or pass --wait"], second.stderr


def _assert_stats_of_a_killed_then_resumed_shard(st: dict, written: int, log: str):
    """The shard's stats.json after run 1 was killed with `written` rows and run 2 finished
    it: both runs, the shard's totals, run 2's clock and start timeline."""
    # run 1 built the cache entry (a miss) and was killed: its stats, saved after each
    # batch, survive; run 2 found the entry complete: a hit
    assert [r["cache_hit"] for r in st["runs"]] == [False, True]
    # the whole shard, not just run 2's rows (once: 150 rows, stats said 134)
    assert st["rows"] == st["rows_in_shard"] == st["images"] == 40 and st["errors"] == 0
    assert st["runs"][0]["rows"] >= written - 2 and st["runs"][1]["rows"] == 40 - written
    # run 2: start to first row, last row to close, to its end; run 1: to its last sign of life
    r1, r2 = st["runs"]
    assert r2["init_s"] < r2["time_to_first_row_s"] < r2["wall_s"]
    assert r2["started_at"] < r2["first_batch_at"] <= r2["last_batch_at"] < r2["closed_at"]
    assert 0 < r2["shutdown_s"] < 30 and st["shutdown_s"] == r2["shutdown_s"]
    assert r1["shutdown_s"] is None and r1["end_lost"] and r2["closed_at"] <= r2["ended_at"]
    assert st["time_to_first_row_s"] == max(r1["time_to_first_row_s"], r2["time_to_first_row_s"])
    assert st["gpu_hours"] == pytest.approx((r1["wall_s"] + r2["wall_s"]) / 3600, abs=1e-5)
    assert st["images_per_gpu_hour"] is None and "1 run ended without" in st["cost_unknown"]
    assert "images per device-hour" in log and "first row after / shutdown s" in log
    # where run 2's start went: its one engine's phases, as vLLM logged them
    tl = st["start_timeline"]
    assert tl == r2["start_timeline"] and [e["engine"] for e in tl["engines"]] == ["engine"]
    assert 0 < tl["engines_asked_s"] < tl["engines_ready_s"] <= r2["time_to_first_row_s"]
    phases = {p["phase"]: p for p in tl["engines"][0]["phases"]}
    assert 0 < phases["init engine"]["s"] < phases["LLM() returned"]["s"]
    # run 1 met an empty cache: vLLM inspected the model class in the engine's own process
    # (engine._inspect_here), not in a fresh Python; run 2 read the file vLLM then wrote
    inspected = [[p["s"] for p in r["start_timeline"]["engines"][0]["phases"]
                  if p["phase"] == "model class inspected here"] for r in (r1, r2)]
    assert len(inspected[0]) == 1 and 0 < inspected[0][0] < 30 and inspected[1] == [], inspected


def _session_left(sid: int) -> list[str]:
    """Processes of session `sid` still running (zombies aside), as "pid comm: cmdline"."""
    left = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                comm, rest = f.read().rsplit(")", 1)
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            continue
        fields = rest.split()
        if int(fields[3]) == sid and fields[0] != "Z":
            left.append(f"{d} {comm.split('(', 1)[1]}: {cmd}")
    return left


def _left_after_exit(sid: int) -> list[str]:
    """What of session `sid` still runs after its command exited, but multiprocessing's
    resource tracker, which leaves at its parent's exit, a moment later (given 1 s)."""
    for _ in range(20):
        left = _session_left(sid)
        if len(left) <= 1 and all("resource_tracker" in x for x in left):
            return []
        time.sleep(0.05)
    return left


def test_a_shell_before_the_cli_is_not_the_runs_time(tiny_model, tmp_path, clean_env):
    """`bash -c "sleep 5 && internvl-batch run …"` (how Docker's CMD, Kubernetes and `srun
    bash -c` run commands): bash execs the last command in the process it forked at the
    start, so a start read from /proc counted the sleep (an install, there) as the run's.
    The time to the first row and the wall time leave it out."""
    exe = Path(sys.executable).with_name("internvl-batch")
    cli = str(exe) if exe.is_file() else f"{sys.executable} -m internvl_batch"
    out = tmp_path / "out"
    t0 = time.time()
    p = subprocess.run(["bash", "-c", f"sleep 5 && {cli} run --dataset sample --limit 4 "
                        f"--model {tiny_model} --output {out} --cache-dir {tmp_path / 'cache'} "
                        "--max-tokens 4 --max-model-len 4096 --workers 1 --json -q"],
                       capture_output=True, text=True, timeout=400)
    took = time.time() - t0
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    run_ = json.loads((out / "part-00000-of-00001.stats.json").read_text())["runs"][-1]
    assert run_["started_at"] >= t0 + 5.0
    assert doc["time_to_first_row_s"] < took - 5.0
    # all of the command but the sleep, less what no process can time of itself (the
    # interpreter's start before our first import, the exit after the end is recorded)
    assert took - 5.0 - 1.0 < doc["wall_s"] < took - 5.0
    print(f"command {took:.2f} s, sleep 5 s, wall_s {doc['wall_s']:.2f} s, first row after "
          f"{doc['time_to_first_row_s']:.2f} s")


def test_cli_ctrl_c_then_quiet_resume(tiny_model, tmp_path, clean_env):
    """What a person sees: our lines on the terminal and vLLM's in OUTPUT/logs;
    Ctrl-C stops like SIGTERM (exit 130, one line, no traceback, rows kept); `-q` prints
    only the summary, on stdout; the resumed shard has every row once."""
    images, ann = make_coco(tmp_path / "coco", 30)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [sys.executable, "-m", "internvl_batch", "run", "--dataset", "coco",
            "--data-dir", str(images), "--annotations", str(ann), "--model", tiny_model,
            "--output", str(out), "--cache-dir", str(cache), "--max-tokens", "6",
            "--batch-size", "2", "--max-model-len", "4096"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    parts = out / "_parts" / "part-00000-of-00001"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(parts.glob("chunk-*.parquet"))) < 2:
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
    stdout, stderr = p.communicate(timeout=180)
    # the command ends with its processes (vLLM's engine core, the fork server): none of
    # its session is left to hold memory (on a GPU: the next command's). multiprocessing's
    # resource tracker leaves at our exit, a moment later
    assert _left_after_exit(p.pid) == []
    assert p.returncode == 130, stderr
    assert stdout == "" and "Traceback" not in stderr
    lines = stderr.splitlines()
    assert lines[0] == f"vLLM's log: {out}/logs/part-00000-of-00001.log"
    assert "starting the engine" in lines[1] and "\r" not in stderr
    assert lines[-1].startswith("stopped by signal SIGINT") and "rerun" in lines[-1]
    assert len(lines) <= 10, stderr  # was ~86 lines, vLLM's included
    log = (out / "logs" / "part-00000-of-00001.log").read_text()
    assert "non-default args" in log  # vLLM's own start-up lines went to the file
    written = sum(pq.read_metadata(c).num_rows for c in parts.glob("chunk-*.parquet"))
    assert 0 < written < 30

    q = subprocess.run(args + ["-q"], capture_output=True, text=True, timeout=400)
    assert q.returncode == 0, q.stderr
    assert q.stderr == ""  # no status lines, no bar: only the summary, on stdout
    assert "images captioned" in q.stdout and "Traceback" not in q.stdout
    ids = [r["id"] for r in _rows(out / "part-00000-of-00001.parquet")]
    assert len(ids) == len(set(ids)) == 30
    st = json.loads((out / "part-00000-of-00001.stats.json").read_text())
    assert st["rows"] == 30 and len(st["runs"]) == 2


@pytest.mark.parametrize("start_method", ["auto", "spawn"])
def test_cli_sigterm_with_replicas_leaves_no_process(tiny_model, tmp_path, clean_env,
                                                      start_method):
    """`timeout` (or a Slurm step's signal) stops `run --replicas 2`: exit 75, the rows
    written are kept, and no process of the run is left once the command has exited. The
    replicas and their engine cores are in process groups of their own, so the signal
    reaches only ours (main, workers, the fork server); with the fork server gone, forked
    replicas' engine cores outlived the command by ~4 s here and, on an H200, held the
    replicas' GPU memory when the next command started. Both start methods: replicas and
    engine cores forked from the fork server (CPU's default), and every process spawned."""
    clean_env.setenv("INTERNVL_BATCH_START_METHOD", start_method)
    images, ann = make_coco(tmp_path / "coco", 1000)
    out = tmp_path / "out"
    p = subprocess.Popen(
        [sys.executable, "-m", "internvl_batch", "run", "--dataset", "coco",
         "--data-dir", str(images), "--annotations", str(ann), "--model", tiny_model,
         "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--max-tokens", "6",
         "--replicas", "2", "--batch-size", "8", "--max-model-len", "4096", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    parts = out / "_parts" / "part-00000-of-00001"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("chunk-*.parquet"))) < 2:
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)  # as `timeout` does: the command's process group
    stdout, stderr = p.communicate(timeout=120)
    assert _left_after_exit(p.pid) == [], stderr
    assert p.returncode == 75, stderr
    assert "Traceback" not in stderr and "stopped by signal SIGTERM" in stderr
    written = sum(pq.read_metadata(c).num_rows for c in parts.glob("chunk-*.parquet"))
    assert 0 < written < 1000


def test_cli_kill9_of_main_alone_leaves_no_process(tiny_model, tmp_path, clean_env):
    """The kernel's OOM killer (or `kill -9`) takes `run`'s main process alone while its
    decode workers, two replicas and their engine cores are busy: nobody is left to stop
    them, and before each child watched its parent, 8 of them were still running 40 s
    later, each engine core holding its memory. Now every process of the run, recorded
    from /proc before the kill, is gone 10 s after it."""
    from tests.helpers import descendants, still_alive

    images, ann = make_coco(tmp_path / "coco", 1000)
    out = tmp_path / "out"
    p = subprocess.Popen(
        [sys.executable, "-m", "internvl_batch", "run", "--dataset", "coco",
         "--data-dir", str(images), "--annotations", str(ann), "--model", tiny_model,
         "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--max-tokens", "6",
         "--replicas", "2", "--workers", "2", "--batch-size", "8", "--max-model-len", "4096",
         "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr", "w"),
        start_new_session=True)  # a file: a pipe nobody reads could block the children
    parts = out / "_parts" / "part-00000-of-00001"
    tree: dict[int, str] = {}
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(list(parts.glob("chunk-*.parquet"))) < 2:
            assert p.poll() is None, (tmp_path / "stderr").read_text()
            time.sleep(0.05)
        for _ in range(5):  # rows are being written: the whole tree is up
            tree.update(descendants(p.pid))
            time.sleep(0.1)
        names = sorted(tree.values())
        assert sum(n.startswith("ivb-replica") for n in names) == 2, names
        assert sum(n.startswith("EngineCore") for n in names) == 2, names
        assert len(tree) >= 2 + 2 + 2 + 1, names  # decode workers, replicas, cores, server
        p.kill()  # main alone, SIGKILL: no handler runs, nothing is signalled
        p.wait()
        t0 = time.monotonic()
        left = still_alive(tree, within_s=10.0)
        print(f"{len(tree)} processes below main; all gone "
              f"{time.monotonic() - t0:.1f} s after its kill -9" if not left else "")
        assert left == {}, (left, names, (tmp_path / "stderr").read_text()[-3000:])
    finally:
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    written = sum(pq.read_metadata(c).num_rows for c in parts.glob("chunk-*.parquet"))
    assert 0 < written < 1000


def test_cli_compile_on_cpu_fails_fast_with_one_line(tiny_model, tmp_path):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "internvl_batch", "run", "--dataset", "sample",
                        "--model", tiny_model, "--compile", "--output", str(tmp_path / "o"),
                        "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "--compile needs a CUDA GPU" in err[0], p.stderr
    assert time.time() - t0 < 60


def test_cli_quantization_on_cpu_is_one_line_exit_2(tiny_model, tmp_path):
    p = subprocess.run([sys.executable, "-m", "internvl_batch", "run", "--dataset", "sample",
                        "--model", tiny_model, "--quantization", "fp8",
                        "--output", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert "--quantization fp8 needs a CUDA GPU" in err[0]
    assert not (tmp_path / "o").exists()  # nothing written


def test_cache_verify_compares_against_eager(tiny_model, tmp_path, engine):
    """`cache verify` loads the entry and runs the encoder check inside the engine (hooks.py
    through collective_rpc): the serving InternViT layers against the same layers with the
    compiled wrapper bypassed, on the same weights and pixels. On CPU nothing is compiled
    (0/2 layers), so both sides run the same code and agree exactly: this proves the path
    (worker extension, RPC, embeddings of a 13- and a 3-tile batch), not a compiler."""
    cache = engine[1].root
    p = subprocess.run([sys.executable, "-m", "internvl_batch", "cache", "verify",
                        "--model", tiny_model, "--cache-dir", str(cache), "--max-model-len", "4096"],
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    line = next((ln for ln in p.stdout.splitlines() if ": OK " in ln or "MISMATCH" in ln), "")
    assert ": OK 0/2 layers compiled; tiles 13,3: cos >= 1.000000" in line, line
    assert "rel L2 <= 0.00e+00" in line
    assert not (cache / "refs").exists()  # no second, eager engine any more


def test_encoder_check_in_the_session_engine(engine):
    """The probe's numbers: the embeddings are not degenerate (the tiny checkpoint has
    trained-like weights), and the model keeps its image token id after the check."""
    eng = engine[0]
    check = eng.encoder_check(tiles=(13, 1))
    assert check["ok"] and check["layers"] == 2 and set(check["batches"]) == {"13", "1"}
    for b in check["batches"].values():
        assert b["finite"] and b["ref_max_abs"] > 0.01 and b["max_abs_diff"] == 0.0
    assert check["tolerance"]["cos_min"] < 1
    # the check ran the model outside a request; requests still merge image embeddings
    from PIL import Image

    from internvl_batch import prompts

    text = prompts.render(prompts.PROBE)
    res = eng.generate([prompts.request(text, Image.new("RGB", (448, 448), (200, 30, 30)))],
                       SamplingSpec(max_tokens=4, temperature=0.0))
    assert res[0].error is None and res[0].image_tokens > 0 and res[0].output_tokens == 4


def test_an_engine_started_during_a_build_loads_it_the_moment_it_completes(tiny_model, tmp_path,
                                                                          capfd):
    """While another process builds an entry (holds its lock), start_engine does not queue at
    the lock: the engine starts at once (process, imports, weights) and its worker holds
    before its first forward until the entry is complete (hooks.install_gate)."""
    import multiprocessing as mp

    from internvl_batch.cache import CompileCache
    from internvl_batch.config import EngineSpec
    from tests.helpers import hold_lock

    cc = CompileCache(tmp_path / "c")
    spec = cc.resolve(EngineSpec(model=tiny_model, max_model_len=4096))
    entry = cc.entry(spec)
    lock = cc.root / "locks" / f"{entry.key}.lock"
    lock.parent.mkdir(parents=True)
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    builder = ctx.Process(target=hold_lock, args=(str(lock), ready, release))
    builder.start()
    assert ready.wait(60)
    entry.path.mkdir(parents=True)
    logs: list[str] = []
    done = {}

    def start():
        t0 = time.monotonic()
        done["engine"] = cc.start_engine(spec, log=logs.append)[0]
        done["s"] = time.monotonic() - t0

    th = threading.Thread(target=start)
    th.start()
    hold = 45.0  # CPU engine: process start, imports and weights take ~30 s before the gate
    th.join(hold)
    assert th.is_alive(), "the engine did not wait for the entry"
    entry.mark_complete()
    release.set()
    th.join(300)
    builder.join(30)
    try:
        assert done["s"] > hold
        assert any("is being built by another job; starting meanwhile" in m for m in logs), logs
        waited = re.findall(r"internvl-batch: waited ([\d.]+) s for compile-cache entry",
                            capfd.readouterr().out)
        assert waited and float(waited[0]) > 1.0, waited  # it reached the gate before completion
        from PIL import Image

        from internvl_batch import prompts

        res = done["engine"].generate([prompts.request(prompts.render(prompts.PROBE),
                                                       Image.new("RGB", (448, 448)))],
                                      SamplingSpec(max_tokens=2))
        assert res[0].error is None and res[0].output_tokens == 2
    finally:
        done["engine"].close()


def test_an_engine_starts_again_in_the_process_whose_engine_core_died(engine, engine_spec,
                                                                      cache_root):
    """What healing a poisoned compile-cache entry in-process relies on (cache.start_engine
    rebuilds it where the engine crashed, instead of re-executing the command): once an
    engine whose engine core died is closed, a new engine starts in the same process,
    from the same entry, and captions."""
    from PIL import Image

    from internvl_batch import prompts
    from internvl_batch.cache import CompileCache
    from internvl_batch.engine import Engine, EngineDead

    cc = CompileCache(cache_root)
    env = cc.entry(cc.resolve(engine_spec)).env()  # the session engine's (complete) entry
    reqs = [prompts.request(prompts.render(prompts.PROBE), Image.new("RGB", (448, 448)))]
    first = Engine(engine_spec, env).start()
    try:
        core = first.llm.llm_engine.engine_core.resources.engine_manager.processes[0]
        os.kill(core.pid, signal.SIGKILL)  # as a crash in its first forward ends it
        with pytest.raises(EngineDead):
            first.generate(reqs, SamplingSpec(max_tokens=4))
    finally:
        first.close()
    second = Engine(engine_spec, env).start()
    try:
        (res,) = second.generate(reqs, SamplingSpec(max_tokens=4))
        assert res.error is None and res.text
    finally:
        second.close()


def test_synthesized_weights_give_per_image_captions(engine, engine_spec):
    """The session's tiny checkpoint carries random weights at trained-like scales, loaded
    by vLLM with load_format="auto" (which refuses a missing or unknown tensor name), so
    greedy captions differ from image to image: the comparisons in this suite (replicas vs
    one engine, resume, the probe) compare something. Dummy weights gave 1 caption for all
    17 sample images; these gave 15 (measured, vLLM 0.32 CPU)."""
    from internvl_batch import checkpoint, images, prompts
    from internvl_batch.engine import llm_kwargs
    from internvl_batch.sources import open_source

    eng = engine[0]
    assert checkpoint.has_weights(engine_spec.model)
    assert llm_kwargs(engine_spec, cuda=False)["load_format"] == "auto"
    assert eng.llm.llm_engine.vllm_config.load_config.load_format == "auto"
    assert engine[1].fields["weights"] == checkpoint.weights_id(engine_spec.model)
    recs = list(open_source(SourceSpec.parse("sample")))
    text = prompts.render(PromptSpec())
    res = eng.generate([prompts.request(text, images.decode(r).image) for r in recs],
                       SamplingSpec(max_tokens=16))
    caps = [r.text for r in res]
    print(f"{len(set(caps))} distinct greedy captions of {len(caps)}")
    assert len(caps) == 17 and all(r.error is None for r in res)
    assert len(set(caps)) >= 12, caps


def test_replicas_give_the_same_rows_as_one_engine(engine, engine_spec, coco_bad, tmp_path,
                                                    monkeypatch):
    """`--replicas 2`: two real engine processes, batches dispatched and written back in
    order; captions (greedy) and error rows identical to the single in-process engine. The
    pool serves two runs in a row (as in `bench`), so its pipes must stay in step. The
    default path: the fork server (processes/start.py) forks the replica processes and
    their engine cores."""
    from internvl_batch import stats
    from internvl_batch.processes import start as procstart
    from internvl_batch.replicas import ReplicaPool

    monkeypatch.delenv(procstart.ENV, raising=False)
    images, ann = coco_bad
    one = tmp_path / "one"
    assert run(_cfg(engine_spec, images, ann, one, batch_size=4), started=engine) == EXIT_OK
    a = _rows(one / "part-00000-of-00001.parquet")
    keys = ("id", "caption", "error", "prompt_tokens", "image_tokens", "output_tokens")
    logs = []
    pool = ReplicaPool(engine_spec, tmp_path / "cache", 2, log=logs.append).start()
    try:
        for k in range(2):
            out = tmp_path / f"two-{k}"
            cfg = dataclasses.replace(_cfg(engine_spec, images, ann, out, batch_size=4),
                                      replicas=2, cache_dir=tmp_path / "cache")
            assert run(cfg, log=logs.append, started=(pool, pool.entry)) == EXIT_OK
            b = _rows(out / "part-00000-of-00001.parquet")
            assert [r["seq"] for r in b] == sorted(r["seq"] for r in b)
            assert [{k: r[k] for k in keys} for r in b] == [{k: r[k] for k in keys} for r in a]
        pool.wait_all()  # the pool serves from its first ready replica: the other may be late
        timelines = pool.start_timelines()
        roles = [p["role"] for p in stats.host_memory(0)["by_process"]]
    finally:
        t0 = time.perf_counter()
        pool.close()
        close_s = time.perf_counter() - t0
    # both replicas close at once, each engine within engine.CLOSE_GRACE_S
    assert close_s < CLOSE_GRACE_S + 3, close_s
    print(f"2-replica pool closed in {close_s:.2f} s")
    # each replica's start, as phases read from vLLM's lines and ours
    assert [t["engine"] for t in timelines] == ["replica 0", "replica 1"]
    assert [t["engine_start"] for t in timelines] == ["forkserver"] * 2
    assert [t["replica_start"] for t in timelines] == ["forked"] * 2
    # named in /proc as replicas, though forked from the server; three engine cores: the
    # session engine's and the replicas'
    assert roles.count("replica") == 2 and roles.count("vLLM engine core") == 3, roles
    assert engine[0].start_timeline()["engine_start"] == "forkserver"
    for t in timelines:
        phases = {p["phase"]: p for p in t["phases"]}
        assert 0 < phases["init engine"]["s"] < phases["LLM() returned"]["s"] <= t["ready_s"]
    assert any(r["error"] for r in a) and any(r["caption"] for r in a)
    # the equality above compares captions that differ per image, not one repeated string
    assert len({r["caption"] for r in a if r["caption"] is not None}) >= 5
    busy = [m for m in logs if m.startswith("replicas busy")]
    assert len(busy) == 2 and "#0" in busy[0] and "#1" in busy[0]
    # each line counts its own run (the pool's counters run on across runs)
    answered = sum(1 for r in a if r["caption"] is not None)
    for line in busy:
        assert sum(int(n) for n in re.findall(r"\((\d+) img\)", line)) == answered, line
    meta = json.loads(pq.read_schema(tmp_path / "two-1" / "part-00000-of-00001.parquet")
                      .metadata[b"internvl_batch"])
    assert meta["config"]["replicas"] == 2 and meta["versions"]["replicas"] == 2
