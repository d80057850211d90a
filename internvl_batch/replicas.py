"""Several vLLM engines on one GPU, each in its own process, fed batches in order.

Why: `LLM.generate` preprocesses every image (tiling, normalisation, hashing, tokenising)
serially in the calling process before the engine core sees it. For one 448 px tile per image
that frontend work, not the GPU, sets the rate (measured on H100: ~96 images/s with the GPU
mostly idle; see docs/performance.md). N engines give N frontends and N engine cores that
time-share the GPU; the parent only decodes (in its pool), dispatches and writes.

Each replica is a process running `main` (processes.children.Child): forked from the fork
server, which has imported torch and vLLM, on CPU, or spawned on a GPU (the start method:
processes/__init__.py; `processes.start.fork_replicas` says why a GPU spawns them). Either
way it starts its engine through the compile cache (so the first replica builds the entry
under the cache lock and the others load it, and a replica that finds the entry poisoned
rebuilds it), then answers batches from its command pipe with results on a reply pipe, as
streamed pickles. Replicas start concurrently; each reserves a fixed KV cache
(`kv_cache_gb`) instead of profiling free memory, which other replicas starting at the same
moment would distort.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterable, Iterator

from .cache import CompileCache, Entry, hf_home_default
from .processes import REPLICA_NAME, start as process_start
from .processes.children import Child, recv_frame, send_frame
from .config import EngineSpec, SamplingSpec
from .engine import EngineDead, Engines, InitTimings
from .sizing import (CPU_FRACTION_SHARED, DEFAULT_KV_CACHE_GB, gpu_memory_fraction, place,
                     usable_cpus)

# a replica closes its engine within engine.CLOSE_GRACE_S (vLLM kills the engine core after
# it) and then leaves with os._exit; past this its process group is killed
STOP_TIMEOUT_S = 15.0


def replica_spec(spec: EngineSpec, n: int, cuda: bool) -> EngineSpec:
    """Each replica's engine: a fixed KV cache on GPU (no free-memory profiling while the
    others start) and a memory fraction only used for vLLM's start-up free-memory check."""
    if n == 1:
        return spec
    kw = {}
    if cuda:
        kw["kv_cache_gb"] = spec.kv_cache_gb or DEFAULT_KV_CACHE_GB
        kw["gpu_memory_utilization"] = spec.gpu_memory_utilization or \
            gpu_memory_fraction(n, cap=0.3)
    else:
        # CPU: the fraction sizes each replica's KV cache from host RAM
        kw["gpu_memory_utilization"] = spec.gpu_memory_utilization or CPU_FRACTION_SHARED
    return replace(spec, **kw)


