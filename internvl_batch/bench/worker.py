"""One `bench` variant in its own process: one vLLM engine, kept alive across repeats.

The parent (`bench.py`) starts one worker per variant (`main`, in a process of
processes.children.Child), all alive at once with a share of GPU memory each, and sends them
one command at a time on their command pipe (JSON lines), so only one variant computes at
any moment. Replies go back, one JSON line each, on the reply pipe (stdout and stderr belong
to vLLM's log, tee'd to a file).

Workloads, per command `{"cmd": "run", "slice": NAME}` (a slice = a disjoint set of images;
`"captions": true` also returns every caption, in the slice's file order, for the parent's
caption-agreement check):

* `eager`, `compiled`: `CompileCache.start_engine` (compiled: the safe multi-tile warm-up and
  the cache); the slice's images are decoded *before* the clock starts, then one timed
  `Engine.generate` over all of them: engine throughput alone.
* `plain`: `bench/plain.py`'s `run_once`: a user's script, its serial
  `PIL.Image.open(...).convert("RGB")` loop inside the clock.
* `pipeline`: `pipeline.run` with the started engine (decode workers, batches, Parquet sink,
  stats.json) into a fresh output directory, timed end to end (wall clock of the call).

Every repeat uses its own images: vLLM's multimodal processor cache (on by default) keys on
the pixels, so a repeat over images it has seen would skip preprocessing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from ..engine import tokens_per_tile
from . import PIPELINES

def load_plain(path: Path | None = None):
    """The plain-vLLM baseline: `internvl_batch.bench.plain`, or a user's own copy at `path`."""
    if path is None:
        from . import plain
        return plain
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    spec = importlib.util.spec_from_file_location("plain_vllm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Worker:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.variant = cfg["variant"]
        self.engine = None
        self.entry = None
        self.llm = None
        self.plain = None

    # -- start ------------------------------------------------------------------------------
    def start(self) -> dict:
        c = self.cfg
        if self.variant == "plain":
            # nothing touches CUDA before LLM(): a user's script would not, and vLLM forks its
            # engine core unless CUDA is already initialised
            self.plain = load_plain(Path(c["plain_script"]) if c.get("plain_script") else None)
            os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
            t0 = time.perf_counter()
            from .. import checkpoint

            # what our engine loads (engine.llm_kwargs), or captions could not be compared
            self.llm = self.plain.make_llm(
                c["model"], c["gpu_memory_utilization"], c["max_dynamic_patch"],
                dummy_weights=checkpoint.is_synthesized(c["model"]) and
                not checkpoint.has_weights(c["model"]))
            init = {"total_s": round(time.perf_counter() - t0, 3)}
            import torch
            import vllm

            return {"init": init, "cache_hit": None, "cache_key": None,
                    "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
                    "tokens_per_tile": tokens_per_tile(self.llm)}
        from ..config import EngineSpec
        from ..pipeline import open_engines

        # the engine options the parent set (run_bench's `base`), and this variant's own
        spec = EngineSpec.from_options(
            c, compile=bool(c["compile"]), quantization=PIPELINES.get(self.variant),
            encoder_cudagraphs=bool(c.get("encoder_cudagraphs") and self.variant in PIPELINES))
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        replicas = c.get("replicas", 1) if self.variant in PIPELINES else 1
        self.engine, self.entry = open_engines(spec, Path(c["cache_dir"]), replicas, log)
        # a pool serves from its first ready replica on: throughput is timed with all of them
        ready_s = self.engine.wait_all()
        info = self.engine.info()
        return {"init": dict(self.engine.timings.as_dict(), total_s=round(ready_s, 3)),
                "cache_hit": self.entry.hit,
                "cache_key": self.entry.key,
                "versions": {"vllm": info["vllm"], "torch": info["torch"]},
                "cuda": info["cuda"], "tokens_per_tile": self.engine.tokens_per_tile,
                "replicas": info.get("replicas", 1)}

    # -- one timed run ----------------------------------------------------------------------
    def run(self, slice_name: str, captions: bool = False) -> dict:
        s = self.cfg["slices"][slice_name]
        paths = [os.path.join(self.cfg["images_dir"], f) for f in s["files"]]
        if self.variant == "plain":
            stats: dict = {}
            seconds, n, out_toks = self.plain.run_once(self.llm, paths, self.cfg["max_tokens"],
                                                       stats=stats)
            rep = {"seconds": seconds, "requests": n, "output_tokens": out_toks,
                   "prompt_tokens": stats["prompt_tokens"],
                   "image_tokens": stats["image_tokens"], "errors": len(paths) - n,
                   "captions": stats["captions"]}
        elif self.variant in PIPELINES:
            rep = self._run_pipeline(slice_name, s)
        else:
            rep = self._run_engine(paths)
        if not captions:
            del rep["captions"]
        return rep

    def _sampling(self):
        from ..config import SamplingSpec

        return SamplingSpec(max_tokens=self.cfg["max_tokens"], temperature=0.0,
                            ignore_eos=True)

    def _run_engine(self, paths: list[str]) -> dict:
        from .. import prompts
        from ..config import PromptSpec
        from ..images import load_rgb

        t0 = time.perf_counter()
        images = [load_rgb(p) for p in paths]  # decoded before the clock: engine throughput
        decode_s = time.perf_counter() - t0
        text = prompts.render(PromptSpec(self.cfg["prompt"]))
        t0 = time.perf_counter()
        reqs = [prompts.request(text, im) for im in images]
        res = self.engine.generate(reqs, self._sampling())
        seconds = time.perf_counter() - t0
        ok = [r for r in res if not r.error]
        return {"seconds": seconds, "requests": len(ok),
                "output_tokens": sum(r.output_tokens for r in ok),
                "prompt_tokens": sum(r.prompt_tokens for r in ok),
                "image_tokens": sum(r.image_tokens for r in ok),
                "errors": len(res) - len(ok), "decode_s_untimed": round(decode_s, 3),
                "captions": [None if r.error else r.text for r in res]}

    def _run_pipeline(self, slice_name: str, s: dict) -> dict:
        from .. import pipeline
        from ..config import PromptSpec, RunConfig
        from ..sources import SourceSpec

        c = self.cfg
        out = Path(c["out_dir"]) / f"{self.variant}-{slice_name}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = RunConfig(
            source=SourceSpec.parse("coco", data_dir=c["images_dir"],
                                    annotations=s["annotations"]),
            engine=self.engine.spec, output=out, prompt=PromptSpec(c["prompt"]),
            sampling=self._sampling(), batch_size=c["batch_size"], workers=c["workers"],
            cache_dir=Path(c["cache_dir"]), progress=False)
        t0 = time.perf_counter()
        code = pipeline.run(cfg, log=lambda m: print(m, file=sys.stderr, flush=True),
                            started=(self.engine, self.entry))
        seconds = time.perf_counter() - t0
        if code != pipeline.EXIT_OK:
            raise RuntimeError(f"pipeline.run exited {code}")
        st = json.loads(next(out.glob("*.stats.json")).read_text())
        by_file = _captions_by_file(out)
        shutil.rmtree(out, ignore_errors=True)
        return {"seconds": seconds, "requests": st["requests"],
                "output_tokens": st["output_tokens"], "prompt_tokens": st["input_tokens"],
                "image_tokens": st["image_tokens"], "errors": st["errors"],
                "pipeline_generate_s": st["generate_s"], "pipeline_total_s": st["total_s"],
                "captions": [by_file.get(f) for f in s["files"]]}

    def close(self):
        if self.engine is not None:
            self.engine.close()
        elif self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass


