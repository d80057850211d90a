"""The replica wire format and memory plan, without vLLM."""
from __future__ import annotations

import os
import threading

from PIL import Image

from internvl_batch.config import EngineSpec, SamplingSpec
from internvl_batch.children import recv_frame, send_frame
from internvl_batch.replicas import replica_spec


def test_frames_stream_a_batch_of_images_through_a_pipe():
    r, w = os.pipe()
    rf, wf = os.fdopen(r, "rb"), os.fdopen(w, "wb")
    reqs = [{"prompt": f"p{i}", "multi_modal_data": {"image": Image.new("RGB", (448, 448), (i, 0, 0))}}
            for i in range(40)]  # ~24 MB: far more than a pipe buffer holds
    got = {}
    t = threading.Thread(target=lambda: got.update(v=recv_frame(rf, with_items=True)))
    t.start()
    send_frame(wf, (7, len(reqs), SamplingSpec(max_tokens=3)), reqs)
    t.join(timeout=60)
    idx, items, sampling = got["v"]
    assert idx == 7 and sampling.max_tokens == 3 and len(items) == 40
    assert [x["prompt"] for x in items] == [f"p{i}" for i in range(40)]
    assert items[5]["multi_modal_data"]["image"].getpixel((0, 0)) == (5, 0, 0)
    send_frame(wf, (-1, {"ready": True}))
    assert recv_frame(rf) == (-1, {"ready": True})
    wf.close()
    try:
        recv_frame(rf)
        raise AssertionError("expected EOFError")
    except EOFError:
        pass


def test_replica_spec_fixes_the_kv_cache_on_gpu_only():
    spec = EngineSpec(model="/m")
    assert replica_spec(spec, 1, cuda=True) is spec
    gpu = replica_spec(spec, 4, cuda=True)
    assert gpu.kv_cache_gb == 4.0 and gpu.gpu_memory_utilization == 0.22
    assert replica_spec(EngineSpec(model="/m", kv_cache_gb=2.0), 2, cuda=True).kv_cache_gb == 2.0
    cpu = replica_spec(spec, 2, cuda=False)
    assert cpu.kv_cache_gb is None and cpu.gpu_memory_utilization == 0.1


def test_auto_replicas_fit_the_device(tmp_path):
    from internvl_batch.checkpoint import synthesize
    from internvl_batch.sizing import auto_replicas, weights_gb

    one_b = synthesize("internvl3-1b", tmp_path / "1b")
    eight_b = synthesize("internvl3-8b", tmp_path / "8b")
    # InternVL3-1B: 1.76 GB of weights by vLLM's own count on H100 (0.6B LM + 0.3B ViT)
    assert 1.5 < weights_gb(one_b) < 2.2
    assert 14 < weights_gb(eight_b) < 18
    # measured: 4 fill an H100 host (16 CPUs)
    assert auto_replicas(one_b, True, 79.6, cpus=16)[0] == 4
    assert auto_replicas(one_b, True, 79.6, cpus=8)[0] == 2   # a Slurm task with 8 CPUs
    assert auto_replicas(one_b, True, 24.0, cpus=16)[0] == 2
    assert auto_replicas(eight_b, True, 79.6, cpus=16)[0] == 2
    assert auto_replicas(eight_b, True, 24.0, cpus=16)[0] == 1
    assert auto_replicas(one_b, True, 79.6, cpus=2)[0] == 1
    assert auto_replicas(one_b, False, None) == (1, "CPU: one engine")
    assert auto_replicas(str(tmp_path / "nope"), True, 79.6)[0] == 1


def test_cli_replicas_option():
    from click.testing import CliRunner

    from internvl_batch.cli import cli

    r = CliRunner().invoke(cli, ["run", "--dataset", "sample", "-o", "/tmp/x", "--replicas", "0"])
    assert r.exit_code == 2 and "between 1 and 16" in r.output
    r = CliRunner().invoke(cli, ["run", "--dataset", "sample", "-o", "/tmp/x", "--replicas", "many"])
    assert r.exit_code == 2 and "or auto" in r.output


