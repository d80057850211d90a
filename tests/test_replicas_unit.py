"""The replica wire format and memory plan, without vLLM."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from internvl_batch.config import EngineSpec, SamplingSpec
from internvl_batch.processes.children import recv_frame, send_frame
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


MODES = ["forked", "spawned"]  # from the fork server (CPU's default) or spawned (a GPU's)


def _use_mode(monkeypatch, mode: str, target, **fake):
    """Replica processes run `target(cfg, commands, reply, **fake)` instead of an engine (no
    vLLM): forked from the fork server (preloading nothing), or spawned."""
    import json

    from internvl_batch import replicas
    from internvl_batch.processes import start

    monkeypatch.setenv("IVB_FAKE_REPLICA", json.dumps([target.__name__, fake]))
    monkeypatch.setattr(replicas, "main", _fake)
    monkeypatch.setattr(start, "PRELOAD_REPLICA", [])
    if mode == "forked":
        monkeypatch.delenv(start.ENV, raising=False)
    else:
        monkeypatch.setenv(start.ENV, "spawn")


def _fake(cfg, fds):
    """A replica's process target (replicas.main's place)."""
    import json
    import os

    name, fake = json.loads(os.environ["IVB_FAKE_REPLICA"])
    return globals()[name](cfg, os.fdopen(fds["command"], "rb"), os.fdopen(fds["reply"], "wb"),
                           **fake)


def _sleeper(cfg, commands, reply, sleep: float):
    import time

    reply.write(b"up\n")
    reply.flush()
    commands.read()
    time.sleep(sleep)


def _replicas_running(monkeypatch, tmp_path, n: int, mode: str, sleep: float):
    """`n` real replica processes that sleep `sleep` s after EOF on their command pipe."""
    from internvl_batch.replicas import ReplicaPool, _Replica

    _use_mode(monkeypatch, mode, _sleeper, sleep=sleep)
    pool = ReplicaPool(EngineSpec(model="/m"), tmp_path / "cache", n)
    pool.procs = [_Replica(k, pool.spec, pool.cache_dir, forked=mode == "forked")
                  for k in range(n)]
    for r in pool.procs:  # as if started: close() kills at once a replica still starting
        assert r.replies.readline() == b"up\n"  # running (imports done): time only the close
        r.ready = {"ready": True}
        r.settled.set()
    return pool


@pytest.mark.parametrize("mode", MODES)
def test_pool_closes_replicas_at_the_same_time(monkeypatch, tmp_path, mode):
    """Each replica takes 1 s to close its engine after EOF on its command pipe: three
    close in about 1 s, not 3 (four H100 replicas stopped one after another took ~22 s)."""
    import time

    pool = _replicas_running(monkeypatch, tmp_path, 3, mode, 1.0)
    procs = [r.child.proc for r in pool.procs]
    t0 = time.perf_counter()
    pool.close()
    took = time.perf_counter() - t0
    assert 1.0 <= took < 2.0, took
    assert [p.returncode for p in procs] == [0, 0, 0] and pool.procs == []


@pytest.mark.parametrize("mode", MODES)
def test_pool_close_is_bounded(monkeypatch, tmp_path, mode):
    """A replica that does not leave after EOF is killed (its whole group) at the deadline."""
    import time

    from internvl_batch import replicas

    monkeypatch.setattr(replicas, "STOP_TIMEOUT_S", 1.0)
    pool = _replicas_running(monkeypatch, tmp_path, 2, mode, 60.0)
    procs = [r.child.proc for r in pool.procs]
    t0 = time.perf_counter()
    pool.close()
    assert time.perf_counter() - t0 < 3.0
    assert [p.returncode for p in procs] == [-9, -9]


def _engine_stand_in(cfg, commands, reply, delays: list[float], fail: list[int]):
    """A stand-in for a replica's `main`: ready after delays[index] s (or failing to start
    if its index is in `fail`), then each batch answered as [(index, request)] after
    0.05 s. cache_hit is false for replica 1 only."""
    import time

    from internvl_batch.processes.children import recv_frame, send_frame

    k = cfg["index"]
    time.sleep(delays[k])
    if k in fail:
        send_frame(reply, (-1, {"ready": False, "error": "boom"}))
        return 1
    send_frame(reply, (-1, {"ready": True, "timings": {"total_s": 1.0}, "cache_key": "key",
                            "cache_hit": k != 1, "cache_fields": {}, "tokens_per_tile": 256,
                            "info": {"vllm": "v", "torch": "t", "device": "cpu", "cuda": False},
                            "timeline": {"engine": f"replica {k}", "phases": []}}))
    while True:
        try:
            idx, reqs, sampling = recv_frame(commands, with_items=True)
        except EOFError:
            return 0
        time.sleep(0.05)
        send_frame(reply, (idx, {"results": [(k, r) for r in reqs], "busy_s": 0.05}))


def _fake_pool(monkeypatch, tmp_path, n: int, delays: list[float], fail=(), log=print,
               mode: str = "forked"):
    from internvl_batch import engine
    from internvl_batch.replicas import ReplicaPool

    _use_mode(monkeypatch, mode, _engine_stand_in, delays=delays, fail=list(fail))
    monkeypatch.setattr(engine, "has_cuda", lambda: False)
    return ReplicaPool(EngineSpec(model="/m"), tmp_path / "cache", n, log=log)


def _work(batches: int, size: int = 2):
    return [(b, [f"r{b}-{i}" for i in range(size)]) for b in range(batches)]


@pytest.mark.parametrize("mode", MODES)
def test_pool_serves_from_its_first_ready_replica(monkeypatch, tmp_path, mode):
    """Batches go to replica 0 while replica 1 is still starting; it joins when ready, and
    entry.hit and the timelines then cover both."""
    import time

    logs: list[str] = []
    pool = _fake_pool(monkeypatch, tmp_path, 2, [0.0, 4.0], log=logs.append, mode=mode)
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


def test_a_result_back_is_handed_on_before_more_batches_are_made(monkeypatch, tmp_path):
    """The first rows must not wait for the read-ahead: with batches that take 0.5 s each to
    make (decoding), batch 0's result (back after 0.05 s) is yielded once batch 1 is made,
    not after the 5 batches that two replicas may hold (on H100 the first row came 2.2-2.5 s
    after the replicas were ready, for a 32-image first batch)."""
    import time

    events: list[str] = []

    def work():
        for b in range(6):
            if b:
                time.sleep(0.5)
            events.append(f"made {b}")
            yield b, [f"r{b}-0"]

    pool = _fake_pool(monkeypatch, tmp_path, 2, [0.0, 0.0], log=lambda m: None)
    pool.start()
    try:
        pool.wait_all()
        for tag, res in pool.imap(work(), SamplingSpec()):
            events.append(f"got {tag}")
            assert [r for _, r in res] == [f"r{tag}-0"]
    finally:
        pool.close()
    assert events.index("got 0") < events.index("made 2"), events
    assert [e for e in events if e.startswith("got")] == [f"got {b}" for b in range(6)]


@pytest.mark.parametrize("mode", MODES)
def test_pool_goes_on_when_a_late_replica_fails_to_start(monkeypatch, tmp_path, mode):
    logs: list[str] = []
    pool = _fake_pool(monkeypatch, tmp_path, 3, [0.0, 0.5, 0.5], fail={2}, log=logs.append, mode=mode)
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


@pytest.mark.parametrize("mode", MODES)
def test_pool_start_fails_when_every_replica_fails(monkeypatch, tmp_path, mode):
    import pytest

    pool = _fake_pool(monkeypatch, tmp_path, 2, [0.0, 0.2], fail={0, 1}, log=lambda m: None, mode=mode)
    with pytest.raises(RuntimeError, match="engine replica 0 failed to start: boom"):
        pool.start()
    assert pool.procs == []


@pytest.mark.parametrize("mode", MODES)
def test_pool_close_while_replicas_start(monkeypatch, tmp_path, mode):
    """Replicas still starting (they read no commands yet) are killed at once, quietly."""
    import time

    logs: list[str] = []
    pool = _fake_pool(monkeypatch, tmp_path, 3, [0.0, 60.0, 60.0], log=logs.append, mode=mode)
    pool.start()
    reps = list(pool.procs)
    t0 = time.perf_counter()
    pool.close()
    assert time.perf_counter() - t0 < 3.0
    assert [r.child.proc.returncode for r in reps] == [0, -9, -9]
    assert all(r.settled.is_set() for r in reps)  # nothing waits on them forever
    assert not any("failed to start" in m for m in logs), logs


def test_the_replicas_fork_server_imports_with_their_thread_share(monkeypatch, tmp_path):
    """Forked replicas (and their engine cores) get the thread pools a spawned replica's
    import would size: the server imports torch with OMP_NUM_THREADS at the replicas'
    share (16 cores, 4 replicas: 2), unless the user set it."""
    from internvl_batch import engine, replicas
    from internvl_batch.processes import start as procstart

    seen = []

    def fake_server(preload, env=None):
        seen.append(dict(env or {}))
        raise RuntimeError("stop here")

    monkeypatch.setattr(engine, "has_cuda", lambda: True)
    monkeypatch.setattr(replicas, "usable_cpus", lambda: 16)
    monkeypatch.setattr(procstart, "start_server", fake_server)
    monkeypatch.setenv(procstart.ENV, "forkserver")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    pool = replicas.ReplicaPool(EngineSpec(model="/m"), tmp_path / "cache", 4, log=lambda m: None)
    with pytest.raises(RuntimeError, match="stop here"):
        pool.start()
    assert seen[-1]["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's: left to the environment
    with pytest.raises(RuntimeError, match="stop here"):
        replicas.ReplicaPool(EngineSpec(model="/m"), tmp_path / "cache", 4,
                             log=lambda m: None).start()
    assert "OMP_NUM_THREADS" not in seen[-1]
