"""Where each process's host time goes, from a py-spy recording (the host profile).

    py-spy record --subprocesses --idle --nonblocking -r RATE --format raw -o spy.txt --pid PID
    python -m internvl_batch.bench.spy spy.txt --rate RATE [--json out.json]

py-spy's raw format is one line per distinct stack, `frame;frame;...;frame COUNT`, outermost
first. With `--subprocesses`, each process's stacks start with one `process PID:"cmdline"`
frame for each process between the recorded one and it. Forked processes (the fork server's
children: replicas, engine cores, workers) show the fork server's command line, so the pid is
what tells them apart; `host_rss` in stats.json, or `ps`, gives each pid's role.

Each sample is put in one category: the first frame from the leaf up that a rule in `RULES`
knows. Samples in a thread waiting for work (vLLM's busy-yield, polls, queue gets) are
"waiting" and come only with `--idle`. The categories are coarse and vLLM-version dependent
(file paths of vLLM 0.26 and 0.32); `top_leaves` shows what lies under each.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

# (category, substrings of a frame "function (file:line)"); checked in this order per frame,
# frames from the leaf up
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("waiting (busy-yield, poll, queue)",
     ("sched_yield", "acquire_read", "Poller.poll", "Socket.recv", "Queue.get", "Event.wait",
      "Condition.wait", "time.sleep", "select (", "_poll_outputs")),
    ("serialization (msgpack, pickle, zmq send)",
     ("msgspec", "serial_utils", "pickle", "Socket.send", "send_multipart")),
    ("multimodal input processing (HF processor, PIL, hashing)",
     ("vllm/multimodal/", "transformers/image_", "transformers/processing_", "PIL/",
      "torchvision/", "blake3", "hashlib", "/inputs/", "renderers/")),
    ("sampler", ("vllm/v1/sample/",)),
    ("scheduler and KV cache manager", ("vllm/v1/core/",)),
    ("output processing (detokenize, RequestOutput)",
     ("output_processor", "detokenizer", "tokenizers/", "vllm/outputs.py", "logprobs")),
    ("model forward (kernel launches, compiled graphs)",
     ("vllm/model_executor/", "torch/nn/", "torch/_ops", "torch/_dynamo", "torch/_inductor",
      "triton/", "vllm/compilation/", "vllm/v1/attention/", "vllm/attention/",
      "cuda_graph", "CUDAGraph")),
    ("model runner (inputs, bookkeeping, host syncs)", ("vllm/v1/worker/",)),
    ("engine core loop and executor", ("vllm/v1/engine/", "vllm/v1/executor/",
                                       "vllm/distributed/")),
    ("internvl_batch", ("internvl_batch/",)),
    ("python runtime", ("threading.py", "multiprocessing/", "<frozen runpy>")),
)
OTHER = "other"
# a stack with an import anywhere in it is start-up, whatever its leaf (module bodies run
# vLLM's and torch's code at import)
STARTUP = "start-up (imports)"
IMPORT_FRAMES = ("<frozen importlib", "_call_with_frames_removed")


def category(frames: list[str]) -> str:
    if any(k in f for f in frames for k in IMPORT_FRAMES):
        return STARTUP
    for frame in reversed(frames):
        for name, keys in RULES:
            if any(k in frame for k in keys):
                return name
    return OTHER


def parse(lines) -> list[tuple[str, list[str], int]]:
    """[(process, frames without the process frames, samples)]; the process is the innermost
    `process PID:"cmdline"` frame, shortened to `PID cmdline[:60]`."""
    out, pending = [], ""
    for line in lines:
        # a command line with newlines in it (python -c "...") spans several lines: a stack
        # ends only where a line ends in its count
        line = pending + line.rstrip("\n")
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            pending = line + "\\n"
            continue
        pending = ""
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        rest = [f for f in frames if not f.startswith("process ")]
        proc = "main"
        if procs:
            pid, _, cmd = procs[-1][len("process "):].partition(":")
            proc = f"{pid} {cmd.strip(chr(34))[:60]}"
        out.append((proc, rest, int(n)))
    return out


def summarize(samples: list[tuple[str, list[str], int]], rate: float, top: int = 8) -> dict:
    """Per process: samples, seconds (samples / rate: thread-seconds, since py-spy samples
    every thread of a process), each category's share and seconds, and the most frequent
    leaf frames per category."""
    cats: dict[str, Counter] = defaultdict(Counter)
    leaves: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for proc, frames, n in samples:
        c = category(frames)
        cats[proc][c] += n
        leaves[(proc, c)][frames[-1] if frames else "?"] += n
    out: dict = {"rate_hz": rate, "processes": {}}
    for proc, counts in sorted(cats.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counts.values())
        out["processes"][proc] = {
            "samples": total, "seconds": round(total / rate, 2),
            "categories": {c: {"samples": k, "share": round(k / total, 4),
                               "seconds": round(k / rate, 2),
                               "top_leaves": leaves[(proc, c)].most_common(top)}
                           for c, k in counts.most_common()}}
    return out


def markdown(summary: dict, min_share: float = 0.01) -> str:
    lines = [f"Host time by process and category (py-spy at {summary['rate_hz']:g} Hz; a "
             "sample's category is the first frame from the leaf up that a rule knows):", ""]
    for proc, p in summary["processes"].items():
        lines += [f"**{proc}**: {p['samples']} samples ({p['seconds']} thread-seconds)", "",
                  "| category | share | thread-s | most frequent leaf |", "|---|---|---|---|"]
        for c, v in p["categories"].items():
            if v["share"] < min_share:
                continue
            leaf = v["top_leaves"][0][0] if v["top_leaves"] else ""
            lines.append(f"| {c} | {100 * v['share']:.1f} % | {v['seconds']} | "
                         f"`{leaf[:90]}` |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m internvl_batch.bench.spy",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("raw", help="py-spy record --format raw output")
    ap.add_argument("--rate", type=float, required=True, help="py-spy's -r (samples/s)")
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--min-share", type=float, default=0.01,
                    help="leave out categories below this share of a process")
    a = ap.parse_args(argv)
    path = Path(a.raw)
    if not path.is_file():
        print(f"error: {path}: no such file (py-spy record ... --format raw -o {path})",
              file=sys.stderr)
        return 2
    if a.rate <= 0:
        print("error: --rate must be > 0 (py-spy's -r)", file=sys.stderr)
        return 2
    with path.open(encoding="utf-8", errors="replace") as f:
        summary = summarize(parse(f), a.rate)
    if not summary["processes"]:
        print(f"error: {path}: no py-spy raw stacks in it", file=sys.stderr)
        return 2
    print(markdown(summary, a.min_share))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
