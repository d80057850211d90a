#!/usr/bin/env python3
"""Where the time goes when `LLM.generate` captions images: the breakdown behind engine replicas.

    python benchmarks/profile_frontend.py --model preset:internvl3-1b --images 1024 --out prof.json

One engine as a plain script builds it (internvl_batch/bench/plain.py), images decoded before the
clock, then three measurements on distinct image slices after a warm-up:

1. `generate` unprofiled, with the GPU's busy % sampled by nvidia-smi every 100 ms;
2. `generate` under cProfile (the calling process only: vLLM's frontend). Its time splits into
   adding requests (vLLM's serial multimodal preprocessing) and running the engine loop
   (waiting for the engine-core process), with the top functions of the add phase;
3. the InternVL image preprocessing alone, image by image, timed in a loop.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def split_profile(prof: cProfile.Profile, top: int = 20) -> dict:
    st = pstats.Stats(prof)
    cum = {}
    for (file, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
        key = f"{os.path.basename(file)}:{name}"
        cum[key] = max(cum.get(key, 0.0), ct)

    def find(*names):
        return max((v for k, v in cum.items() if k.split(":")[-1] in names), default=None)

    rows = sorted(((ct, tt, nc, f"{os.path.basename(f)}:{ln}:{n}")
                   for (f, ln, n), (cc, nc, tt, ct, _) in st.stats.items()),
                  reverse=True)
    interesting = [r for r in rows if not r[3].split(":")[-1].startswith("<")][:top * 3]
    by_tottime = sorted(((tt, ct, nc, f"{os.path.basename(f)}:{ln}:{n}")
                         for (f, ln, n), (cc, nc, tt, ct, _) in st.stats.items()),
                        reverse=True)[:top]
    return {
        # vLLM 0.26 preprocesses inside a generator (`_preprocess_cmpl`), whose time cProfile
        # does not roll up into the `*_add_requests` caller
        "add_requests_s": find("_render_and_add_requests", "_add_completion_requests",
                               "_validate_and_add_requests", "_preprocess_cmpl"),
        "run_engine_s": find("_run_engine"),
        "mm_processing_s": find("_process_multimodal", "apply"),
        "pixel_values_s": find("image_to_pixel_values_internvl"),
        "hashing_s": find("hash_kwargs", "hash_prompt_mm_data", "_hash_mm_items"),
        "tokenizer_s": find("encode", "_tokenize_prompt"),
        "top_cumulative": [{"cum_s": round(c, 3), "self_s": round(t, 3), "calls": n, "fn": f}
                           for c, t, n, f in interesting[:top * 2]],
        "top_self": [{"self_s": round(t, 3), "cum_s": round(c, 3), "calls": n, "fn": f}
                     for t, c, n, f in by_tottime],
    }


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="preset:internvl3-1b")
    ap.add_argument("--images", type=int, default=1024, help="per measurement")
    ap.add_argument("--warmup", type=int, default=128)
    ap.add_argument("--sizes", choices=["448", "coco"], default="448")
    ap.add_argument("--max-dynamic-patch", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--mm-cache-gb", type=float, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=None, help="write the breakdown as JSON here")
    return ap.parse_args()


def _model_and_images(a: argparse.Namespace) -> tuple[str, list]:
    """The checkpoint (a preset is synthesized into the cache) and the generated images of
    the warm-up and the three measurements, decoded."""
    from pathlib import Path

    from internvl_batch.bench import dataset
    from internvl_batch.cache import CompileCache
    from internvl_batch.config import EngineSpec, default_cache_dir
    from internvl_batch.images import load_rgb

    cache = CompileCache(Path(a.cache_dir) if a.cache_dir else default_cache_dir())
    model = cache.resolve(EngineSpec(model=a.model)).model
    n_total = a.warmup + 3 * a.images
    images_dir, ann = dataset(cache.root / "bench-data", a.sizes, n_total)
    files = [im["file_name"] for im in json.loads(ann.read_text())["images"]][:n_total]
    t0 = time.perf_counter()
    images = [load_rgb(str(images_dir / f)) for f in files]
    print(f"decoded {len(images)} images in {time.perf_counter() - t0:.1f}s", flush=True)
    return model, images


def _pixel_values_ms(llm, images: list, max_dynamic_patch: int) -> float:
    """The model's own image preprocessing, alone (what the frontend runs per image): ms
    per image."""
    try:
        from vllm.transformers_utils.processors.internvl import image_to_pixel_values_internvl
    except ImportError:
        from vllm.model_executor.models.internvl import image_to_pixel_values_internvl

    cfg = llm.llm_engine.model_config.hf_config
    side = cfg.force_image_size or cfg.vision_config.image_size
    t0 = time.perf_counter()
    for im in images:
        image_to_pixel_values_internvl(im, input_size=side, min_num=1,
                                       max_num=max_dynamic_patch, use_thumbnail=True)
    return (time.perf_counter() - t0) / len(images) * 1e3


def main():
    a = _args()

    from pathlib import Path

    from internvl_batch.bench import GpuBusy
    from internvl_batch.bench.worker import load_plain

    model, images = _model_and_images(a)
    plain = load_plain()
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    import vllm
    from vllm import LLM, SamplingParams

    kw = {}
    if a.mm_cache_gb is not None:
        kw["mm_processor_cache_gb"] = a.mm_cache_gb

    t0 = time.perf_counter()
    llm = LLM(model=model, trust_remote_code=True, load_format="dummy", max_model_len=8192,
              limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=a.gpu_memory_utilization,
              mm_processor_kwargs={"max_dynamic_patch": a.max_dynamic_patch}, **kw)
    init_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)

    def reqs(chunk):
        return [{"prompt": plain.PROMPT, "multi_modal_data": {"image": im}} for im in chunk]

    w, n = a.warmup, a.images
    llm.generate(reqs(images[:w]), params, use_tqdm=False)

    busy = GpuBusy().start()
    wall0, t0 = time.time(), time.perf_counter()
    llm.generate(reqs(images[w:w + n]), params, use_tqdm=False)
    plain_s = time.perf_counter() - t0
    busy_pct = busy.mean(wall0, time.time())
    busy.stop()

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    llm.generate(reqs(images[w + n:w + 2 * n]), params, use_tqdm=False)
    prof.disable()
    profiled_s = time.perf_counter() - t0
    split = split_profile(prof)
    pv_ms = _pixel_values_ms(llm, images[w + 2 * n:w + 3 * n], a.max_dynamic_patch)

    doc = {
        "model": a.model, "images": n, "sizes": a.sizes, "max_dynamic_patch": a.max_dynamic_patch,
        "max_tokens": a.max_tokens, "mm_cache_gb": a.mm_cache_gb, "vllm": vllm.__version__,
        "init_s": round(init_s, 1),
        "generate_s": round(plain_s, 3), "images_per_s": round(n / plain_s, 2),
        "gpu_busy_pct_mean": busy_pct,
        "profiled_generate_s": round(profiled_s, 3),
        "profiled_images_per_s": round(n / profiled_s, 2),
        "per_image_ms": {
            "wall": round(plain_s / n * 1e3, 3),
            "add_requests_profiled": round((split["add_requests_s"] or 0) / n * 1e3, 3),
            "run_engine_profiled": round((split["run_engine_s"] or 0) / n * 1e3, 3),
            "pixel_values_alone": round(pv_ms, 3),
        },
        "profile": split,
    }
    text = json.dumps(doc, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(text[:6000])
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
