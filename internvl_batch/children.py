"""Child processes of this package: `python -m internvl_batch ...` workers with pipes.

One helper for every place that starts a worker (engine replicas, benchmark variants): the
command line, a process group of its own (so vLLM's engine-core processes stop with the
worker), stdin as the command pipe, a second pipe for replies whose write end the child finds
in its JSON config as `reply_fd`, and stopping: wait, then kill the whole group.
`ForkedChild` is the same worker forked from procstart's fork server instead (replicas).
"""
from __future__ import annotations

import json
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

# the signals that stop a run (Slurm preemption: SIGUSR1/SIGTERM; Ctrl-C: SIGINT). `run`
# traps them (pipeline._Signals) and its decode workers ignore them (images.make_pool):
# one list for both
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


# Pickles are self-delimiting, so they go straight onto the pipe: a batch is a header and
# then one pickle per request. One 150 MB bytes object per batch of 256 decoded images cost
# ~4.6 ms per image to build and as much to unpickle on a 2-core machine (page faults of a
# fresh buffer); streamed, each image is a small, reused write.

def send_frame(f, obj, items: list | None = None) -> None:
    pickle.dump(obj, f, protocol=5)
    for it in items or ():
        pickle.dump(it, f, protocol=5)
    f.flush()


def recv_frame(f, with_items: bool = False):
    head = pickle.load(f)  # EOFError when the other side is gone
    if not with_items:
        return head
    idx, n, extra = head
    return idx, [pickle.load(f) for _ in range(n)], extra


def module_argv(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *map(str, args)]


