"""Stats: counted from vLLM's outputs, timed over generation only.

Rates divide by `generate_s` (time inside `LLM.generate`, plus the decode wait that feeds it),
never by engine start-up, which is reported separately (load / compile / CUDA-graph seconds).
A resumed shard accumulates one entry per invocation in `runs`; totals sum them.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field

# Fixed keys: downstream tooling (merge, bench, dashboards) may rely on every one existing.
KEYS = (
    "rows", "images", "requests", "errors",
    "input_tokens", "image_tokens", "output_tokens", "total_tokens",
    "load_s", "compile_s", "cudagraph_s", "warmup_s", "init_s", "generate_s", "total_s",
    "images_per_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
    "peak_rss_gb", "gpu_name", "gpu_peak_mem_gb",
    "cache_hit", "cache_key",
)


@dataclass
class RunStats:
    rows: int = 0            # rows written, error rows included
    images: int = 0          # images captioned (rows without error)
    requests: int = 0        # requests vLLM answered
    errors: int = 0
    input_tokens: int = 0
    image_tokens: int = 0
    output_tokens: int = 0
    load_s: float | None = None
    compile_s: float | None = None
    cudagraph_s: float | None = None
    warmup_s: float = 0.0
    init_s: float = 0.0
    generate_s: float = 0.0
    total_s: float = 0.0
    gpu_name: str | None = None
    gpu_peak_mem_gb: float | None = None
    cache_hit: bool | None = None
    cache_key: str | None = None
    started_at: float = field(default_factory=time.time)
    # wall clock of the first and last batch written: lines up GPU/host monitoring with the
    # steady state, engine start-up excluded
    first_batch_at: float | None = None
    last_batch_at: float | None = None

    def add_row(self, *, error: str | None, prompt_tokens: int = 0, image_tokens: int = 0,
                output_tokens: int = 0, answered: bool = False):
        self.rows += 1
        if answered:
            self.requests += 1
            self.input_tokens += prompt_tokens
            self.image_tokens += image_tokens
            self.output_tokens += output_tokens
        if error:
            self.errors += 1
        else:
            self.images += 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_rss_gb"] = peak_rss_gb()
        return d


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 2**20 if sys.platform != "darwin" else kb / 2**30, 3)


def _rate(n: float, s: float) -> float:
    return round(n / s, 3) if s > 0 else 0.0


def summarize(runs: list[dict]) -> dict:
    """Totals over invocations (a resumed shard) or shards (merge): sums and overall rates.

    Shards run in parallel, so merged rates use the per-shard sum of rates, not total/sum(s).
    """
    out = {k: None for k in KEYS}
    for k in ("rows", "images", "requests", "errors", "input_tokens", "image_tokens",
              "output_tokens"):
        out[k] = sum(int(r.get(k) or 0) for r in runs)
    out["total_tokens"] = out["input_tokens"] + out["output_tokens"]
    for k in ("warmup_s", "init_s", "generate_s", "total_s"):
        out[k] = round(sum(float(r.get(k) or 0) for r in runs), 3)
    for k in ("load_s", "compile_s", "cudagraph_s"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = round(sum(vals), 3) if vals else None
    g = out["generate_s"]
    out["images_per_s"] = _rate(out["images"], g)
    out["requests_per_s"] = _rate(out["requests"], g)
    out["output_tokens_per_s"] = _rate(out["output_tokens"], g)
    out["total_tokens_per_s"] = _rate(out["total_tokens"], g)
    rss = [r.get("peak_rss_gb") for r in runs if r.get("peak_rss_gb") is not None]
    out["peak_rss_gb"] = max(rss) if rss else None
    gpus = [r.get("gpu_peak_mem_gb") for r in runs if r.get("gpu_peak_mem_gb") is not None]
    out["gpu_peak_mem_gb"] = max(gpus) if gpus else None
    names = sorted({r.get("gpu_name") for r in runs if r.get("gpu_name")})
    out["gpu_name"] = ", ".join(names) if names else None
    hits = [r.get("cache_hit") for r in runs if r.get("cache_hit") is not None]
    out["cache_hit"] = all(hits) if hits else None
    keys = sorted({r.get("cache_key") for r in runs if r.get("cache_key")})
    out["cache_key"] = ", ".join(keys) if keys else None
    return out


def merge_parallel(shards: list[dict]) -> dict:
    """Shard totals -> one report. Wall rates of parallel shards add up."""
    out = summarize(shards)
    for k in ("images_per_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
        out[k] = round(sum(float(s.get(k) or 0) for s in shards), 3)
    return out


def write(path, summary: dict, runs: list[dict], extra: dict | None = None):
    doc = dict(summary)
    doc["runs"] = runs
    if extra:
        doc.update(extra)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=str)
    import os

    os.replace(tmp, path)


def table(summary: dict, title: str = "internvl-batch") -> str:
    """The end-of-run summary a person reads."""
    def f(v, unit=""):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.2f}{unit}"
        return f"{v:,}{unit}" if isinstance(v, int) else f"{v}{unit}"

    rows = [
        ("images captioned", f(summary["images"])), ("error rows", f(summary["errors"])),
        ("input / output tokens", f"{f(summary['input_tokens'])} / {f(summary['output_tokens'])}"),
        ("images/s", f(summary["images_per_s"])), ("requests/s", f(summary["requests_per_s"])),
        ("output tok/s", f(summary["output_tokens_per_s"])),
        ("total tok/s", f(summary["total_tokens_per_s"])),
        ("load / compile / cudagraph s",
         f"{f(summary['load_s'])} / {f(summary['compile_s'])} / {f(summary['cudagraph_s'])}"),
        ("init / warm-up / generate / total s",
         f"{f(summary['init_s'])} / {f(summary['warmup_s'])} / {f(summary['generate_s'])} / "
         f"{f(summary['total_s'])}"),
        ("peak host RSS", f(summary["peak_rss_gb"], " GB")),
        ("device", f(summary["gpu_name"])), ("peak GPU memory", f(summary["gpu_peak_mem_gb"], " GB")),
        ("compile cache", "-" if summary["cache_hit"] is None else
         ("hit" if summary["cache_hit"] else "miss") + f" ({summary['cache_key']})"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [title, "-" * (w + 30)] + [f"{k:<{w}}  {v}" for k, v in rows]
    return "\n".join(lines)