class ReplicaPool(Engines):
    """N engine processes behind the `Engines` interface; batches go to whichever replica
    has a free slot and come back in input order."""

    def __init__(self, spec: EngineSpec, cache_dir: Path, n: int, log=print):
        self.spec, self.cache_dir, self.n, self.log = spec, Path(cache_dir), n, log
        self.procs: list[_Replica] = []
        self.timings = InitTimings()
        self.entry: Entry | None = None
        self.cuda = False
        self.tokens_per_tile = 256
        self._info: dict = {}
        self._timelines: dict[int, dict] = {}  # replica index -> its start, once ready
        self._cond = threading.Condition()  # guards the fields above, set as replicas join
        self._closing = False
        self._waiters: list[threading.Thread] = []
        self._t0 = time.perf_counter()
        self.all_ready_s = 0.0  # wall until the last replica was ready or had failed

    @property
    def replicas(self) -> int:
        return self.n

    def start(self) -> "ReplicaPool":
        """Start every replica; return once the first is ready (the pool serves from then
        on: imap feeds each replica once it is ready). Measured on H100 (4 replicas,
        docs/performance.md): cold, the builder was ready at ~168 s and the replicas waiting for its
        entry at 183-185 s; warm, 3-4 s apart. `wait_all` waits for the rest."""
        from .engine import has_cuda

        self._t0 = time.perf_counter()
        self.cuda = has_cuda()
        devices, per_device = self._placement()
        spec = replica_spec(self.spec, per_device, self.cuda)
        where = "one device" if devices[0] is None else \
            "GPUs " + " | ".join(dict.fromkeys(devices))
        self.log(f"starting {self.n} engine replicas on {where} (each: "
                 f"gpu_memory_utilization {spec.gpu_memory_utilization}, "
                 f"kv cache {spec.kv_cache_gb or 'profiled'} GiB)")
        # torch's CPU pool defaults to every core in every process; N frontends each spinning
        # that many OpenMP threads for small per-image tensor ops would fight over the host
        threads = max(1, usable_cpus() // (2 * self.n)) if self.cuda else None
        forked = process_start.fork_replicas(self.cuda)
        if forked:  # its imports run while we go on; the first fork waits for them
            # HF_HOME is read once at import, and so are the thread pools' sizes (torch's,
            # OpenBLAS's): the server imports with the replicas' values, as a spawned replica
            # and its engine core would (ChildProcess applies the thread share to a server
            # that was already running)
            env = hf_home_default(CompileCache(self.cache_dir).root)
            if threads and "OMP_NUM_THREADS" not in os.environ:
                env["OMP_NUM_THREADS"] = str(threads)
            process_start.start_server(process_start.PRELOAD_REPLICA, env)
        self.procs = [_Replica(k, spec, self.cache_dir, threads, forked, devices[k])
                      for k in range(self.n)]
        self._waiters = [threading.Thread(target=self._await_ready, args=(r,), daemon=True)
                         for r in self.procs]
        for t in self._waiters:
            t.start()
        try:
            with self._cond:
                while self.entry is None and not self._all_settled():
                    self._cond.wait(1.0)
            if self.entry is None:  # every replica failed: the first one's reason
                raise RuntimeError(next(r.error for r in self.procs if r.error))
        except BaseException:
            self.close()
            raise
        return self

    def _placement(self) -> tuple[tuple, int]:
        """(each replica's CUDA_VISIBLE_DEVICES or None, replicas per GPU): on several GPUs,
        replicas go to disjoint groups of `spec.gpus_per_engine` GPUs in turn
        (sizing.place); on one GPU (or CPU) all share the process's devices."""
        if not self.cuda:
            return (None,) * self.n, self.n
        from .engine import device_facts

        facts = device_facts(True)
        if facts is None:
            return (None,) * self.n, self.n
        return place(self.n, self.spec.gpus_per_engine, facts.gpu_ids())

    def _all_settled(self) -> bool:
        return all(r.settled.is_set() for r in self.procs)

    def _await_ready(self, r: "_Replica"):
        """One replica's start, in a thread of its own: the first ready one sets the pool's
        timings, entry and info; the others join as they come."""
        try:
            msg, err = r.wait_ready(), None
        except BaseException as e:
            msg, err = None, str(e)
        at = time.perf_counter() - self._t0
        with self._cond:
            r.ready, r.error = msg, err
            try:
                if self._closing:  # killed by close(): not a failure worth a line
                    pass
                elif msg is not None:
                    self._joined(r, msg, at)
                else:
                    # Policy: a replica that fails to start (before or after the first is
                    # ready) is left out and the others serve its share: its feeder takes no
                    # job (_Dispatch._feed), so no row is lost. start() raises only when every
                    # replica has failed. (A replica that finds the entry poisoned does not
                    # get here: it rebuilds the entry in its own process, cache.py, and is
                    # only later ready.)
                    left = sum(1 for q in self.procs if q is not r and q.error is None)
                    if left:
                        self.log(f"{err}; going on with {left} of {self.n} replicas")
            finally:  # whatever happened above, nobody waits on this replica forever
                r.settled.set()
                if self._all_settled():
                    self.all_ready_s = at
                self._cond.notify_all()

    def _joined(self, r: "_Replica", msg: dict, at: float):
        self._timelines[r.k] = msg.get("timeline") or {"engine": f"replica {r.k}", "phases": []}
        ready = len(self._timelines)
        if self.entry is None:
            self.timings = InitTimings(**msg["timings"])
            self.timings.total_s = at  # wall until the pool can serve
            self.entry = Entry(CompileCache(self.cache_dir).root, msg["cache_key"],
                               msg["cache_fields"], hit=msg["cache_hit"])
            self._info = msg["info"]
            self.tokens_per_tile = msg["tokens_per_tile"]
            rest = "" if ready == self.n else "; serving while the others start"
            self.log(f"{ready} of {self.n} replicas ready in {at:.1f}s (cache "
                     f"{'hit' if self.entry.hit else 'built'}: {self.entry.key}){rest}")
        else:
            # entry.hit: a hit for every replica (callers read it again at the end)
            self.entry.hit = self.entry.hit and msg["cache_hit"]
            self.log(f"replica {r.k} joined at {at:.1f}s ({ready} of {self.n} ready)")

    def wait_all(self) -> float:
        """Block until every replica is ready or has failed to start; seconds from start()
        until then (what a throughput measurement must not include)."""
        with self._cond:
            while not self._all_settled():
                self._cond.wait(1.0)
            return self.all_ready_s

    def info(self) -> dict:
        with self._cond:
            failed = sum(1 for r in self.procs if r.error)
        return dict(self._info, replicas=self.n - failed)

    def start_timelines(self) -> list[dict]:
        """The replicas ready so far (the pipeline asks again when it writes its stats)."""
        with self._cond:
            return [self._timelines[k] for k in sorted(self._timelines)]

    def gpu_memory_used_gb(self) -> float | None:
        if not self.cuda:
            return None
        from .engine import gpu_memory_used_gb

        return gpu_memory_used_gb()

    def generate(self, reqs: list[dict], sampling: SamplingSpec) -> list:
        """One batch, on whichever replica is free."""
        stream = self.imap([(None, reqs)], sampling)
        try:
            return next(stream)[1]
        finally:
            stream.close()

    def imap(self, work: Iterable[tuple[object, list[dict]]], sampling: SamplingSpec,
             per_replica: int = 2) -> Iterator[tuple[object, list]]:
        """(tag, requests) in, (tag, results) out, in input order; at most `per_replica`
        batches queued at each replica so memory stays flat and no frontend idles."""
        dispatch = _Dispatch(self.procs, sampling, per_replica)
        it = iter(work)
        tags: dict[int, object] = {}
        submitted = yielded = 0
        ahead = per_replica * self.n + 1
        t_start = time.perf_counter()
        try:
            exhausted = False
            while True:
                while not exhausted and submitted - yielded < ahead:
                    # a batch back is handed on before the queue is topped up: filling it
                    # first held the first rows until `ahead` batches were decoded (on H100
                    # 2.4-2.7 s from ready to the first row of a 32-image first batch, 1.0-1.3
                    # s in this order: docs/performance.md)
                    if yielded < submitted and dispatch.has(yielded):
                        break
                    nxt = next(it, None)
                    if nxt is None:
                        exhausted = True
                        break
                    tags[submitted] = nxt[0]
                    dispatch.put(submitted, nxt[1])
                    submitted += 1
                if yielded == submitted:
                    return
                yield tags.pop(yielded), dispatch.take(yielded)
                yielded += 1
        finally:
            dispatch.close()
            self._log_busy(time.perf_counter() - t_start)

    def _log_busy(self, wall: float):
        # busy near 100 %: the replicas (their frontends or the shared GPU) set the pace;
        # well below: this process (decode, dispatch, writing) does
        self.log("replicas busy in generate: " + ", ".join(
            f"#{r.k} {100 * r.busy_s / wall:.0f}% ({r.images} img)" for r in self.procs
            if r.error is None)
            + f" over {wall:.1f}s")

    def close(self):
        """Stop every replica at once: all are told (stdin closed) before any is waited for,
        so they close their engines concurrently and the stop takes as long as the slowest
        one, not the sum. Measured: 4 replicas on H100 ~22 s before, 4.7-5.0 s after
        (docs/performance.md); two CPU replicas (vLLM 0.32, preset:tiny) 10.4 s -> 4.5 s.
        A replica still starting reads no stdin until it is ready, so it is killed at once
        (it holds no results; the cache lock is a flock, which its death releases)."""
        with self._cond:
            self._closing = True
        for r in self.procs:
            r.finish()
            if not r.settled.is_set():
                r.child.kill_group()
        # its start thread reads the reply pipe until EOF (now): closing that pipe first
        # would wait on the reader's lock
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for t in self._waiters:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        for r in self.procs:
            r.close(timeout=deadline - time.monotonic())
        self.procs = []


class _Dispatch:
    """The threads of one `imap`: per replica a feeder, which sends it the next batch from
    the shared queue whenever it has a free slot, and a receiver, which files its replies by
    batch index. A failure is filed under index -1 and ends the imap."""

    FAILED = -1

    def __init__(self, procs: list["_Replica"], sampling: SamplingSpec, per_replica: int):
        self.sampling, self.per_replica = sampling, per_replica
        self.jobs: queue.Queue = queue.Queue()
        self.done: dict[int, dict] = {}
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.receivers: list[threading.Thread] = []
        # the counters (only for the busy log line) cover this imap alone: a pool serves
        # several (bench repeats); the previous imap's receivers are gone
        for r in procs:
            r.busy_s, r.images = 0.0, 0
        self.feeders = [threading.Thread(target=self._feed, args=(r,), daemon=True)
                        for r in procs]
        for t in self.feeders:
            t.start()

    def put(self, idx: int, reqs: list[dict]):
        self.jobs.put((idx, reqs))

    def has(self, idx: int) -> bool:
        """Whether `take(idx)` would return (or raise) at once."""
        with self.cond:
            return idx in self.done or self.FAILED in self.done

    def take(self, idx: int) -> list:
        """Batch `idx`'s results, once they are back; EngineDead if a replica failed."""
        with self.cond:
            while idx not in self.done and self.FAILED not in self.done:
                self.cond.wait(1.0)
            if self.FAILED in self.done:
                raise EngineDead(self.done[self.FAILED]["error"])
            reply = self.done.pop(idx)
        if reply.get("dead"):
            raise EngineDead(reply["error"])
        return reply["results"]

    def close(self):
        self.stopping.set()
        for _ in self.feeders:
            self.jobs.put(None)
        # done at once unless replies are still owed (an abort): then one deadline for all,
        # not 30 s per replica
        deadline = time.monotonic() + 30
        for t in self.receivers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def _file(self, idx: int, reply: dict):
        with self.cond:
            self.done[idx] = reply
            self.cond.notify_all()

    def _feed(self, rep: "_Replica"):
        # jobs go only to ready replicas: the pool serves from its first ready one, and one
        # that failed to start takes none (the others serve its share)
        while not rep.settled.wait(0.2):
            if self.stopping.is_set():
                return
        if rep.ready is None:
            return
        slots = threading.Semaphore(self.per_replica)
        owed = threading.Semaphore(0)  # replies owed: the receiver reads no more than these
        t = threading.Thread(target=self._receive, args=(rep, slots, owed), daemon=True)
        self.receivers.append(t)
        t.start()
        while not self.stopping.is_set():
            slots.acquire()
            job = self.jobs.get()
            if job is None:
                return
            try:
                rep.send(job[0], job[1], self.sampling)
                owed.release()
            except BaseException as e:
                self._file(self.FAILED, {"dead": True, "error": f"replica {rep.k}: {e}"})
                return

    def _receive(self, rep: "_Replica", slots: threading.Semaphore, owed: threading.Semaphore):
        # never outlives this imap with nothing owed: a second imap over the same pool
        # (bench repeats) must be the only reader of the reply pipe
        while True:
            if not owed.acquire(timeout=0.2):
                if self.stopping.is_set():
                    return
                continue
            try:
                idx, reply = rep.recv()
            except BaseException as e:
                idx, reply = self.FAILED, {"dead": True, "error": f"replica {rep.k}: {e}"}
            self._file(idx, reply)
            if idx < 0 or reply.get("dead"):
                return
            rep.busy_s += reply.get("busy_s", 0.0)
            rep.images += len(reply.get("results", ()))
            slots.release()


class _Replica:
    """One replica process: batches go out as pickled frames on its command pipe, results
    come back on its reply pipe."""

    def __init__(self, k: int, spec: EngineSpec, cache_dir: Path, threads: int | None = None,
                 forked: bool = False, devices: str | None = None):
        self.k = k
        self.busy_s = 0.0  # time its engine spent in generate, in the current imap
        self.images = 0
        env = {"OMP_NUM_THREADS": str(threads)} \
            if threads and "OMP_NUM_THREADS" not in os.environ else {}
        if devices is not None:  # its GPUs (ReplicaPool._placement)
            env["CUDA_VISIBLE_DEVICES"] = devices
        config = {"spec": asdict(spec), "cache_dir": str(cache_dir), "index": k}
        self.child = Child(main, config, forked=forked, env=env,
                           name=f"{REPLICA_NAME}-{k}")
        self.replies = os.fdopen(self.child.reply_fd, "rb", closefd=False)
        self._send_lock = threading.Lock()
        # set by ReplicaPool once its start is over: `ready` (its message) or `error`
        self.settled = threading.Event()
        self.ready: dict | None = None
        self.error: str | None = None

    def wait_ready(self) -> dict:
        try:
            _, msg = recv_frame(self.replies)
        except EOFError:
            code = self.child.proc.wait()
            raise RuntimeError(f"engine replica {self.k} exited with code {code} while "
                               "starting; its log is above") from None
        if not msg.get("ready"):
            raise RuntimeError(f"engine replica {self.k} failed to start: {msg.get('error')}")
        return msg

    def send(self, idx: int, reqs: list[dict], sampling: SamplingSpec):
        with self._send_lock:
            send_frame(self.child.proc.stdin, (idx, len(reqs), sampling), reqs)

    def recv(self):
        return recv_frame(self.replies)

    def finish(self):
        """Tell the replica to finish (EOF on its stdin): it closes its engine and exits."""
        self.child.finish()

    def close(self, timeout: float = STOP_TIMEOUT_S):
        try:
            self.replies.close()
        except Exception:
            pass
        self.child.stop(timeout=timeout)


# -- the replica process ----------------------------------------------------------------------

def main(cfg: dict, fds: dict[str, int]) -> int:
    """One replica (the target of its process, processes.children.Child): start the engine,
    then answer (idx, batch) frames until its command pipe, `fds["command"]`, closes;
    replies go to `fds["reply"]`. Returns the process's exit code."""
    from .engine import _is_engine_death

    commands = os.fdopen(fds["command"], "rb")
    if process_start.engine_from_server():  # (a no-op where the server forked us: attached)
        # first thing: the server's imports then overlap ours. HF_HOME is read once at
        # import, so the server must see the value that cache.Entry.env would set
        os.environ.update(hf_home_default(CompileCache(cfg["cache_dir"]).root))
        process_start.start_server()
    reply = os.fdopen(fds["reply"], "wb")
    spec = EngineSpec(**cfg["spec"])
    tag = f"[replica {cfg['index']}]"
    try:
        engine, entry = CompileCache(cfg["cache_dir"]).start_engine(
            spec, log=lambda m: print(f"{tag} {m}", file=sys.stderr, flush=True))
    except BaseException as e:
        send_frame(reply, (-1, {"ready": False, "error": f"{type(e).__name__}: {e}"[:500]}))
        return 1
    timeline = engine.start_timeline(f"replica {cfg['index']}")
    timeline["replica_start"] = "forked" if process_start.attached() else "spawned"
    send_frame(reply, (-1, {"ready": True, "timings": engine.timings.as_dict(),
                            "cache_key": entry.key, "cache_hit": entry.hit,
                            "cache_fields": entry.fields, "info": engine.info(),
                            "tokens_per_tile": engine.tokens_per_tile,
                            "timeline": timeline}))
    # read ahead: the next batch is unpickled while this one generates
    inbox: queue.Queue = queue.Queue(maxsize=2)

    def read():
        try:
            while True:
                inbox.put(recv_frame(commands, with_items=True))
        except EOFError:
            inbox.put(None)

    threading.Thread(target=read, daemon=True).start()
    code = 0
    while (item := inbox.get()) is not None:
        idx, reqs, sampling = item
        t0 = time.perf_counter()
        try:
            out = {"results": engine.generate(reqs, sampling),
                   "busy_s": time.perf_counter() - t0}
        except BaseException as e:
            dead = isinstance(e, EngineDead) or _is_engine_death(e)
            out = {"dead": True, "error": f"{type(e).__name__}: {str(e)[:300]}",
                   "engine_dead": dead}
            code = 1
        send_frame(reply, (idx, out))
        if code:
            break
    # every reply is flushed (send_frame); the engine closes within engine.CLOSE_GRACE_S,
    # then the process leaves with os._exit (children.run_child), skipping the
    # interpreter's teardown of vLLM and torch
    engine.close()
    reply.close()
    return code
