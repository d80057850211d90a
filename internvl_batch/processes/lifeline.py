"""No process outlives the run: a child leaves when its parent is gone, and main waits for
what is below it before it exits.

`watch` runs in every process started here (replicas, decode workers, the benchmark's
workers) and in vLLM's engine cores and workers (they start through start.ChildProcess): a
thread that waits for the process that asked for it to end, then leaves. Without it a
`kill -9` of main (as the OOM killer does) left vLLM's engine cores running for minutes:
vLLM's engine core has no watch on its parent (its workers do, on the engine core).

Why not prctl(PR_SET_PDEATHSIG): it follows the kernel's parent, which for a process of the
fork server is the server, not the replica or main that asked for it; and it fires when
the parent *thread* that started the child exits (a pool's helper thread), not the process.
The watch names the asker by pid and start time (a pid can be reused), and waits on a
pidfd (Linux >= 5.3), else reads /proc twice a second.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

Parent = tuple  # (pid, start time in clock ticks since boot), from `token`
POLL_S = 0.5  # without a pidfd: how often /proc is read


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), or None
    if it is gone (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def token() -> Parent:
    """This process, as a child's `watch` names it."""
    return (os.getpid(), start_time(os.getpid()))


def watch(parent: Parent | None, *, take_group: bool = False) -> None:
    """In a child: leave (exit 1, no cleanup) once `parent` has ended. `take_group`: this
    process leads a group of its own (a replica): SIGKILL the group, its engine core and
    workers with it. Returns at once; the watch is a daemon thread."""
    if not parent or parent[1] is None or parent[0] == os.getpid():
        return
    threading.Thread(target=_watch, args=(tuple(parent), take_group), daemon=True,
                     name="ivb-lifeline").start()


def _watch(parent: Parent, take_group: bool) -> None:
    pid, started = parent
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # Python < 3.9, Linux < 5.3, or already gone
        fd = None
    if start_time(pid) == started:  # still there after the pidfd: it is the right process
        if fd is not None:
            poll = select.poll()  # not select(): a process of vLLM may hold fds past 1024
            poll.register(fd, select.POLLIN)
            poll.poll()  # readable once it has exited
        else:
            while start_time(pid) == started:
                time.sleep(POLL_S)
    _orphaned(pid, take_group)


def _orphaned(pid: int, take_group: bool) -> None:
    # one line where our stderr goes, given half a second: a pipe that nobody reads any
    # more must not keep us
    say = threading.Thread(target=_say, args=(
        f"internvl-batch: process {os.getpid()} leaves: its parent {pid} has ended",), daemon=True)
    say.start()
    say.join(0.5)
    if take_group and os.getpgrp() == os.getpid():
        os.killpg(0, signal.SIGKILL)  # ourselves included
    os._exit(1)


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


# -- main: the end of the command ------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def become_subreaper() -> bool:
    """Make processes orphaned below this one its children instead of init's: a process of
    the fork server (the kernel's parent of the replicas and engine cores) whose server has
    gone is then ours, and `reap_descendants` waits for it (on an H200, engine cores that
    outlived `run` held the replicas' GPU memory when the next command's engine asked for
    it). Linux only; False elsewhere."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _descendants() -> list[int]:
    """Living processes below this one, except the resource tracker of multiprocessing (it
    leaves when we do); zombies among our children are reaped on the way."""
    from ..stats import _proc_stat, _process_tree, _role

    while True:  # reap what has exited (our children, orphans adopted as a subreaper)
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    alive = []
    root = os.getpid()
    for pid, _ in _process_tree(root)[1:]:
        try:
            if _proc_stat(pid)[0] == "Z":
                continue
        except OSError:  # gone meanwhile
            continue
        if _role(pid, root) != "resource tracker":  # host_memory's names
            alive.append(pid)
    return alive


def _stop_fork_server() -> None:
    """Let the fork server that this process started go: it leaves at EOF on its `alive`
    pipe, whose write end only its starter holds (start._attach). What it forked is not
    affected."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None and getattr(server, "_forkserver_pid", None) is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None


def reap_descendants(grace_s: float = 8.0, term_s: float = 3.0) -> dict:
    """Before the command exits: stop our fork server (EOF on its `alive` pipe), wait up to
    `grace_s` for every process below us to exit, SIGTERM what is left, wait `term_s`,
    SIGKILL the rest. Returns {"waited_s", "left" (after the grace), "killed"}."""
    _stop_fork_server()
    t0 = time.monotonic()
    out = {"waited_s": 0.0, "left": 0, "killed": 0}
    for sig, limit in ((None, grace_s), (signal.SIGTERM, term_s), (signal.SIGKILL, 2.0)):
        pids = _descendants()
        if sig is not None and pids:
            out["left" if sig == signal.SIGTERM else "killed"] = len(pids)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + limit
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = _descendants()
        if not pids:
            break
    out["waited_s"] = round(time.monotonic() - t0, 2)
    return out
