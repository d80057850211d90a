#!/usr/bin/env python3
"""What a user writes without internvl-batch: caption a folder of images with InternVL through
vLLM's `LLM.generate`, vLLM defaults otherwise.

    python -m internvl_batch.bench.plain --model /models/InternVL3-1B --images /data/coco/val2017

Images are opened and converted serially in the loop, in the calling process, and then the
whole list goes to one `llm.generate`. This file is also the `plain` variant of
`internvl-batch bench`, which imports it and calls `run_once` once per timed repeat, so the
timing below covers the image decoding too (that is the point of the comparison).
"""
from __future__ import annotations

import argparse
import glob
import os
import time

# InternVL3's chat template (internvl2_5, ChatML); vLLM expands <image> to the image tokens
PROMPT = ("<|im_start|>user\n<image>\nDescribe this image in one sentence.<|im_end|>\n"
          "<|im_start|>assistant\n")


def make_llm(model: str, gpu_memory_utilization: float = 0.9,
             max_dynamic_patch: int | None = None, dummy_weights: bool = True):
    from vllm import LLM

    kwargs = {}
    if max_dynamic_patch is not None:
        kwargs["mm_processor_kwargs"] = {"max_dynamic_patch": max_dynamic_patch}
    return LLM(model=model, trust_remote_code=True,
               load_format="dummy" if dummy_weights else "auto",
               max_model_len=8192, limit_mm_per_prompt={"image": 1},
               gpu_memory_utilization=gpu_memory_utilization, **kwargs)


def run_once(llm, paths: list[str], max_tokens: int = 32, prompt: str = PROMPT,
             stats: dict | None = None) -> tuple[float, int, int]:
    """Caption `paths` once: (seconds, requests answered, output tokens), counted from the
    outputs. The clock covers opening and decoding the images as well as generation.
    `stats`, if given, also receives prompt_tokens and image_tokens."""
    from PIL import Image
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    requests = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        requests.append({"prompt": prompt, "multi_modal_data": {"image": image}})
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    answered = [o for o in outputs if o.outputs]
    output_tokens = sum(len(o.outputs[0].token_ids) for o in answered)
    if stats is not None:
        img_id = llm.get_tokenizer().convert_tokens_to_ids("<IMG_CONTEXT>")
        stats["prompt_tokens"] = sum(len(o.prompt_token_ids or ()) for o in answered)
        stats["image_tokens"] = sum(sum(1 for t in (o.prompt_token_ids or ()) if t == img_id)
                                    for o in answered)
        stats["captions"] = [o.outputs[0].text if o.outputs else None for o in outputs]
    return seconds, len(answered), output_tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="InternVL checkpoint directory or hub id")
    ap.add_argument("--images", required=True, help="a folder of images (*.jpg, *.png)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-dynamic-patch", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--real-weights", action="store_true",
                    help="load the checkpoint's weights (default: dummy, for benchmarks)")
    a = ap.parse_args()
    paths = sorted(p for ext in ("jpg", "jpeg", "png")
                   for p in glob.glob(os.path.join(a.images, f"*.{ext}")))[:a.limit]
    t0 = time.perf_counter()
    llm = make_llm(a.model, a.gpu_memory_utilization, a.max_dynamic_patch,
                   dummy_weights=not a.real_weights)
    print(f"engine start {time.perf_counter() - t0:.2f} s", flush=True)
    seconds, n, toks = run_once(llm, paths, a.max_tokens)
    print(f"{n} images in {seconds:.2f} s: {n / seconds:.2f} requests/s, "
          f"{toks / seconds:.1f} output tok/s")


if __name__ == "__main__":
    main()
