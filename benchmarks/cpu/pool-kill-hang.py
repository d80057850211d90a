"""Why run's decode workers ignore the stop signals (images._ignore_stop_signals), measured.

A 2-worker spawned ProcessPoolExecutor streams results of ~3 MB (16 decoded-image-sized
buffers per task, as prefetch's chunks are); once the first result is back (the workers are
up), a thread signals both workers 0.1-0.6 s later.
Each try is a fresh process; a try whose next result does not come within HANG_S (or that
gives no answer in 4 HANG_S) counts as a hang: the pool never failed the future. Three layouts:
  stock-term   ProcessPoolExecutor, SIGTERM to the workers (what `timeout`/Slurm did)
  ivb-term     images.make_pool + images._result/_broken, SIGTERM (the workers ignore it)
  ivb-kill     images.make_pool + images._result/_broken, SIGKILL (the OOM killer: not
               ignorable; every try should end in DecodeWorkerDied)
Usage: python benchmarks/cpu/pool-kill-hang.py [TRIES]   (prints one count line per layout)
"""
from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import deque

HANG_S = 10


def _work(n: int) -> list[bytes]:
    time.sleep(random.random() * 0.01)
    return [bytes(200_000) for _ in range(n)]


def _try(layout: str) -> str:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from concurrent.futures.process import BrokenProcessPool

    from internvl_batch.images import DecodeWorkerDied, _broken, _result, make_pool

    if layout == "stock-term":
        pool = ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn"))
    else:
        pool = make_pool(2)
    sig = signal.SIGKILL if layout == "ivb-kill" else signal.SIGTERM
    pending = deque(pool.submit(_work, 16) for _ in range(8))

    def killer():
        time.sleep(0.1 + random.random() * 0.5)
        for p in procs:
            os.kill(p.pid, sig)

    t0 = time.time()
    procs = []
    try:
        while time.time() - t0 < 3:
            f = pending.popleft()
            if layout == "stock-term":
                f.result(timeout=HANG_S)
            else:  # waits as long as no worker has died (a hang shows as no answer)
                _result(f, pool, poll_s=0.5)
            try:
                pending.append(pool.submit(_work, 16))
            except BrokenProcessPool:
                if layout == "stock-term":
                    raise
                raise _broken(pool) from None  # as images.prefetch does
            if not procs:  # the workers are up (and past the initializer): signal them soon
                procs = list(pool._processes.values())
                threading.Thread(target=killer, daemon=True).start()
        return "results kept coming"
    except DecodeWorkerDied:
        return "DecodeWorkerDied"
    except TimeoutError:
        return "hang"
    except Exception as e:  # noqa: BLE001 - the kind is the answer
        return type(e).__name__
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:  # as run's reap_descendants does: none outlives the try
            if p.exitcode is None:
                p.kill()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(_try(sys.argv[2]), flush=True)
        os._exit(0)
    tries = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    for layout in ("stock-term", "ivb-term", "ivb-kill"):
        counts = collections.Counter()
        for _ in range(tries):
            try:
                p = subprocess.run([sys.executable, __file__, "--one", layout],
                                   capture_output=True, text=True, timeout=HANG_S * 4)
                counts[(p.stdout.strip().splitlines() or ["no answer"])[-1]] += 1
            except subprocess.TimeoutExpired:
                counts["hang"] += 1
        print(f"{layout:11s} {tries} tries: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
              flush=True)


if __name__ == "__main__":
    main()
