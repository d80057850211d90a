"""Host cost per generated token of vLLM's incremental detokenizer (what LLMEngine.step runs
for every running request at every step) against one batch_decode at the end.

    .venv/bin/python benchmarks/detok_cost.py ~/.cache/internvl-batch/models/internvl3-1b
"""
import inspect
import random
import statistics
import sys
import time

from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.v1.engine import EngineCoreRequest
from vllm.v1.engine.detokenizer import IncrementalDetokenizer

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
V = len(tok) - 100
rng = random.Random(0)
N_REQ, N_TOK = 256, 32
def make(rid):
    sp = SamplingParams(max_tokens=N_TOK, skip_special_tokens=True, detokenize=True)
    kw = dict(request_id=str(rid), prompt_token_ids=[1, 2, 3], mm_features=None,
              sampling_params=sp, pooling_params=None, arrival_time=0.0, lora_request=None,
              cache_salt=None, data_parallel_rank=None)
    params = inspect.signature(EngineCoreRequest).parameters
    if "eos_token_id" in params: kw["eos_token_id"] = None
    return EngineCoreRequest(**{k: v for k, v in kw.items() if k in params})
res = []
for rep in range(5):
    dets = [IncrementalDetokenizer.from_new_request(tok, make(i)) for i in range(N_REQ)]
    toks = [[rng.randrange(1000, V) for _ in range(N_TOK)] for _ in range(N_REQ)]
    t0 = time.perf_counter()
    for step in range(N_TOK):
        for d, t in zip(dets, toks):
            d.update([t[step]], False)
    res.append((time.perf_counter() - t0) / (N_REQ * N_TOK) * 1e6)
print(f"incremental detokenizer: {statistics.median(res):.2f} us per token (min {min(res):.2f}, max {max(res):.2f}), {type(dets[0]).__name__}")
t0 = time.perf_counter()
for rep in range(5):
    out = tok.batch_decode(toks, skip_special_tokens=True)
print(f"batch_decode at the end: {(time.perf_counter() - t0) / 5 / (N_REQ * N_TOK) * 1e6:.2f} us per token")
