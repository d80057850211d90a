"""Where an engine's start goes, read from the lines vLLM prints while it starts.

vLLM reports each start phase in its log only (most of them from the engine-core process):
weights loaded, Dynamo's bytecode transform, Inductor compiling a graph or loading it from the
cache, torch.compile's total, the profiling run, CUDA-graph capture and the whole engine init.
`parse` turns those lines into phases with seconds, in the order they first appear, summing
repeats (the compiled InternViT logs one set of lines per encoder layer) per phase and
compiled component (`backbone` is the language model; vLLM names the component in its
"Using cache directory: .../<component> for vLLM's torch.compile" line).

The patterns are vLLM 0.26's format strings (vllm/v1/worker/gpu/model_runner.py,
gpu_model_runner.py, compilation/backends.py, compilation/monitor.py, v1/engine/core.py);
lines that do not match are ignored, so another version yields fewer phases, never an error.

Each line may come with the wall-clock time it was read (`engine.LogTap` stamps the lines it
keeps); `at_s` is then when the phase's last line arrived, in seconds from `t0` (the engine's
start). Without stamps, vLLM's own timestamp (to the second) is used, from the first line.
"""
from __future__ import annotations

import re
from datetime import datetime
from typing import Iterable

_S = r"(?P<s>\d+(?:\.\d+)?)"
# (phase, pattern): the seconds are in group "s"; other named groups become fields
PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple((name, re.compile(p)) for name, p in (
    # "Model loading took 1.76 GiB and 2.274779 seconds" (V2 runner; V1: "GiB memory and")
    ("load weights", rf"Model loading took (?P<gib>[\d.]+) GiB(?: memory)? and {_S} seconds"),
    ("dynamo transform", rf"Dynamo bytecode transform time: {_S} s"),
    ("inductor compile", rf"Compiling a graph for compile range .*? takes {_S} s"),
    ("compiled graph from cache",
     rf"Directly load the compiled graph\(s\) for compile range .*? from the cache, took {_S} s"),
    ("torch.compile total",
     rf"torch\.compile (?:and initial profiling/warmup run together )?took {_S} s in total"),
    ("profiling run", rf"Initial profiling/warmup run took {_S} s"),
    ("cuda graphs", rf"Graph capturing finished in {_S} secs?, took (?P<gib>[\d.]+) GiB"),
    ("init engine", rf"init engine \(profile, create kv cache, warmup model\) took {_S} s"
                    r"(?: \(compilation: (?P<compile_s>[\d.]+) s"
                    r"(?: \S+ language_model: (?P<language_model_s>[\d.]+) s, "
                    r"encoder: (?P<encoder_s>[\d.]+) s)?\))?"),
))
# milestones: lines that carry no seconds but mark when a step of the start was reached; each
# becomes a phase whose "s" is the time since the previous milestone (or since t0), so the
# span before the first weight is loaded splits into its steps (config, engine-core process,
# device and distributed init, model construction)
MARKS: tuple[tuple[str, re.Pattern], ...] = tuple((name, re.compile(p)) for name, p in (
    ("config resolved", r"Resolved architecture: "),
    ("engine core up", r"Initializing a V1 LLM engine"),
    ("device ready", r"rank \d+ in world size \d+ is assigned"),
    ("model build begins", r"Loading model from scratch|Starting to load model"),
    ("kv cache sized", r"GPU KV cache size: "),
))
# counted, not timed: how much of the compile came from vLLM's AOT cache
AOT_LOAD = re.compile(r"Directly load AOT compilation from path")
COMPONENT = re.compile(r"Using cache directory: (?P<dir>\S+) for vLLM's torch\.compile")
# "INFO 11-25 11:12:32 [model_runner.py:305] ...", maybe behind "(EngineCore pid=7) "
STAMP = re.compile(r"(?:INFO|WARNING|DEBUG|ERROR) (?P<md>\d\d-\d\d) (?P<hms>\d\d:\d\d:\d\d)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
COMPILE_PHASES = ("dynamo transform", "inductor compile", "compiled graph from cache",
                  "torch.compile total")


def wanted(line: str) -> bool:
    """Whether `line` is one `parse` uses (LogTap keeps only these)."""
    return bool(COMPONENT.search(line) or AOT_LOAD.search(line)
                or any(p.search(line) for _, p in PATTERNS + MARKS))


def _vllm_time(line: str) -> float | None:
    m = STAMP.search(line)
    if not m:
        return None
    # the year is not printed; a leap year keeps 02-29 valid
    return datetime.strptime(f"2000-{m['md']} {m['hms']}", "%Y-%m-%d %H:%M:%S").timestamp()


def parse(lines: Iterable[str | tuple[float, str]], t0: float | None = None) -> list[dict]:
    """Phases of one engine's start, in order of first appearance:
    {"phase", "s" (summed), "n" (lines), "component" (compile phases), "at_s", extras}."""
    phases: dict[tuple[str, str | None], dict] = {}
    component = None
    aot_loads = 0
    base = t0
    last_mark = None
    for item in lines:
        t, line = item if isinstance(item, tuple) else (None, item)
        line = ANSI.sub("", line)
        if t is None:
            t = _vllm_time(line)
        if t is not None and base is None:  # no t0: from the first stamped line
            base = t
        if m := COMPONENT.search(line):
            component = m["dir"].rstrip("/").rsplit("/", 1)[-1]
            continue
        if AOT_LOAD.search(line):
            aot_loads += 1
            continue
        mark = next((name for name, pat in MARKS if pat.search(line)), None)
        if mark:
            if t is not None and (mark, None) not in phases:  # the first time it is reached
                since = base if last_mark is None else last_mark
                phases[(mark, None)] = {"phase": mark, "s": round(t - since, 3), "n": 1,
                                        "mark": True, "at_s": round(t - base, 3)}
                last_mark = t
            continue
        for name, pat in PATTERNS:
            m = pat.search(line)
            if not m:
                continue
            key = (name, component if name in COMPILE_PHASES else None)
            ph = phases.setdefault(key, {"phase": name, "s": 0.0, "n": 0})
            if key[1]:
                ph["component"] = key[1]
            ph["s"] = round(ph["s"] + float(m["s"]), 3)
            ph["n"] += 1
            for k, v in m.groupdict().items():
                if k != "s" and v is not None:
                    ph[k] = float(v)
            if t is not None:
                ph["at_s"] = round(t - base, 3)
            break
    out = list(phases.values())
    if aot_loads:
        out.append({"phase": "AOT artefacts loaded", "s": 0.0, "n": aot_loads})
    return out


def table(engines: list[dict]) -> str:
    """A text table of `[{"engine": name, "phases": [...]}, ...]` (for a person or a report):
    one row per phase, one column of seconds per engine."""
    names = [e["engine"] for e in engines]
    rows: dict[str, list] = {}
    for i, e in enumerate(engines):
        for ph in e.get("phases") or ():
            label = ph["phase"] + (f" ({ph['component']})" if ph.get("component") else "")
            rows.setdefault(label, [None] * len(engines))[i] = ph["s"]
    w = max([len(r) for r in rows] + [5])
    head = f"{'phase':<{w}}  " + "  ".join(f"{n:>12}" for n in names)
    lines = [head, "-" * len(head)]
    for label, vals in rows.items():
        lines.append(f"{label:<{w}}  " + "  ".join(
            f"{'-' if v is None else f'{v:.2f}':>12}" for v in vals))
    return "\n".join(lines)