def _replicas_running(monkeypatch, tmp_path, n: int, code: str):
    """`n` real replica processes that run `code` instead of an engine (no vLLM)."""
    import sys

    from internvl_batch import children
    from internvl_batch.replicas import ReplicaPool, _Replica

    monkeypatch.setattr(children, "module_argv",
                        lambda module, *args: [sys.executable, "-c", code, *map(str, args)])
    pool = ReplicaPool(EngineSpec(model="/m"), tmp_path / "cache", n)
    pool.procs = [_Replica(k, pool.spec, pool.cache_dir, tmp_path) for k in range(n)]
    for r in pool.procs:  # as if started: close() kills at once a replica still starting
        r.ready = {"ready": True}
        r.settled.set()
    return pool


def test_pool_closes_replicas_at_the_same_time(monkeypatch, tmp_path):
    """Each replica takes 1 s to close its engine after EOF on stdin: three close in about
    1 s, not 3 (issue 15: four H100 replicas stopped one after another took ~22 s)."""
    import time

    pool = _replicas_running(monkeypatch, tmp_path, 3,
                             "import sys, time; sys.stdin.buffer.read(); time.sleep(1.0)")
    procs = [r.child.proc for r in pool.procs]
    t0 = time.perf_counter()
    pool.close()
    took = time.perf_counter() - t0
    assert 1.0 <= took < 2.0, took
    assert [p.returncode for p in procs] == [0, 0, 0] and pool.procs == []


def test_pool_close_is_bounded(monkeypatch, tmp_path):
    """A replica that does not leave after EOF is killed (its whole group) at the deadline."""
    import time

    from internvl_batch import replicas

    monkeypatch.setattr(replicas, "STOP_TIMEOUT_S", 1.0)
    pool = _replicas_running(monkeypatch, tmp_path, 2,
                             "import sys, time; sys.stdin.buffer.read(); time.sleep(60)")
    procs = [r.child.proc for r in pool.procs]
    t0 = time.perf_counter()
    pool.close()
    assert time.perf_counter() - t0 < 3.0
    assert [p.returncode for p in procs] == [-9, -9]


# A stand-in for `python -m internvl_batch replica CONFIG`: ready after DELAYS[index] s (or
# failing to start if its index is in FAIL), then each batch answered as [(index, request)]
# after 0.05 s. cache_hit is false for replica 1 only.
FAKE_REPLICA = """
import json, sys, time
from internvl_batch.children import recv_frame, reply_file, send_frame
cfg = json.load(open(sys.argv[-1]))
k = cfg["index"]
reply = reply_file(cfg)
time.sleep(DELAYS[k])
if k in FAIL:
    send_frame(reply, (-1, {"ready": False, "error": "boom"}))
    sys.exit(1)
send_frame(reply, (-1, {"ready": True, "timings": {"total_s": 1.0}, "cache_key": "key",
                        "cache_hit": k != 1, "cache_fields": {}, "tokens_per_tile": 256,
                        "info": {"vllm": "v", "torch": "t", "device": "cpu", "cuda": False},
                        "timeline": {"engine": f"replica {k}", "phases": []}}))
while True:
    try:
        idx, reqs, sampling = recv_frame(sys.stdin.buffer, with_items=True)
    except EOFError:
        break
    time.sleep(0.05)
    send_frame(reply, (idx, {"results": [(k, r) for r in reqs], "busy_s": 0.05}))
"""


def _fake_pool(monkeypatch, tmp_path, n: int, delays: list[float], fail=(), log=print):
    import sys

    from internvl_batch import children, engine
    from internvl_batch.replicas import ReplicaPool

    code = FAKE_REPLICA.replace("DELAYS", repr(delays)).replace("FAIL", repr(set(fail)))
    monkeypatch.setattr(children, "module_argv",
                        lambda module, *args: [sys.executable, "-c", code, *map(str, args)])
    monkeypatch.setattr(engine, "has_cuda", lambda: False)
    return ReplicaPool(EngineSpec(model="/m"), tmp_path / "cache", n, log=log)


