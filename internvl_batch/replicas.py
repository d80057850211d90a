"""Several vLLM engines on one GPU, each in its own process, fed batches in order.

Why: `LLM.generate` preprocesses every image (tiling, normalisation, hashing, tokenising)
serially in the calling process before the engine core sees it. For one 448 px tile per image
that frontend work, not the GPU, sets the rate (measured on H100: ~96 images/s with the GPU
mostly idle; see results/h100/ISSUE6.md). N engines give N frontends and N engine cores that
time-share the GPU; the parent only decodes (in its pool), dispatches and writes.

Each replica is `python -m internvl_batch replica CONFIG`: it starts its engine through the
compile cache (so the first replica builds the entry under the cache lock and the others load
it, and the poisoned-entry self-heal can re-execute it), then answers batches on stdin with
results on a reply fd, as streamed pickles. Replicas start concurrently; each reserves a
fixed KV cache (`kv_cache_gb`) instead of profiling free memory, which other replicas
starting at the same moment would distort.
"""
from __future__ import annotations

import json
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Iterator

from .config import EngineSpec, SamplingSpec
from .engine import EngineDead, InitTimings

DEFAULT_KV_CACHE_GB = 4.0  # per replica: ~340k tokens of InternVL3-1B, ~150k of 2B


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


MAX_AUTO_REPLICAS = 4  # measured: 4 x InternVL3-1B fill an H100 (GPU 97 % busy, 315 img/s)
# device memory per replica beyond weights and KV cache (CUDA context, activations of the
# profile run, CUDA graphs): 4 x InternVL3-1B with 4 GiB KV each peaked at 41.1 GB on H100
REPLICA_OVERHEAD_GB = 4.5
CPUS_PER_REPLICA = 3