def _captions_by_file(out_dir: Path) -> dict[str, str | None]:
    """Caption per image file name from a pipeline run's Parquet output."""
    import pyarrow.parquet as pq

    got: dict[str, str | None] = {}
    for part in sorted(out_dir.glob("*.parquet")):
        t = pq.read_table(part, columns=["image_ref", "caption"]).to_pydict()
        got.update((os.path.basename(r), c) for r, c in zip(t["image_ref"], t["caption"]))
    return got


def main(cfg: dict, fds: dict[str, int]) -> int:
    """Run the command loop (commands on `fds["command"]`, replies on `fds["reply"]`);
    returns the exit code. Errors go to the parent."""
    reply = os.fdopen(fds["reply"], "w", buffering=1)

    def send(doc: dict):
        reply.write(json.dumps(doc, default=str) + "\n")
        reply.flush()

    worker = Worker(cfg)
    t0 = time.perf_counter()
    try:
        info = worker.start()
        send({"ready": True, "start_wall_s": round(time.perf_counter() - t0, 2), **info})
    except BaseException as e:
        traceback.print_exc()
        send({"ready": False, "error": _one_line(e)})
        return 1
    code = 0
    for line in os.fdopen(fds["command"]):
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        try:
            print(f"[bench {worker.variant}] run {cmd['slice']}", file=sys.stderr, flush=True)
            send({"ok": True, **worker.run(cmd["slice"], bool(cmd.get("captions")))})
        except BaseException as e:
            traceback.print_exc()
            send({"ok": False, "error": _one_line(e)})
            code = 1
            break
    worker.close()
    return code


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