def _work(batches: int, size: int = 2):
    return [(b, [f"r{b}-{i}" for i in range(size)]) for b in range(batches)]


def test_pool_serves_from_its_first_ready_replica(monkeypatch, tmp_path):
    """Batches go to replica 0 while replica 1 is still starting; it joins when ready, and
    entry.hit and the timelines then cover both."""
    import time

    logs: list[str] = []
    pool = _fake_pool(monkeypatch, tmp_path, 2, [0.0, 4.0], log=logs.append)
    t0 = time.perf_counter()
    pool.start()
    try:
        assert time.perf_counter() - t0 < 3.0
        assert pool.entry.hit and [t["engine"] for t in pool.start_timelines()] == ["replica 0"]
        assert any(m.startswith("1 of 2 replicas ready in") for m in logs), logs
        out = list(pool.imap(_work(6), SamplingSpec()))
        assert [tag for tag, _ in out] == list(range(6))
        assert [res for _, res in out] == [[(0, f"r{b}-0"), (0, f"r{b}-1")] for b in range(6)]
        assert pool.wait_all() >= 3.5
        assert [t["engine"] for t in pool.start_timelines()] == ["replica 0", "replica 1"]
        assert not pool.entry.hit  # replica 1 built
        assert any(m.startswith("replica 1 joined at") and "(2 of 2 ready)" in m for m in logs)
        # both serve now; rows still in input order
        out = list(pool.imap(_work(40), SamplingSpec()))
        assert [tag for tag, _ in out] == list(range(40))
        assert [[r for _, r in res] for _, res in out] == [r for _, r in _work(40)]
        assert {k for _, res in out for k, _ in res} == {0, 1}
        assert pool.info()["replicas"] == 2
    finally:
        pool.close()


def test_pool_goes_on_when_a_late_replica_fails_to_start(monkeypatch, tmp_path):
    logs: list[str] = []
    pool = _fake_pool(monkeypatch, tmp_path, 3, [0.0, 0.5, 0.5], fail={2}, log=logs.append)
    pool.start()
    try:
        # spans the failure: 30 batches of 0.05 s each on one or two replicas
        out = list(pool.imap(_work(30), SamplingSpec()))
        assert [tag for tag, _ in out] == list(range(30))
        assert [[r for _, r in res] for _, res in out] == [r for _, r in _work(30)]
        assert 2 not in {k for _, res in out for k, _ in res}
        pool.wait_all()
        assert any("engine replica 2 failed to start: boom; going on with 2 of 3" in m
                   for m in logs), logs
        assert pool.info()["replicas"] == 2
        assert [t["engine"] for t in pool.start_timelines()] == ["replica 0", "replica 1"]
        assert not any("#2" in m for m in logs if m.startswith("replicas busy")), logs
    finally:
        pool.close()


def test_pool_start_fails_when_every_replica_fails(monkeypatch, tmp_path):
    import pytest

    pool = _fake_pool(monkeypatch, tmp_path, 2, [0.0, 0.2], fail={0, 1}, log=lambda m: None)
    with pytest.raises(RuntimeError, match="engine replica 0 failed to start: boom"):
        pool.start()
    assert pool.procs == []


def test_pool_close_while_replicas_start(monkeypatch, tmp_path):
    """Replicas still starting (they read no stdin yet) are killed at once, quietly."""
    import time

    logs: list[str] = []
    pool = _fake_pool(monkeypatch, tmp_path, 3, [0.0, 60.0, 60.0], log=logs.append)
    pool.start()
    reps = list(pool.procs)
    t0 = time.perf_counter()
    pool.close()
    assert time.perf_counter() - t0 < 3.0
    assert [r.child.proc.returncode for r in reps] == [0, -9, -9]
    assert all(r.settled.is_set() for r in reps)  # nothing waits on them forever
    assert not any("failed to start" in m for m in logs), logs
