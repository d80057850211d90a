"""How vLLM's engine-core process starts: spawned, or forked from a fork server.

vLLM starts its engine core in a new process. Spawned (a fresh interpreter), that process
imports torch and vLLM again after `LLM()` asks for it: 17.7-27 s per replica on an H200
with four replicas starting at once (results/h200/issue15-forkserver/). Forked straight
from an engine's process it would skip them, but that process has threads and may have
touched CUDA; tried on the H200, four forked engine cores hung at their first step.

The middle way is Python's fork server: a clean, single-threaded process, started before we
import vLLM, that imports torch and vLLM (`_preload`) while this process does its own work,
and then forks each engine core on request. It never touches CUDA, so the fork is safe.

Two things a fork from the server would get wrong, and `EnvProcess` carries over:
* the environment: the server's is the one of the moment it started, but vLLM and we set
  variables for the engine core later (compile-cache folders, the gate of hooks.py);
* stdout/stderr: `LogTap` points fd 1/2 at a pipe after the server started, and the engine
  core's log lines must reach that pipe (they make the start timeline and the timings).
Variables that a preloaded module reads once at import (HF_HOME in huggingface_hub) must be
set before `start_server`.

Measured on an H200 (results/h200/issue15-forkserver/, four replicas, InternVL3-1B shapes):
the engine core was up 1.9-4.2 s after vLLM resolved the config instead of 17.7-27 s
spawned; warm, the first row came after 46.6 s instead of 61.5 s in the same call, cold
after 128.5 s instead of 163.7 s. So it is the default; `INTERNVL_BATCH_ENGINE_START=spawn`
goes back to vLLM's way.
"""
from __future__ import annotations

import os
from multiprocessing import context, forkserver, reduction

ENV = "INTERNVL_BATCH_ENGINE_START"
PRELOAD = ["internvl_batch._preload"]


def wanted() -> bool:
    mode = os.environ.get(ENV, "forkserver")
    if mode not in ("spawn", "forkserver"):
        from .config import ConfigError

        raise ConfigError(f"{ENV}={mode!r}: set it to spawn or forkserver, or unset it")
    return mode == "forkserver"


def start_server() -> None:
    """Start the fork server if it is not running. Returns at once: the server imports
    torch and vLLM in the background, and the first fork waits for it."""
    forkserver.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


class EnvProcess(context.ForkServerProcess):
    """A fork-server process that runs with the environment and fds 1/2 that its parent has
    when it starts it (not those the server had when it started)."""

    def __getstate__(self):
        state = dict(self.__dict__)
        # DupFd: the fds travel to the server with the request (SCM_RIGHTS)
        state["_ivb_env"] = dict(os.environ)
        state["_ivb_fds"] = (reduction.DupFd(1), reduction.DupFd(2))
        return state

    def __setstate__(self, state):
        env = state.pop("_ivb_env")
        fds = state.pop("_ivb_fds")
        self.__dict__.update(state)
        os.environ.clear()
        os.environ.update(env)
        for target, dup in zip((1, 2), fds):
            fd = dup.detach()
            if fd != target:
                os.dup2(fd, target)
                os.close(fd)


class _Context(context.ForkServerContext):
    Process = EnvProcess


def use_for_vllm() -> bool:
    """Make vLLM start its engine cores from our fork server (call after importing vllm);
    False where this vLLM does not start them the way 0.26 and 0.32 do (the context from
    `get_mp_context()`, imported by name into `vllm.v1.engine.utils`): it spawns them."""
    import importlib

    try:
        engine_utils = importlib.import_module("vllm.v1.engine.utils")
    except ImportError:
        return False
    if not callable(getattr(engine_utils, "get_mp_context", None)):
        return False
    ctx = _Context()
    engine_utils.get_mp_context = lambda: ctx
    return True