class Child:
    """`python -m internvl_batch *args CONFIG` where CONFIG (written to `config_path`) is
    `config` plus `reply_fd`. Output goes to `log_path` (stdout and stderr), else to our
    stderr. `text`: stdin takes str (JSON lines) instead of bytes (pickles)."""

    def __init__(self, args: list[str], config: dict, config_path: Path, *,
                 log_path: Path | None = None, env: dict[str, str] | None = None,
                 text: bool = False):
        r, w = os.pipe()
        config_path.write_text(json.dumps(dict(config, reply_fd=w), indent=1))
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else None
        child_env = dict(os.environ, PYTHONUNBUFFERED="1")
        child_env.update(env or {})
        self.proc = subprocess.Popen(
            module_argv("internvl_batch", *args, config_path), stdin=subprocess.PIPE,
            stdout=self._log or sys.stderr.fileno(),
            stderr=subprocess.STDOUT if self._log else None, pass_fds=(w,), env=child_env,
            text=text, start_new_session=True)  # its own group: vLLM's processes stop with it
        os.close(w)
        self.reply_fd = r
        self._buf = b""

    def send_json(self, doc: dict):
        """One JSON line on stdin (a `text` child)."""
        self.proc.stdin.write(json.dumps(doc) + "\n")
        self.proc.stdin.flush()

    def read_line(self) -> bytes | None:
        """The next line on the reply pipe; None once the child has closed it or exited."""
        while b"\n" not in self._buf:
            chunk = self.read_available(2.0)
            if chunk is None and self.proc.poll() is None:
                continue
            if chunk is None:  # it may have written its last line just before exiting
                chunk = self.read_available(0.5)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def read_available(self, timeout: float) -> bytes | None:
        """Bytes from the reply pipe within `timeout` s: b'' at EOF, None if nothing came."""
        ready, _, _ = select.select([self.reply_fd], [], [], timeout)
        return os.read(self.reply_fd, 65536) if ready else None

    def kill_group(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self):
        """Close stdin: the child's signal to finish. `stop` then waits for it; several
        children told first and waited for after stop in the time of the slowest one."""
        try:
            self.proc.stdin.close()
        except Exception:
            pass

    def stop(self, timeout: float, *, force: bool = False, kill_rest: bool = False):
        """Close stdin (the child's signal to finish) and wait up to `timeout` s, then kill
        its group; `force`: kill at once; `kill_rest`: kill the group also after a clean
        exit (whatever of vLLM's processes outlived the worker)."""
        try:
            if force:
                raise TimeoutError("aborting")
            self.finish()
            self.proc.wait(timeout=max(timeout, 0.0))
        except Exception:
            self.kill_group()
            self.proc.wait()
        if kill_rest:
            self.kill_group()
        if self._log:
            self._log.close()
        try:
            os.close(self.reply_fd)
        except OSError:
            pass

    def tail(self, n: int = 25) -> str:
        """The last `n` lines of its log file ('' without one)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, AttributeError):
            return ""
        return "\n".join(lines[-n:])


class _Forked:
    """The `Popen` calls that Child's users make (`stdin`, `pid`, `poll`, `wait`,
    `returncode`) on a process forked by the fork server: its exit status comes from the
    server over a pipe that one reader may read, hence the lock."""

    def __init__(self, process, stdin):
        self._p, self.stdin, self.pid = process, stdin, process.pid
        self._lock = threading.Lock()

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        with self._lock:
            return self._p.exitcode

    def wait(self, timeout: float | None = None) -> int:
        from multiprocessing.connection import wait

        wait([self._p.sentinel], timeout)  # readable once the server has sent the status
        code = self.poll()
        if code is None:
            raise subprocess.TimeoutExpired("forked worker", timeout)
        return code


class ForkedChild(Child):
    """`target(config_path, fds={"command": fd, "reply": fd})`, forked by procstart's fork
    server with our environment plus `env`, stdout and stderr on our stderr, in a process
    group of its own. It finds the server's imports (torch, vLLM) done. The command pipe
    is its `fds["command"]`, not stdin (multiprocessing points a child's stdin at
    /dev/null); `reply_fd` in its config is None until the child knows its own fd."""

    def __init__(self, target: Callable, config: dict, config_path: Path, *,
                 env: dict[str, str] | None = None, name: str | None = None):
        from . import procstart

        config_path.write_text(json.dumps(dict(config, reply_fd=None), indent=1))
        cmd_r, cmd_w = os.pipe()
        r, w = os.pipe()
        try:
            process = procstart.EnvProcess(
                target=target, args=(str(config_path),), name=name,
                env=dict(env or {}, PYTHONUNBUFFERED="1"), stdio=(2, 2),
                pass_fds={"command": cmd_r, "reply": w}, own_group=True)
            process.start()  # waits for the server's imports the first time
        except BaseException:
            for fd in (cmd_w, r):
                os.close(fd)
            raise
        finally:
            os.close(cmd_r)
            os.close(w)
        self.log_path, self._log, self._buf = None, None, b""
        self.reply_fd = r
        self.proc = _Forked(process, os.fdopen(cmd_w, "wb"))

    def kill_group(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # no group: gone, or killed before it made its group
            if self.proc.poll() is None:  # still ours (not exited): its pid is not reused
                try:
                    os.kill(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        except PermissionError:
            pass


def reply_file(config: dict, mode: str = "wb"):
    """In the child: the reply pipe named by its config."""
    return os.fdopen(int(config["reply_fd"]), mode, **({"buffering": 1} if "b" not in mode
                                                       else {}))


# -- no process outlives the command ------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def become_subreaper() -> bool:
    """Make processes orphaned below this one its children instead of init's. vLLM's engine
    core is the child of procstart's fork server, which a signal to our process group (Ctrl-C,
    `timeout`) stops first: the engine core then lived on after `run` exited (on CPU, ~4 s);
    on an H200 the replicas' GPU memory was still held when the next command's engine asked
    for it, 14-44 s later (docs/performance.md). As our children,
    `reap_descendants` waits for them. Linux only; False where it is not available."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _descendants() -> list[int]:
    """Living processes below this one, except the resource tracker of multiprocessing (it
    leaves when we do); zombies among our children are reaped on the way."""
    from .stats import _proc_stat, _process_tree, _role

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


def reap_descendants(grace_s: float = 8.0, term_s: float = 3.0) -> dict:
    """Before the command exits: stop our fork server (it leaves once no replica holds it),
    wait up to `grace_s` for every process below us to exit, SIGTERM what is left, wait
    `term_s`, SIGKILL the rest. Returns {"waited_s", "left" (after the grace), "killed"}."""
    import time
    from multiprocessing import forkserver

    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:  # the server exits at EOF on this fd (once replicas hold none either)
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None
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
