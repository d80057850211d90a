"""The host cost per image of one engine's front, measured where vLLM runs.

What `LLM.generate` does per request before vLLM's engine core sees it, done by the
engine's own code (`bench.ab.engine_request`: renderer + input processor: tiles, resize,
normalise, hash, tokenise), then the request's trip to the engine-core process (vLLM's
msgpack encoder in the front, its decoder in the engine core). Per image: median and
spread of each (timed without a profiler), the bytes per request, and a cProfile
breakdown of the processing by where the time is spent (a second pass: cProfile slows it,
so its milliseconds are shares, not timings). No model call is timed; the engine only provides its processor.

    python benchmarks/front_cost.py --model preset:internvl3-1b --images D/images --n 300 \
        --out front-cost.json

Images are decoded before the clock (in `run` the decode workers do that).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pickle
import pstats
import statistics
import sys
import time
from pathlib import Path

# where a function's own time goes, by the file that defines it (first match wins)
GROUPS = [
    ("image ops in PIL (resize, convert)", ("/PIL/",)),
    ("tensor ops (torch, torchvision, numpy)", ("/torch/", "/torchvision/", "/numpy/",
                                                "built-in method torch", "<built-in method",
                                                "of 'torch", "of 'numpy")),
    ("hashing", ("hasher", "blake3", "hashlib", "_hashlib")),
    ("tokenizer", ("/tokenizers/", "tokenization_", "/tokenizer")),
    ("HF processor code", ("/transformers/",)),
]


def group_of(file: str, func: str) -> str:
    where = f"{file}:{func}"
    for name, needles in GROUPS:
        if any(n in where for n in needles):
            return name
    return "other Python (vLLM, stdlib)"


def spread(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"median": round(statistics.median(xs), 4), "p10": round(q(0.1), 4),
            "p90": round(q(0.9), 4), "n": len(xs)}


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="preset:internvl3-1b")
    ap.add_argument("--images", required=True, help="a folder of images (448 px: one tile)")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-dynamic-patch", type=int, default=1)
    ap.add_argument("--out", default="front-cost.json")
    return ap.parse_args()


def _pickle_ms(images) -> list[float]:
    """`run --replicas`: each decoded image is pickled to its replica
    (processes.children.send_frame) and unpickled there; milliseconds per image."""
    out = []
    for im in images:
        t = time.perf_counter()
        pickle.loads(pickle.dumps(im, protocol=5))
        out.append(1e3 * (time.perf_counter() - t))
    return out


def _measure(llm, reqs: list, warmup: int) -> tuple[dict, cProfile.Profile]:
    """Per request after `warmup` untimed ones: processing, msgpack encoding for the engine
    core and decoding there (ms), bytes; then the same requests again under cProfile."""
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from internvl_batch.bench.ab import ab_sampling_params, engine_request

    params = ab_sampling_params(32)
    enc, dec = MsgpackEncoder(), MsgpackDecoder(EngineCoreRequest)
    for i, r in enumerate(reqs[:warmup]):
        dec.decode(enc.encode(engine_request(llm, f"w{i}", r, params)))
    ms: dict[str, list] = {"proc": [], "enc": [], "dec": [], "bytes": []}
    for i, r in enumerate(reqs[warmup:]):  # timed: no profiler
        t = time.perf_counter()
        req = engine_request(llm, f"r{i}", r, params)
        t1 = time.perf_counter()
        bufs = enc.encode(req)
        t2 = time.perf_counter()
        dec.decode(bufs)
        t3 = time.perf_counter()
        ms["proc"].append(1e3 * (t1 - t))
        ms["enc"].append(1e3 * (t2 - t1))
        ms["dec"].append(1e3 * (t3 - t2))
        ms["bytes"].append(sum(len(memoryview(b)) for b in bufs))
    prof = cProfile.Profile()  # then the same requests again, profiled (slower)
    prof.enable()
    for i, r in enumerate(reqs[warmup:]):
        engine_request(llm, f"p{i}", r, params)
    prof.disable()
    return ms, prof


def _profile_parts(prof: cProfile.Profile, n: int) -> dict:
    """cProfile's functions per image: own time by group, the total, vLLM's and
    transformers' functions by time including callees, and the top functions by own time."""
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())  # own time of every function
    groups: dict[str, float] = {}
    top, cum = [], []
    for (file, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        g = group_of(file, func)
        groups[g] = groups.get(g, 0.0) + tt
        top.append((tt, f"{Path(file).name}:{line} {func}", nc))
        cum.append((ct, f"{file.split('site-packages/')[-1]}:{line} {func}", nc))
    top.sort(reverse=True)
    cum.sort(reverse=True)
    return {
        "profile_ms_per_image_by_group": {k: round(1e3 * v / n, 3) for k, v in
                                          sorted(groups.items(), key=lambda kv: -kv[1])},
        "profile_ms_per_image_total": round(1e3 * total / n, 3),
        # the stages: vLLM's and transformers' functions by time including their callees
        "stages_cumulative_ms_per_image": [
            {"function": f, "ms": round(1e3 * ct / n, 3), "calls_per_image": round(nc / n, 2)}
            for ct, f, nc in cum if any(k in f for k in ("vllm", "transformers"))][:30],
        "top_functions_own_ms_per_image": [
            {"function": f, "ms": round(1e3 * tt / n, 3), "calls_per_image": round(nc / n, 2)}
            for tt, f, nc in top[:20]],
    }


def main() -> int:
    a = _args()

    from PIL import Image

    from internvl_batch import prompts
    from internvl_batch.cache import CompileCache
    from internvl_batch.config import EngineSpec, PromptSpec, default_cache_dir
    from internvl_batch.engine import Engine

    if not Path(a.images).is_dir():
        return _usage(f"--images {a.images}: no such directory (a folder of 448 px images)")
    files = sorted(p for p in Path(a.images).iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: a.n + a.warmup]
    if len(files) < a.n + a.warmup:
        return _usage(f"--images {a.images}: {len(files)} images, need {a.n + a.warmup} "
                      "(--n plus --warmup)")
    images = [Image.open(p).convert("RGB") for p in files]
    pickle_ms = _pickle_ms(images[a.warmup:])
    text = prompts.render(PromptSpec())  # run's default prompt
    reqs = [prompts.request(text, im) for im in images]

    # presets are synthesized under the default cache dir, as `run` does
    spec = CompileCache(default_cache_dir()).resolve(EngineSpec(
        model=a.model, max_dynamic_patch=a.max_dynamic_patch, mm_cache_gb=0.0))
    t0 = time.perf_counter()
    eng = Engine(spec).start()
    start_s = time.perf_counter() - t0
    try:
        ms, prof = _measure(eng.llm, reqs, a.warmup)
    finally:
        eng.close()

    doc = {
        "model": a.model, "images": a.n, "max_dynamic_patch": a.max_dynamic_patch,
        "image_size": list(images[0].size), "engine_start_s": round(start_s, 2),
        "versions": eng.info(),
        "per_image_ms": {"image pickled to a replica and back (run --replicas)": spread(pickle_ms),
                         "process (renderer + input processor)": spread(ms["proc"]),
                         "encode for the engine core (msgpack)": spread(ms["enc"]),
                         "decode in the engine core (msgpack)": spread(ms["dec"])},
        "bytes_per_request": spread(ms["bytes"]),
        **_profile_parts(prof, a.n),
    }
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: doc[k] for k in ("per_image_ms", "bytes_per_request",
                                          "profile_ms_per_image_by_group")}, indent=1))
    for t in doc["stages_cumulative_ms_per_image"][:25]:
        print(f"{t['ms']:8.3f} ms  {t['calls_per_image']:7.2f}/img  {t['function']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
