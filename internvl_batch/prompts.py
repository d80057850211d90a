"""Prompts: the InternVL chat format and sampling parameters.

InternVL3's template (`internvl2_5`) is ChatML. vLLM's InternVL processor replaces the literal
`<image>` with `<img><IMG_CONTEXT>*N</img>`, N set by the number of tiles, so we only place the
marker.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import PromptSpec, SamplingSpec

STOP_STRINGS = ["<|im_end|>", "<|endoftext|>"]
IMAGE_MARKER = "<image>"
# the prompt of the engine's own requests (encoder warm-up, the compile cache's probe): fixed,
# so a probe's outputs stay comparable across builds
PROBE = PromptSpec("Describe the image.")


def render(spec: PromptSpec) -> str:
    system = ""
    if spec.system_prompt:
        system = f"<|im_start|>system\n{spec.system_prompt}<|im_end|>\n"
    return (f"{system}<|im_start|>user\n{IMAGE_MARKER}\n{spec.prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")


def request(prompt_text: str, image, mm_kwargs: dict | None = None) -> dict:
    """One `LLM.generate` input: the prompt and its image."""
    req = {"prompt": prompt_text, "multi_modal_data": {"image": image}}
    if mm_kwargs:
        req["mm_processor_kwargs"] = mm_kwargs
    return req


def sampling_params(spec: SamplingSpec, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p,
        seed=spec.seed, ignore_eos=spec.ignore_eos,
        stop=None if spec.ignore_eos else STOP_STRINGS,
        skip_special_tokens=True, logprobs=logprobs,
    )


@dataclass(frozen=True)
class Processed:
    """One request rendered by vLLM's renderer outside the engine (preprocess.py), pickled:
    an `EngineInput` dict with the prompt's token ids and the image's pixel tensors. The
    main process forwards the bytes; only the engine's process rebuilds the tensors."""

    blob: bytes

    def unpack(self) -> dict:
        import pickle

        return pickle.loads(self.blob)
