"""One writer per output shard: a lock file beside the shard, safe on shared file systems.

Two runs writing one shard used to lose every row: the first to finish removed `_parts/`, the
second then published an empty file over the result. Now a run holds
`OUTPUT/part-XXXXX-of-YYYYY.lock` from before it reads what is already written until its final
file is committed, and a second run exits 2 naming the holder (or waits with `--wait`).

Why not `flock`: on NFS and Lustre it may not work across nodes, and a requeued Slurm task runs
on another node than the one that died. So the lock is a plain file, created atomically with
`os.link` (atomic on NFS, unlike O_EXCL on old clients) and judged by what it records:

- same host (hostname and boot id): the holder is dead when its pid is gone or now belongs to
  a process started at another time (pid reuse);
- another host: the holder refreshes the file's mtime every `heartbeat_s` from a daemon
  thread; a lock not refreshed for `STALE_BEATS` heartbeats is stale. Ages are measured
  against the file system's clock (the mtime of a file we just wrote), not ours, so clock skew
  between nodes does not matter;
- the same Slurm job id with another restart count: Slurm requeued the job, the holder was its
  previous incarnation and is gone.

A stale lock is taken over atomically: renamed to a unique name (one of several racing takers
wins), re-read to confirm it is the lock that was judged stale (a fresh one is put back), then
created anew with `os.link`. The heartbeat also checks that the file still holds our token; if
not, `lost` is set and `check()` raises, so a writer that lost its lock never publishes.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from .config import ConfigError

HEARTBEAT_S = 30.0
# 4 missed heartbeats: a busy node may delay one or two; a dead one never comes back
STALE_BEATS = 4
WAIT_POLL_S = 5.0


class OutputBusy(ConfigError):
    """Another run holds the shard (exit 2: it is a second writer, not a failure of ours)."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (Linux), to tell pid reuse apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _slurm() -> dict:
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
            "SLURM_PROCID")
    return {k: os.environ[k] for k in keys if k in os.environ}


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


