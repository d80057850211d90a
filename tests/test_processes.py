"""processes: how the run's processes start (the fork server: a child gets its parent's
environment and fds 1/2 as of the fork, not the server's; fast: a server without preload, no
vLLM), and how they end (the lifeline, the reaper)."""
from __future__ import annotations

import os
import sys
from multiprocessing import forkserver
from pathlib import Path

import pytest

from internvl_batch.processes import lifeline, start as procstart
from internvl_batch.config import ConfigError


def _child(path):
    print(f"env={os.environ.get('IVB_PROCSTART_T')}", flush=True)
    print("err", file=sys.stderr, flush=True)
    with open(path, "w") as f:
        f.write(os.environ.get("IVB_PROCSTART_T", "unset"))


def test_one_start_method_from_the_environment(monkeypatch):
    for k in (procstart.ENV, *procstart._RETIRED):
        monkeypatch.delenv(k, raising=False)
    assert procstart.method() == "auto" and procstart.engine_from_server()  # the default
    monkeypatch.setenv(procstart.ENV, "spawn")
    assert procstart.method() == "spawn" and not procstart.engine_from_server()
    monkeypatch.setenv(procstart.ENV, "forkserver")
    assert procstart.engine_from_server()
    monkeypatch.setenv(procstart.ENV, "fork")
    with pytest.raises(ConfigError, match="auto, forkserver or spawn, or unset it"):
        procstart.method()
    monkeypatch.setenv(procstart.ENV, "auto")
    monkeypatch.setenv("INTERNVL_BATCH_ENGINE_START", "spawn")  # the switch it replaced
    with pytest.raises(ConfigError, match="^INTERNVL_BATCH_ENGINE_START is no longer read: "
                                          "set INTERNVL_BATCH_START_METHOD"):
        procstart.method()


def test_forked_child_gets_the_env_and_fds_of_the_moment(tmp_path, monkeypatch):
    forkserver.ensure_running()  # this test process's server: started before the changes
    monkeypatch.setenv("IVB_PROCSTART_T", "set after the server started")
    out, err, seen = tmp_path / "out", tmp_path / "err", tmp_path / "seen"
    saved = os.dup(1), os.dup(2)
    try:
        with open(out, "w") as fo, open(err, "w") as fe:
            os.dup2(fo.fileno(), 1)
            os.dup2(fe.fileno(), 2)
            p = procstart.get_context(True).Process(target=_child, args=(str(seen),))
            p.start()
            p.join(30)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    assert p.exitcode == 0
    assert seen.read_text() == "set after the server started"
    assert out.read_text() == "env=set after the server started\n"
    assert err.read_text() == "err\n"


def test_a_vllm_without_the_hook_keeps_spawning(monkeypatch):
    """Where vLLM's module or its get_mp_context is missing, nothing is patched: vLLM
    spawns its engine core, and the engine says so (`engine_start`). The executor's
    workers are patched where their module has the hook."""
    import types

    fake = types.ModuleType("vllm.v1.engine.utils")
    workers = types.ModuleType("vllm.v1.executor.multiproc_executor")
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.utils", fake)
    monkeypatch.setitem(sys.modules, "vllm.v1.executor.multiproc_executor", workers)
    monkeypatch.delenv(procstart.ENV, raising=False)
    assert procstart.use_for_vllm() is False
    fake.get_mp_context = lambda: "vllm's own"
    assert procstart.use_for_vllm() is True
    assert isinstance(fake.get_mp_context(), procstart._ForkServerContext)
    assert not hasattr(workers, "get_mp_context")
    workers.get_mp_context = lambda: "vllm's own"
    assert procstart.use_for_vllm() is True
    assert isinstance(workers.get_mp_context(), procstart._ForkServerContext)
    # spawned, they still start as ours: with a lifeline
    monkeypatch.setenv(procstart.ENV, "spawn")
    assert procstart.use_for_vllm() is True
    assert isinstance(fake.get_mp_context(), procstart._SpawnContext)


def test_replicas_are_forked_on_cpu_and_spawned_on_a_gpu_unless_asked(monkeypatch):
    """On an H200 forked replicas served a third of the spawned ones' images/s
    (docs/performance.md): `auto` spawns them on a GPU, `forkserver` forks them there too,
    `spawn` spawns everything."""
    monkeypatch.delenv(procstart.ENV, raising=False)
    assert [procstart.fork_replicas(cuda) for cuda in (False, True)] == [True, False]
    monkeypatch.setenv(procstart.ENV, "forkserver")
    assert [procstart.fork_replicas(cuda) for cuda in (False, True)] == [True, True]
    monkeypatch.setenv(procstart.ENV, "spawn")
    assert [procstart.fork_replicas(cuda) for cuda in (False, True)] == [False, False]


