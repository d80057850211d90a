"""Worker processes with pipes: replicas of `run`, and the benchmark's variants.

One helper for every place that starts a worker: `Child` runs a library function,
`target(config, fds)`, in a process of its own group (so that vLLM's engine-core
processes stop with it), forked from the fork server or spawned (start.ChildProcess), with
a command pipe (`fds["command"]`) and a reply pipe (`fds["reply"]`); and it stops it: tell
(EOF on the command pipe), wait, then kill the whole group. The target's return value is
the process's exit code; it leaves with os._exit, skipping the interpreter's teardown of
vLLM and torch (slow, and it can hang on CUDA).
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


Target = Callable[[dict, dict], int] | str  # a function, or "module:function"


def run_child(target: Target, config: dict, fds: dict[str, int]):
    """A Child's process: `target(config, fds)`, then leave with its code (1 and the
    traceback on stderr for an uncaught error)."""
    code = 1
    try:
        if isinstance(target, str):  # imported here: its module may import the caller's
            import importlib

            module, _, name = target.partition(":")
            target = getattr(importlib.import_module(module), name)
        code = target(config, fds) or 0
    except BaseException:  # noqa: BLE001 - reported like an uncaught error, then exit 1
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Child:
    """`target(config, fds={"command": fd, "reply": fd})` (a library function, or its
    "module:function" name) in a process of its own group,
    forked from the fork server (`forked`: it finds the server's imports done) or spawned,
    with our environment plus `env`. Output goes to `log_path` (stdout and stderr), else to
    our stderr. `text`: the command pipe takes str (JSON lines, `send_json`) instead of
    bytes (pickled frames on `proc.stdin`)."""

    def __init__(self, target: Target, config: dict, *,
                 forked: bool = False, name: str | None = None,
                 log_path: Path | None = None, env: dict[str, str] | None = None,
                 text: bool = False):
        from .start import get_context

        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else None
        out = self._log.fileno() if self._log else 2
        cmd_r, cmd_w = os.pipe()
        r, w = os.pipe()
        try:
            process = get_context(forked).Process(
                target=run_child, args=(target, config), name=name,
                env=dict(env or {}, PYTHONUNBUFFERED="1"), stdio=(out, out),
                pass_fds={"command": cmd_r, "reply": w}, own_group=True)
            process.start()  # forked: waits for the server's imports the first time
        except BaseException:
            for fd in (cmd_w, r):
                os.close(fd)
            if self._log:
                self._log.close()
            raise
        finally:
            os.close(cmd_r)
            os.close(w)
        self.reply_fd = r
        self._buf = b""
        self.proc = _Proc(process, os.fdopen(cmd_w, "w" if text else "wb"))

    def send_json(self, doc: dict):
        """One JSON line on the command pipe (a `text` child)."""
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
        except ProcessLookupError:  # no group: gone, or killed before it made its group
            if self.proc.poll() is None:  # still ours (not exited): its pid is not reused
                try:
                    os.kill(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        except PermissionError:
            pass

    def finish(self):
        """Close the command pipe: the child's signal to finish. `stop` then waits for it;
        several children told first and waited for after stop in the time of the slowest."""
        try:
            self.proc.stdin.close()
        except Exception:
            pass

    def stop(self, timeout: float, *, force: bool = False, kill_rest: bool = False):
        """Close the command pipe and wait up to `timeout` s, then kill its group; `force`:
        kill at once; `kill_rest`: kill the group also after a clean exit (whatever of
        vLLM's processes outlived the worker)."""
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


class _Proc:
    """What callers use of a child (`stdin`: its command pipe, `pid`, `poll`, `wait`,
    `returncode`, as on a `subprocess.Popen`). A forked child's exit status comes from the
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

        if wait([self._p.sentinel], timeout):  # readable once the child has ended
            with self._lock:  # its status follows at once (a spawned child: a moment later)
                self._p.join(1.0)
        code = self.poll()
        if code is None:
            raise subprocess.TimeoutExpired("worker process", timeout)
        return code
