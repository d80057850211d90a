"""The instant captioner: an engine stand-in for measuring the pipeline around the engine
(`bench/scale.py` only), and how one measured run is started and watched.

    python -m internvl_batch.bench.instant CONFIG.json   # one run, as bench/scale.py starts it
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..engine import Engines, GenResult, InitTimings

# InternVL's image normalisation (ImageNet mean and std) and its tile size
MEAN, STD, TILE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 448
EXTRA = 2_048  # records past the stop: what the resumed run captions


class InstantCaptioner(Engines):
    """An `Engines` that answers at once: no model, no GPU. With `tile`, each image gets
    the one-tile preprocessing (resize to 448x448, normalise to float32 CHW), which vLLM's
    InternVL processor does in the engine's process before any GPU work. `stop_after`: once
    that many requests are answered, the process signals itself as a Slurm preemption would,
    and the run stops after that batch with its rows kept."""

    tokens_per_tile = 256

    def __init__(self, tile: bool = True, stop_after: int | None = None):
        import random

        from ..config import EngineSpec
        from ..synthdata import WORDS

        self.spec = EngineSpec(model="instant-captioner")
        self.timings = InitTimings()
        self.tile, self.stop_after, self.answered = tile, stop_after, 0
        self._rng, self._words = random.Random(0), WORDS

    @property
    def replicas(self) -> int:
        return 1

    def generate(self, reqs, sampling):
        out = []
        for r in reqs:
            if self.tile:
                _one_tile(r["multi_modal_data"]["image"])
            words = self._rng.choices(self._words, k=self._rng.randint(8, 14))
            out.append(GenResult(" ".join(words).capitalize() + ".", 290, 256, len(words) + 2,
                                 "stop"))
        self.answered += len(reqs)
        return out

    def imap(self, work, sampling):
        for tag, reqs in work:
            results = self.generate(reqs, sampling)
            if self.stop_after and self.answered >= self.stop_after:
                self.stop_after = None
                os.kill(os.getpid(), signal.SIGUSR1)  # seen once this batch is written
            yield tag, results

    def info(self) -> dict:
        return {"vllm": None, "torch": None, "device": "instant captioner (no model)",
                "cuda": False}

    def gpu_memory_used_gb(self):
        return None

    def start_timelines(self) -> list[dict]:
        return []

    def wait_all(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


def _one_tile(image):
    import numpy as np
    from PIL import Image

    a = np.asarray(image.resize((TILE, TILE), Image.BICUBIC), dtype=np.float32) / 255.0
    return ((a - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).transpose(2, 0, 1)


# -- one measured run, in a process of its own -----------------------------------------------

def child(config_path: str) -> None:
    """Run `pipeline.run` as the config says and write what it measured beside it."""
    import types

    from .. import pipeline
    from ..config import RunConfig
    from ..sources import SourceSpec

    c = json.loads(Path(config_path).read_text())
    engine = InstantCaptioner(tile=c["tile"], stop_after=c.get("stop_after"))
    cfg = RunConfig(source=SourceSpec.parse(c["dataset"], **c.get("source", {})),
                    engine=engine.spec, output=Path(c["output"]),
                    cache_dir=Path(c["output"]) / ".cache", progress=False,
                    workers=c["workers"], batch_size=c["batch_size"], max_error_rate=1.0)
    entry = types.SimpleNamespace(hit=None, key="instant-captioner", fields={})
    lines: list[str] = []
    t0 = time.time()
    code = pipeline.run(cfg, log=lines.append, started=(engine, entry), started_at=t0)
    Path(c["result"]).write_text(json.dumps({"code": code, "lines": lines,
                                             "seconds": time.time() - t0}))


class Watch:
    """Peak RSS (VmHWM) and CPU time of every process below `root`, polled from /proc."""

    def __init__(self, root: int, every_s: float = 0.2):
        self.root, self.every_s = root, every_s
        self.procs: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop.is_set():
            for pid in _tree(self.root):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                hwm = next((int(ln.split()[1]) for ln in status.splitlines()
                            if ln.startswith("VmHWM:")), None)
                if hwm is None:
                    continue
                p = self.procs.setdefault(pid, {})
                # named at every look: between its fork and its exec a spawned worker
                # still shows its parent's command line
                p["role"] = _role(pid, self.root, cmd)
                p["peak_rss_gb"] = round(hwm / 2**20, 3)
                p["cpu_s"] = round((int(stat[11]) + int(stat[12])) / tick, 2)
            self._stop.wait(self.every_s)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        return [dict(p, pid=pid) for pid, p in sorted(self.procs.items())]


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _role(pid: int, root: int, cmd: bytes) -> str:
    if pid == root:
        return "main"
    if b"resource_tracker" in cmd:
        return "resource tracker"
    return "decode worker" if b"multiprocessing" in cmd else cmd.decode(errors="replace")[:40]


def measure(config: dict, work: Path, name: str) -> dict:
    """One run of `child` in a subprocess: its result, the wall time seen from here, the CPU
    seconds of it and of the children it waited for, and each process's peak RSS."""
    work.mkdir(parents=True, exist_ok=True)
    cfg_path, res_path = work / f"{name}.json", work / f"{name}.result.json"
    cfg_path.write_text(json.dumps(dict(config, result=str(res_path))))
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-m", "internvl_batch.bench.instant",
                          str(cfg_path)])
    watch = Watch(p.pid)
    # CPU from the kernel (the run and the decode workers it waited for); peak memory from
    # /proc (Watch): ru_maxrss would start from this process's size at the fork
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t0
    procs = watch.stop()
    if not res_path.is_file():
        raise RuntimeError(f"{name}: the measured run failed (status {status})")
    res = json.loads(res_path.read_text())
    return {"code": res["code"], "wall_s": round(wall, 3), "run_s": round(res["seconds"], 3),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "processes": procs}




if __name__ == "__main__":
    child(sys.argv[1])