def weights_gb(model_dir: str) -> float | None:
    """Checkpoint weights in GB: the files if present, else estimated from config.json (bf16;
    synthesized checkpoints have no weight files)."""
    d = Path(model_dir)
    if not d.is_dir():
        return None
    files = [f for pat in ("*.safetensors", "*.bin") for f in d.glob(pat)]
    if files:
        return sum(f.stat().st_size for f in files) / 1e9
    try:
        from .bench import lm_shape

        cfg = json.loads((d / "config.json").read_text())
        lm = lm_shape(cfg)
        v = cfg["vision_config"]
        h, m, layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
        tied = (cfg.get("llm_config") or {}).get("tie_word_embeddings", False)
        params = lm["layer_params"] + lm["head_params"] * (1 if tied else 2) + \
            layers * (4 * h * h + 2 * h * m) + 4 * h * lm["hidden"] + lm["hidden"] ** 2
        return params * 2 / 1e9
    except (OSError, KeyError, ValueError, TypeError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on (a Slurm allocation's cpuset, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_replicas(model_dir: str, cuda: bool, device_gb: float | None,
                  kv_gb: float | None = None, cpus: int | None = None) -> tuple[int, str]:
    """How many engines share the device when the user did not say: as many as fit in 90 %
    of its memory and in the CPUs (each replica keeps ~3 busy: frontend, engine core, its
    share of decoding and dispatch), at most MAX_AUTO_REPLICAS; one on CPU or when the model
    size is unknown."""
    if not cuda:
        return 1, "CPU: one engine"
    kv_gb = kv_gb or DEFAULT_KV_CACHE_GB
    w = weights_gb(model_dir)
    if w is None or not device_gb:
        return 1, "model or device size unknown: one engine (pass --replicas N to override)"
    cpus = cpus or usable_cpus()
    per = w + kv_gb + REPLICA_OVERHEAD_GB
    by_mem, by_cpu = int(0.9 * device_gb // per), cpus // CPUS_PER_REPLICA
    n = max(1, min(MAX_AUTO_REPLICAS, by_mem, by_cpu))
    return n, (f"{n} engine replica(s): ~{per:.1f} GB each ({w:.1f} GB weights + {kv_gb:g} GB "
               f"KV + {REPLICA_OVERHEAD_GB:g} GB) in 90 % of {device_gb:.0f} GB, "
               f"{CPUS_PER_REPLICA} of {cpus} CPUs each")


def replica_spec(spec: EngineSpec, n: int, cuda: bool) -> EngineSpec:
    """Each replica's engine: a fixed KV cache on GPU (no free-memory profiling while the
    others start) and a memory fraction only used for vLLM's start-up free-memory check."""
    if n == 1:
        return spec
    kw = {}
    if cuda:
        kw["kv_cache_gb"] = spec.kv_cache_gb or DEFAULT_KV_CACHE_GB
        kw["gpu_memory_utilization"] = spec.gpu_memory_utilization or \
            int(min(0.9 / n, 0.3) * 100) / 100
    else:
        # CPU: the fraction sizes each replica's KV cache from host RAM
        kw["gpu_memory_utilization"] = spec.gpu_memory_utilization or 0.1
    return replace(spec, **kw)


class ReplicaPool:
    """Looks like `engine.Engine` to the pipeline: timings, info(), imap(), close()."""

    def __init__(self, spec: EngineSpec, cache_dir: Path, n: int, log=print):
        self.spec, self.cache_dir, self.n, self.log = spec, Path(cache_dir), n, log
        self.procs: list[_Replica] = []
        self.timings = InitTimings()
        self.entry = None
        self.cuda = False
        self.tokens_per_tile = 256
        self._info: dict = {}

    @property
    def replicas(self) -> int:
        return self.n

    def start(self) -> "ReplicaPool":
        from .engine import has_cuda

        t0 = time.perf_counter()
        self.cuda = has_cuda()
        spec = replica_spec(self.spec, self.n, self.cuda)
        self.log(f"starting {self.n} engine replicas on one device (each: "
                 f"gpu_memory_utilization {spec.gpu_memory_utilization}, "
                 f"kv cache {spec.kv_cache_gb or 'profiled'} GiB)")
        self._tmp = tempfile.TemporaryDirectory(prefix="ivb-replicas-")
        # torch's CPU pool defaults to every core in every process; N frontends each spinning
        # that many OpenMP threads for small per-image tensor ops would fight over the host
        threads = max(1, usable_cpus() // (2 * self.n)) if self.cuda else None
        self.procs = [_Replica(k, spec, self.cache_dir, Path(self._tmp.name), threads)
                      for k in range(self.n)]
        readies = []
        try:
            for r in self.procs:
                readies.append(r.wait_ready())
        except BaseException:
            self.close()
            raise
        first = readies[0]
        self.timings = InitTimings(**first["timings"])
        self.timings.total_s = time.perf_counter() - t0  # wall: replicas start together
        self.entry = SimpleNamespace(key=first["cache_key"],
                                     hit=all(r["cache_hit"] for r in readies),
                                     fields=first["cache_fields"])
        self._info = first["info"]
        self.tokens_per_tile = first["tokens_per_tile"]
        self.log(f"{self.n} replicas ready in {self.timings.total_s:.1f}s (cache "
                 f"{'hit' if self.entry.hit else 'built'}: {self.entry.key})")
        return self

    def info(self) -> dict:
        return dict(self._info, replicas=self.n)

    def gpu_memory_used_gb(self) -> float | None:
        if not self.cuda:
            return None
        from .engine import gpu_memory_used_gb

        return gpu_memory_used_gb()

    def imap(self, work: Iterable[tuple[object, list[dict]]], sampling: SamplingSpec,
             per_replica: int = 2) -> Iterator[tuple[object, list]]:
        """(tag, requests) in, (tag, results) out, in input order; at most `per_replica`
        batches queued at each replica so memory stays flat and no frontend idles."""
        jobs: queue.Queue = queue.Queue()
        done: dict[int, object] = {}
        cond = threading.Condition()
        stop = threading.Event()
        tags: dict[int, object] = {}

        receivers: list[threading.Thread] = []

        def feed(rep: "_Replica"):
            slots = threading.Semaphore(per_replica)
            pending = threading.Semaphore(0)  # replies owed: the receiver reads no more

            def receive():
                # never outlives this imap with nothing owed: a second imap over the same
                # pool (bench repeats) must be the only reader of the reply pipe
                while True:
                    if not pending.acquire(timeout=0.2):
                        if stop.is_set():
                            return
                        continue
                    try:
                        idx, reply = rep.recv()
                    except BaseException as e:
                        reply, idx = {"dead": True, "error": f"replica {rep.k}: {e}"}, -1
                    with cond:
                        done[idx] = reply
                        cond.notify_all()
                    if idx < 0 or reply.get("dead"):
                        return
                    rep.busy_s += reply.get("busy_s", 0.0)
                    rep.images += len(reply.get("results", ()))
                    slots.release()

            t = threading.Thread(target=receive, daemon=True)
            receivers.append(t)
            t.start()
            while not stop.is_set():
                slots.acquire()
                job = jobs.get()
                if job is None:
                    return
                try:
                    rep.send(job[0], job[1], sampling)
                    pending.release()
                except BaseException as e:
                    with cond:
                        done[-1] = {"dead": True, "error": f"replica {rep.k}: {e}"}
                        cond.notify_all()
                    return

        # the counters (only for the log line below) cover this imap alone: a pool serves
        # several (bench repeats); the previous imap's receivers are gone
        for r in self.procs:
            r.busy_s, r.images = 0.0, 0
        feeders = [threading.Thread(target=feed, args=(r,), daemon=True) for r in self.procs]
        for t in feeders:
            t.start()
        it = iter(work)
        t_start = time.perf_counter()
        submitted = yielded = 0
        limit = per_replica * self.n + 1
        try:
            exhausted = False
            while True:
                while not exhausted and submitted - yielded < limit:
                    nxt = next(it, None)
                    if nxt is None:
                        exhausted = True
                        break
                    tags[submitted] = nxt[0]
                    jobs.put((submitted, nxt[1]))
                    submitted += 1
                if yielded == submitted:
                    return
                with cond:
                    while yielded not in done and -1 not in done:
                        cond.wait(1.0)
                    if -1 in done:
                        raise EngineDead(done[-1]["error"])
                    reply = done.pop(yielded)
                if reply.get("dead"):
                    raise EngineDead(reply["error"])
                yield tags.pop(yielded), reply["results"]
                yielded += 1
        finally:
            stop.set()
            for _ in feeders:
                jobs.put(None)
            for t in receivers:  # done at once unless replies are still owed (an abort)
                t.join(timeout=30)
            wall = time.perf_counter() - t_start
            # busy near 100 %: the replicas (their frontends or the shared GPU) set the pace;
            # well below: this process (decode, dispatch, writing) does
            self.log("replicas busy in generate: " + ", ".join(
                f"#{r.k} {100 * r.busy_s / wall:.0f}% ({r.images} img)" for r in self.procs)
                + f" over {wall:.1f}s")

    def close(self):
        for r in self.procs:
            r.close()
        self.procs = []


class _Replica:
    def __init__(self, k: int, spec: EngineSpec, cache_dir: Path, tmp: Path,
                 threads: int | None = None):
        self.k = k
        self.busy_s = 0.0  # time its engine spent in generate, in the current imap
        self.images = 0
        r, w = os.pipe()
        cfg = {"spec": asdict(spec), "cache_dir": str(cache_dir), "reply_fd": w, "index": k}
        path = tmp / f"replica-{k}.json"
        path.write_text(json.dumps(cfg))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if threads:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "internvl_batch", "replica", str(path)],
            stdin=subprocess.PIPE, stdout=sys.stderr.fileno(), pass_fds=(w,), env=env,
            start_new_session=True)  # its own group: vLLM's processes stop with it
        os.close(w)
        self.replies = os.fdopen(r, "rb")
        self._send_lock = threading.Lock()

    def wait_ready(self) -> dict:
        try:
            _, msg = recv_frame(self.replies)
        except EOFError:
            code = self.proc.wait()
            raise RuntimeError(f"engine replica {self.k} exited with code {code} while "
                               "starting; its log is above") from None
        if not msg.get("ready"):
            raise RuntimeError(f"engine replica {self.k} failed to start: {msg.get('error')}")
        return msg

    def send(self, idx: int, reqs: list[dict], sampling: SamplingSpec):
        with self._send_lock:
            send_frame(self.proc.stdin, (idx, len(reqs), sampling), reqs)

    def recv(self):
        return recv_frame(self.replies)

    def close(self):
        import signal

        try:
            self.proc.stdin.close()
        except Exception:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        try:
            self.replies.close()
        except Exception:
            pass


# -- the replica process ----------------------------------------------------------------------

def main(config_path: str) -> int:
    """One replica: start the engine, then answer (idx, batch) frames until stdin closes."""
    from .cache import CompileCache, EntryPoisoned
    from .engine import _is_engine_death

    cfg = json.loads(Path(config_path).read_text())
    reply = os.fdopen(int(cfg["reply_fd"]), "wb")
    spec = EngineSpec(**cfg["spec"])
    tag = f"[replica {cfg['index']}]"
    try:
        engine, entry = CompileCache(cfg["cache_dir"]).start_engine(
            spec, log=lambda m: print(f"{tag} {m}", file=sys.stderr, flush=True))
    except EntryPoisoned:
        raise  # the command layer restarts this replica in a fresh process
    except BaseException as e:
        send_frame(reply, (-1, {"ready": False, "error": f"{type(e).__name__}: {e}"[:500]}))
        return 1
    send_frame(reply, (-1, {"ready": True, "timings": engine.timings.as_dict(),
                            "cache_key": entry.key, "cache_hit": entry.hit,
                            "cache_fields": entry.fields, "info": engine.info(),
                            "tokens_per_tile": engine.tokens_per_tile}))
    # read ahead: the next batch is unpickled while this one generates
    inbox: queue.Queue = queue.Queue(maxsize=2)

    def read():
        try:
            while True:
                inbox.put(recv_frame(sys.stdin.buffer, with_items=True))
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
    engine.close()
    reply.close()
    return code