def _threads(path):
    import torch

    with open(path, "w") as f:
        f.write(f"{torch.get_num_threads()} {os.environ['OMP_NUM_THREADS']}")


def test_a_forked_child_gets_the_thread_budget_of_its_environment(tmp_path, monkeypatch):
    """torch sizes its thread pool at import: in a forked child, at the server's, which
    knew nothing of the share a replica gives its engine core (OMP_NUM_THREADS). The child
    applies its own. The server preloads torch here (unless this test process started one
    before; the engine tests start it with torch and vLLM). One thread: the budget that
    differs from torch's default on any machine (a fresh import caps it at the cores)."""
    import torch

    n = 1
    forkserver.set_forkserver_preload(["torch"])
    forkserver.ensure_running()
    monkeypatch.setenv("OMP_NUM_THREADS", str(n))
    seen = tmp_path / "seen"
    p = procstart.get_context(True).Process(target=_threads, args=(str(seen),))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert seen.read_text() == f"{n} {n}"
    # the function itself, in this process (whose torch is imported)
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", str(before + 1))
        procstart._threads_from_env()
        assert torch.get_num_threads() == before + 1
        monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a number: left as it is
        procstart._threads_from_env()
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_a_bad_mode_is_one_line_before_any_engine(tmp_path, monkeypatch):
    """Read by every replica process; checked once in `run` first, so a typo is a user
    error (exit 2, one line, nothing written), not N replicas dying while they start."""
    from click.testing import CliRunner

    from internvl_batch.cli import cli

    monkeypatch.setenv(procstart.ENV, "fork")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["run", "--dataset", "sample", "--replicas", "2", "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert res.output.splitlines() == [
        f"Error: {procstart.ENV}='fork': set it to auto, forkserver or spawn, or unset it"]
    assert not out.exists()
    monkeypatch.delenv(procstart.ENV)
    monkeypatch.setenv("INTERNVL_BATCH_REPLICA_START", "fork")
    res = CliRunner().invoke(cli, ["run", "--dataset", "sample", "--replicas", "2", "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert res.output.splitlines() == [
        f"Error: INTERNVL_BATCH_REPLICA_START is no longer read: set {procstart.ENV} to auto, "
        "forkserver or spawn instead (or unset both)"]
    assert not out.exists()


def _grandchild(path):
    with open(path, "w") as f:
        f.write(f"{os.getppid()} {os.getpgrp()} {procstart.attached()}")


def _replica_like(path, fds):
    """Forked by the server; starts a process of its own through our context, as a replica
    starts vLLM's engine core."""
    got = os.read(fds["command"], 100).decode()
    p = procstart.get_context(True).Process(target=_grandchild, args=(path + ".g",))
    p.start()
    p.join(30)
    with open(path, "w") as f:
        f.write(f"{os.getpid()} {os.getpgrp()} {procstart.attached()} {got} {p.exitcode}")


def test_a_forked_child_forks_through_the_same_server(tmp_path):
    """A replica forked from the server is attached to it: its engine core comes from the
    same server (CPython's own forkserver would start a second one, importing everything
    again), and joins the replica's process group, so killing that group stops both."""
    forkserver.ensure_running()
    server_pid = forkserver._forkserver._forkserver_pid
    r, w = os.pipe()
    path = str(tmp_path / "seen")
    p = procstart.get_context(True).Process(target=_replica_like, args=(path,),
                                            pass_fds={"command": r}, own_group=True)
    p.start()
    os.close(r)
    os.write(w, b"hello")
    os.close(w)
    p.join(60)
    assert p.exitcode == 0
    pid, pgid, attached, got, code = open(path).read().split()
    assert int(pgid) == int(pid) == p.pid and attached == "True"
    assert (got, code) == ("hello", "0")
    ppid, gpgid, _ = open(path + ".g").read().split()
    assert int(ppid) == server_pid  # forked by the same server
    assert int(gpgid) == p.pid      # in the group of the process that asked for it
    assert not procstart.attached()  # this process started the server: not attached


_REAP = r"""
import json, subprocess, sys
from internvl_batch.processes.lifeline import _descendants, become_subreaper, reap_descendants
assert become_subreaper()
kinds = {
    "ignores SIGTERM": "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
    "stops on SIGTERM": "import time; time.sleep(60)",
    "ends by itself": "import time; time.sleep(0.3)",
}
for code in kinds.values():  # each orphaned at once: its parent leaves after starting it
    subprocess.run([sys.executable, "-c",
                    f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {code!r}])"])
before = len(_descendants())
print(json.dumps(dict(reap_descendants(grace_s=1.5, term_s=1.5), before=before,
                      after=len(_descendants()))))
"""


def test_the_command_waits_for_its_orphans_and_stops_the_stragglers():
    """`run` adopts what is orphaned below it (vLLM's engine core, once the fork server is
    gone) and does not exit before it has: one orphan ends by itself in the grace, one on
    SIGTERM, one only on SIGKILL; none is left after."""
    import json
    import subprocess

    p = subprocess.run([sys.executable, "-c", _REAP], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.splitlines()[-1])
    assert got["before"] == 3 and got["after"] == 0, got
    assert (got["left"], got["killed"]) == (2, 1), got
    assert 3.0 <= got["waited_s"] < 6.0, got


# -- the lifeline: main killed with no chance to clean up --------------------------------------

def _orphan_worker():  # stands for vLLM's worker: lives until its asker is gone
    import time

    time.sleep(120)


def _orphan_core(forked: bool):  # stands for vLLM's engine core: asks for a worker
    import time

    procstart.get_context(forked).Process(target=_orphan_worker, name="ivb-t-worker").start()
    time.sleep(120)


def _orphan_replica(cfg: dict, fds: dict) -> int:  # a replica (children.Child's target)
    import time

    procstart.get_context(cfg["forked"]).Process(target=_orphan_core, args=(cfg["forked"],),
                                                 name="ivb-t-core").start()
    os.write(fds["reply"], b"started\n")
    time.sleep(120)
    return 0


def _orphan_main(forked: bool):
    """A run's main in miniature: the fork server (forked), two decode workers, two
    replicas, each with an "engine core" that has a "worker"; then it waits to be killed."""
    import time

    from internvl_batch import images
    from internvl_batch.processes import children

    if forked:
        procstart.start_server([])  # no preload: fast
    pool = images.make_pool(2)
    images.start_workers(pool, 2)
    reps = [children.Child(_orphan_replica, {"forked": forked}, forked=forked,
                           name=f"ivb-t-replica{k}") for k in range(2)]
    assert [r.read_line() for r in reps] == [b"started"] * 2
    print("ready", flush=True)
    time.sleep(120)


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "spawned"])
def test_a_kill_9_of_main_leaves_no_process_behind(forked):
    """Every process below main (decode workers, replicas, what they asked for, the fork
    server, multiprocessing's resource tracker) leaves within a few seconds of main's
    `kill -9`, though the forked ones are the fork server's children in /proc, not their
    asker's, and nothing signals them. Without the lifeline all of them stayed."""
    import signal
    import subprocess
    import time

    from tests.helpers import descendants, still_alive

    root = str(Path(__file__).resolve().parents[1])
    main = subprocess.Popen(
        [sys.executable, "-c", f"from tests.test_processes import _orphan_main; "
                               f"_orphan_main({forked})"],
        cwd=root, stdout=subprocess.PIPE, text=True, start_new_session=True)
    tree = {}
    try:
        assert main.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 60
        while list(tree.values()).count("ivb-t-worker") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            tree = descendants(main.pid)
        names = sorted(tree.values())
        assert names.count("ivb-t-worker") == names.count("ivb-t-core") == 2, names
        assert len(tree) == 2 + 6 + 1 + forked, names  # decode, replicas..., tracker, server
        main.kill()  # SIGKILL: no handler, no cleanup
        main.wait()
        left = still_alive(tree, within_s=5.0)
        assert left == {}, (left, tree)
    finally:
        for pid in set(tree) | {main.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_the_watch_works_without_a_pidfd():
    """Where os.pidfd_open is missing (Python < 3.9) or fails (Linux < 5.3), the watch
    reads /proc: the child leaves within a poll of its parent's end (a zombie counts)."""
    import subprocess
    import time

    code = ("import os, subprocess, sys; del os.pidfd_open\n"
            "from internvl_batch.processes import lifeline\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1)'])\n"
            "lifeline._watch((p.pid, lifeline.start_time(p.pid)), False)\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=30)
    took = time.monotonic() - t0
    assert p.returncode == 1, p.stderr
    assert "its parent" in p.stderr and "has ended" in p.stderr
    assert 1.0 <= took < 1.0 + lifeline.POLL_S + 1.5, took