class ShardLock:
    def __init__(self, output: Path, name: str, heartbeat_s: float = HEARTBEAT_S,
                 stale_beats: int = STALE_BEATS):
        self.output = Path(output)
        self.name = name
        self.path = self.output / f"{name}.lock"
        self.heartbeat_s = heartbeat_s
        self.stale_beats = stale_beats
        self.token = uuid.uuid4().hex
        self.lost = False
        # the stale holder this run took the lock over from: its token and its last heartbeat
        # (the file's mtime), the last moment that run is known to have been alive
        self.took_over: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the file says -----------------------------------------------------------------
    def _record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
                "proc_start": _proc_start(os.getpid()), "started_at": time.time(),
                "heartbeat_s": self.heartbeat_s, "stale_beats": self.stale_beats,
                "slurm": _slurm(), "token": self.token}

    def read(self) -> dict | None:
        """The holder's record, or None when there is no lock. A file being written (empty or
        cut) reads as {} and counts as held until its mtime ages out."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(text)
            return doc if isinstance(doc, dict) else {}
        except ValueError:
            return {}

    def _fs_now(self) -> float:
        """The file server's clock: the mtime of a file written just now."""
        probe = self.output / f".{self.name}.lock.now{os.getpid()}"
        try:
            probe.write_text("")
            return probe.stat().st_mtime
        except OSError:
            return time.time()
        finally:
            probe.unlink(missing_ok=True)

    def stale_reason(self, holder: dict, mtime: float) -> str | None:
        """Why the holder is gone, or None if it may be alive."""
        if holder.get("token") == self.token:
            return None
        here = socket.gethostname()
        if holder.get("host") == here and holder.get("boot_id") == _boot_id():
            pid = holder.get("pid")
            if not isinstance(pid, int) or not _alive(pid):
                return f"pid {pid} on {here} is gone"
            start = _proc_start(pid)
            if holder.get("proc_start") and start and start != holder["proc_start"]:
                return f"pid {pid} on {here} is another process now"
            return None
        mine, theirs = _slurm(), holder.get("slurm") or {}
        if mine.get("SLURM_JOB_ID") and mine.get("SLURM_JOB_ID") == theirs.get("SLURM_JOB_ID") \
                and mine.get("SLURM_PROCID") == theirs.get("SLURM_PROCID") \
                and mine.get("SLURM_RESTART_COUNT") != theirs.get("SLURM_RESTART_COUNT"):
            return f"Slurm requeued job {mine['SLURM_JOB_ID']}"
        beat, beats = self._limits(holder)
        age = self._fs_now() - mtime
        if age > beat * beats:
            return f"no heartbeat for {age:.0f} s (limit {beat * beats:.0f} s)"
        return None

    def describe(self, holder: dict, mtime: float) -> str:
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        job = (holder.get("slurm") or {}).get("SLURM_JOB_ID")
        if job:
            who += f", Slurm job {job}"
        since = holder.get("started_at")
        who += f", since {_when(since)}" if isinstance(since, (int, float)) else ""
        return who

    # -- acquire / release --------------------------------------------------------------------
    def _create(self) -> bool:
        tmp = self.output / f".{self.name}.lock.{self.token}"
        tmp.write_text(json.dumps(self._record()))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, holder: dict) -> None:
        """Remove the stale lock `holder` unless another taker got there first."""
        grave = self.output / f".{self.name}.lock.stale.{self.token}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return  # another taker moved it; try to create ours
        try:
            got = json.loads(grave.read_text())
        except (OSError, ValueError):
            got = {}
        if got.get("token") != holder.get("token"):
            # a taker that raced us already created a fresh lock and we moved it: put it back
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass  # a third one holds it now; the one we moved notices at its heartbeat
        grave.unlink(missing_ok=True)

    def try_acquire(self) -> tuple[bool, str]:
        """(True, reason for a takeover or '') or (False, who holds it)."""
        self.output.mkdir(parents=True, exist_ok=True)
        took = ""
        for _ in range(20):  # each pass either wins, finds a live holder, or clears a stale one
            if self._create():
                self._start_heartbeat()
                return True, took
            holder = self.read()
            try:
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                continue
            if holder is None:
                continue
            why = self.stale_reason(holder, mtime) if holder else None
            if holder == {} and self._fs_now() - mtime > self.heartbeat_s * self.stale_beats:
                why = "unreadable lock file, not refreshed"
            if why is None:
                return False, self.describe(holder, mtime)
            self._take_over(holder)
            took = f"took over the lock of {self.describe(holder, mtime)}: {why}"
            self.took_over = {"token": holder.get("token"), "beat_at": mtime}
        return False, "the lock file keeps changing hands"

    def acquire(self, wait: bool = False, log=print) -> "ShardLock":
        said = False
        while True:
            try:
                ok, info = self.try_acquire()
            except OSError as e:  # read-only mount, /proc, no permission: before any engine
                raise ConfigError(f"--output {self.output} is not writable: "
                                  f"{e.strerror or e}") from None
            if ok:
                if info:
                    log(f"{self.name}: {info}")
                return self
            if not wait:
                raise OutputBusy(
                    f"another internvl-batch ({info}) is writing {self.name} in {self.output}; "
                    "wait for it, or pass --wait" + self._expiry_hint())
            if not said:
                log(f"waiting for another internvl-batch ({info}) writing {self.name} in "
                    f"{self.output}")
                said = True
            time.sleep(min(WAIT_POLL_S, self.heartbeat_s))

    def _limits(self, holder: dict) -> tuple[float, int]:
        """The holder's heartbeat and stale-beat count, ours where its file says something
        else than numbers (an edited or foreign lock file: a ValueError traceback before)."""
        try:
            beat = float(holder.get("heartbeat_s") or self.heartbeat_s)
            beats = int(holder.get("stale_beats") or self.stale_beats)
        except (TypeError, ValueError):
            return self.heartbeat_s, self.stale_beats
        return beat, beats

    def _expiry_hint(self) -> str:
        holder = self.read() or {}
        if not holder or holder.get("host") == socket.gethostname():
            return ""
        beat, beats = self._limits(holder)
        limit = beat * beats
        return f" (if it died, its lock is taken over {limit:.0f} s after its last heartbeat)"

    def _start_heartbeat(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-{self.name}", daemon=True)
        self._thread.start()

    def _beat(self):
        failed = 0
        while not self._stop.wait(self.heartbeat_s):
            if not self.holds():
                self.lost = True
                return
            try:
                os.utime(self.path)
                failed = 0
            except OSError:
                # a flaky mount: if it cannot refresh the file, another node will judge the
                # lock stale after STALE_BEATS heartbeats and take it over; give it up one
                # heartbeat before that, so two writers never write at once
                failed += 1
                if failed >= max(1, self.stale_beats - 1):
                    self.lost = True
                    return

    def holds(self) -> bool:
        holder = self.read()
        return bool(holder) and holder.get("token") == self.token

    def check(self) -> None:
        """Raise unless we still hold the lock (called before anything is published)."""
        if self.lost or not self.holds():
            self.lost = True
            raise OutputBusy(f"lost the lock on {self.name} in {self.output} (another run took "
                             "it over); nothing was published by this run")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.holds():
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
