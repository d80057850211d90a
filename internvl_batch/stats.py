"""Stats: counted from vLLM's outputs, timed over generation only.

Rates divide by `generate_s` (time inside `LLM.generate`, plus the decode wait that feeds it),
never by engine start-up, which is reported separately (load / compile / CUDA-graph seconds).
A resumed shard accumulates one entry per invocation in `runs` (saved after every batch, so
a run killed with -9 keeps its entry); timings sum them, while row, error and token counts of
a finished shard are recounted from its rows (`count_rows`), so they describe the whole shard
after any number of resumes.

The cost figure (`wall_s`, `gpu_hours`, `images_per_gpu_hour`) covers each command from its
start to its exit: a run's entry is saved before its engines start and once more as the last
thing the run does (`RunRecord`). Where part of the cost is unknown (a run killed before it
could record its end, a lost stats file, entries without hours) `cost_unknown` says what, and
images per GPU-hour is None instead of a rate inflated by the missing hours.
"""
from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from .processes import REPLICA_NAME

# Fixed keys: downstream tooling (merge, bench, dashboards) may rely on every one existing.
KEYS = (
    "rows", "images", "requests", "errors",
    "input_tokens", "image_tokens", "output_tokens", "total_tokens",
    "load_s", "compile_s", "cudagraph_s", "warmup_s", "init_s", "generate_s", "total_s",
    "images_per_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
    "peak_rss_gb", "gpu_name", "gpu_peak_mem_gb",
    "cache_hit", "cache_key",
    "time_to_first_row_s", "shutdown_s", "wall_s", "gpu_hours", "images_per_gpu_hour",
    "error_kinds", "host_rss", "cost_unknown",
)
COUNT_KEYS = ("rows", "images", "requests", "errors", "input_tokens", "image_tokens",
              "output_tokens")


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
    # wall clock of the command's start (for `run`: when this package was first imported,
    # internvl_batch.STARTED_AT): time to the first row and the run's wall time count from
    # here, engine start-up and cache build included
    started_at: float = field(default_factory=time.time)
    # the last thing the run did (RunRecord.end): None while it runs, and in the entry of a
    # run killed before it could record its end
    ended_at: float | None = None
    lock_token: str | None = None  # the shard lock it held: its heartbeats outlive a kill -9
    gpus: int = 1  # devices the run occupies: every engine (replicas too) shares one GPU
    # wall clock of the first and last batch written: lines up GPU/host monitoring with the
    # steady state, engine start-up excluded
    generate_started_at: float | None = None  # the first batch asked of the engine
    first_batch_at: float | None = None
    last_batch_at: float | None = None
    # every engine closed (this run's own; engines it was handed are not closed but the
    # moment is still taken): shutdown_s = closed_at - last_batch_at
    closed_at: float | None = None
    error_kinds: dict = field(default_factory=dict)  # "missing file" -> 10
    start_timeline: dict | None = None  # pipeline.start_timeline: where the start went
    # host_memory() of every process of the run, at RSS_AT images and at the end
    host_rss: list = field(default_factory=list)
    # how the run fed its engines (sizing.plan_feed): where prompts were rendered, decode
    # workers, batch size, read-ahead window, the tiles it planned for
    feed: dict | None = None

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
            kind = error_kind(error)
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        else:
            self.images += 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_rss_gb"] = peak_rss_gb()
        if not d["total_s"]:  # saved mid-run (after each batch): the time so far
            d["total_s"] = round(time.time() - self.started_at, 3)
        # from this invocation's start (engine start, cache build, resume scan included)
        d["time_to_first_row_s"] = (round(self.first_batch_at - self.started_at, 3)
                                    if self.first_batch_at else None)
        # the last row is durable (a Parquet chunk) before the engines are asked to close
        d["shutdown_s"] = (round(self.closed_at - self.last_batch_at, 3)
                           if self.closed_at and self.last_batch_at else None)
        # the cost figure, from the command's start to its end; saved mid-run (a run killed
        # with -9 keeps it), the time so far
        d["saved_at"] = now = time.time()
        d["wall_s"] = round((self.ended_at or now) - self.started_at, 3)
        d["gpu_hours"] = round(d["wall_s"] * self.gpus / 3600, 6)
        d["images_per_gpu_hour"] = _rate(self.images, d["gpu_hours"])
        return d


_BOOT_WALL: list[float] = []


def _boot_wall() -> float:
    """When the machine booted, as wall-clock time to the microsecond, read once per process.

    /proc/stat's `btime` is whole seconds (a start time off by up to 1 s); CLOCK_BOOTTIME is
    exact but read beside time.time() differs by microseconds from call to call. Read once,
    every start time this process computes shares one reference, so two calls agree."""
    if not _BOOT_WALL:
        _BOOT_WALL.append(time.time() - time.clock_gettime(time.CLOCK_BOOTTIME))
    return _BOOT_WALL[0]


def process_started_at(pid: int | str | None = None) -> float | None:
    """Wall-clock time process `pid` (default: this one) started (Linux /proc, to the clock
    tick), or None where there is no such process or no /proc.

    `run` counts its time to the first row from here, so Python's start and the imports
    before the command's body count too; an engine's timeline records it per process."""
    try:
        ticks = int(_proc_stat(pid or "self")[19])
        started = _boot_wall() + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return started if 0 <= time.time() - started < 10 * 365 * 86400 else None


# "missing file: /x.jpg" -> "missing file"; "aspect ratio 4000x10 exceeds 200:1" -> "aspect
# ratio"; "empty file (0 bytes)" -> "empty file"; "engine: ValueError: ..." -> "engine"
_KIND_END = re.compile(r":\s|\s\d|\s\(")


def error_kind(error: str) -> str:
    return _KIND_END.split(error, 1)[0].strip() or error[:40]


def format_kinds(kinds: dict) -> str:
    """{'missing file': 10, 'corrupt image': 2} -> 'missing file: 10, corrupt image: 2'."""
    return ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))


def count_rows(table, acc: dict | None = None) -> dict:
    """Row, error and token counts of Parquet rows (the sinks schema), added to `acc`.

    The same definitions as RunStats.add_row: a row without error was answered by vLLM and
    its tokens count; an error row counts by its kind."""
    acc = acc or {k: 0 for k in COUNT_KEYS} | {"error_kinds": {}}
    if table is None or table.num_rows == 0:
        return acc
    cols = table.select(["error", "prompt_tokens", "image_tokens", "output_tokens"]).to_pydict()
    kinds = Counter(acc["error_kinds"])
    for i, err in enumerate(cols["error"]):
        acc["rows"] += 1
        if err:
            acc["errors"] += 1
            kinds[error_kind(err)] += 1
            continue
        acc["images"] += 1
        if cols["prompt_tokens"][i] is not None:
            acc["requests"] += 1
            acc["input_tokens"] += cols["prompt_tokens"][i] or 0
            acc["image_tokens"] += cols["image_tokens"][i] or 0
            acc["output_tokens"] += cols["output_tokens"][i] or 0
    acc["error_kinds"] = dict(kinds)
    return acc


def error_rate_exceeded(counts: dict, max_error_rate: float) -> str | None:
    """The end-of-shard rule: more than `max_error_rate` of the shard's rows failed (every row
    failing always exceeds a rate below 1). Returns the message, or None."""
    rows, errors = counts.get("rows") or 0, counts.get("errors") or 0
    if rows and errors / rows > max_error_rate:
        return (f"{errors}/{rows} rows failed, above --max-error-rate {max_error_rate} "
                f"({format_kinds(counts.get('error_kinds') or {})})")
    return None


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 2**20 if sys.platform != "darwin" else kb / 2**30, 3)


# images written at which `run` samples host_memory(): does host memory grow with the run?
RSS_AT = (1_000, 10_000, 100_000)


def host_memory(images: int, end: bool = False, root: int | None = None) -> dict:
    """Resident memory of this process and of every process below it (decode workers,
    replicas, fork servers, vLLM's engine cores), read from Linux's /proc at a moment of the
    run. Per process RSS and PSS; the total is PSS, which splits pages shared between
    processes (a forked engine core shares its imports with its fork server) instead of
    counting them once per process as an RSS sum would."""
    root = os.getpid() if root is None else root
    procs, roles = [], {}
    for pid, ppid in _process_tree(root):  # parents before their children
        roles[pid] = role = _role(pid, root)
        if role == "fork server" and roles.get(ppid) == "fork server":
            # a child of our fork server that neither vLLM nor we named (its cmdline
            # is the server's): what the server forks unnamed is vLLM's engine core
            roles[pid] = role = "vLLM engine core"
        rss, pss, threads = _memory_threads(pid)
        if rss is not None:
            procs.append({"role": role, "pid": pid, "rss_gb": rss, "pss_gb": pss,
                          "threads": threads})
    pss = [p["pss_gb"] for p in procs if p["pss_gb"] is not None]
    return {"images": images, "end": end, "processes": len(procs),
            "total_pss_gb": round(sum(pss), 3) if pss else None,
            "total_rss_gb": round(sum(p["rss_gb"] for p in procs), 3),
            "by_process": sorted(procs, key=lambda p: (p["role"], p["pid"]))}


def _proc_stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after "pid (comm)" (comm may hold spaces and
    parentheses): [state, ppid, ...]."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _process_tree(root: int) -> list[tuple[int, int]]:
    """(pid, parent pid) of `root` and all below it, each parent before its children."""
    parent_of, children = {}, {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if d.isdigit():
            try:
                parent_of[int(d)] = ppid = int(_proc_stat(d)[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append((pid, parent_of.get(pid, 0)))
        todo.extend(children.get(pid, ()))
    return tree


def _memory_threads(pid: int) -> tuple[float | None, float | None, int | None]:
    """(RSS, PSS) in GB and the OS threads (torch's CPU pool among them, once it ran: a
    process's share of the cores shows there); PSS is None where smaps_rollup is missing
    (Linux < 4.14)."""
    gb = 2**20  # the files count kB
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None, None, None  # gone meanwhile
    if "VmRSS" not in fields:  # a zombie
        return None, None, None
    rss = int(fields["VmRSS"].split()[0])
    threads = int(fields["Threads"]) if fields.get("Threads", "").strip().isdigit() else None
    pss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            pss = next((int(line.split()[1]) for line in f if line.startswith("Pss:")), None)
    except OSError:
        pass
    return round(rss / gb, 3), (round(pss / gb, 3) if pss is not None else None), threads


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "main"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return "?"
    # a process forked by our fork server keeps the server's cmdline; ChildProcess names it
    # after its Process in comm. Spawned, vLLM titles its own (VLLM::EngineCore_DP0)
    if comm.startswith(REPLICA_NAME):
        return "replica"
    if "EngineCore" in cmd or "EngineCore" in comm:
        return "vLLM engine core"
    if "VLLM::Worker" in cmd or "VllmWorker" in comm:  # of vLLM's multiprocess executor
        return "vLLM worker"
    if "multiprocessing.forkserver" in cmd:
        return "fork server"
    if "resource_tracker" in cmd:
        return "resource tracker"
    if "multiprocessing.spawn" in cmd:
        return "decode worker"
    return comm or "?"


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
    # the slowest start / stop a user waited for
    for k in ("time_to_first_row_s", "shutdown_s"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = max(vals) if vals else None
    # GPU-hours add up over resumes and over shards (unlike rates): images per GPU-hour of
    # the whole is the total over the total, given only when every hour is known
    for k, nd in (("wall_s", 3), ("gpu_hours", 6)):
        vals = [float(r[k]) for r in runs if r.get(k) is not None]
        out[k] = round(sum(vals), nd) if vals else None
    out["cost_unknown"] = cost_gaps(runs)
    _cost_rate(out)
    kinds = Counter()
    for r in runs:
        kinds.update(r.get("error_kinds") or {})
    out["error_kinds"] = dict(kinds)
    out["host_rss"] = [m for r in runs for m in (r.get("host_rss") or [])]
    return out


def _cost_rate(out: dict) -> None:
    out["images_per_gpu_hour"] = _rate(out["images"], out["gpu_hours"]) \
        if out["gpu_hours"] and not out["cost_unknown"] else None


def _end_lost(r: dict) -> bool:
    """An entry whose run never recorded its end. Entries written before runs recorded one
    (no `ended_at` key) count as ended if they have hours."""
    return bool(r.get("end_lost")) or ("ended_at" in r and r["ended_at"] is None)


def cost_gaps(items: list[dict]) -> str | None:
    """What makes the summed cost of `items` (a shard's runs, or merge's shards) a lower
    bound, in one phrase; None when every hour is known."""
    lost = sum(1 for r in items if _end_lost(r))
    no_hours = sum(1 for r in items if r.get("gpu_hours") is None and not r.get("cost_unknown"))
    shards = [f"{r.get('shard') or 'a shard'}: {r['cost_unknown']}" for r in items
              if r.get("cost_unknown")]
    parts = []
    if lost:
        parts.append(f"{lost} run{'s' if lost > 1 else ''} ended without recording the end "
                     "(killed with -9 or out of memory?), counted up to the last sign of life")
    if no_hours:
        parts.append(f"{no_hours} of {len(items)} entries have no hours recorded")
    if shards:
        more = f" and {len(shards) - 3} more" if len(shards) > 3 else ""
        parts.append("; ".join(shards[:3]) + more)
    return "; ".join(parts) or None


def settle_lost(runs: list[dict], beat: dict | None = None) -> list[dict]:
    """Earlier runs of a shard that never recorded their end (`kill -9`, the OOM killer, a
    node lost), marked `end_lost` and counted up to their last sign of life: their last save,
    or the last heartbeat of the shard lock they held when this run took it over (`beat`:
    {"token", "beat_at"}), which comes every outlock.HEARTBEAT_S even while an engine starts.
    The time after it is unknown, which `cost_gaps` says."""
    out = []
    for r in runs:
        if isinstance(r, dict) and "ended_at" in r and r["ended_at"] is None \
                and not r.get("end_lost"):
            r = dict(r, end_lost=True)
            seen = [r.get("saved_at")]
            if beat and r.get("lock_token") and beat.get("token") == r["lock_token"]:
                seen.append(beat.get("beat_at"))
            seen = [t for t in seen if isinstance(t, (int, float))]
            if seen and isinstance(r.get("started_at"), (int, float)):
                r["last_alive_at"] = max(seen)
                r["wall_s"] = round(max(0.0, max(seen) - r["started_at"]), 3)
                r["gpu_hours"] = round(r["wall_s"] * (r.get("gpus") or 1) / 3600, 6)
        out.append(r)
    return out


def whole_shard(runs: list[dict], counts: dict | None) -> dict:
    """summarize(runs) with counts taken from the shard's rows when known: runs killed before
    their stats were saved, or shards written before stats survived kill -9, still count.
    Rates divide the rows' counts by the recorded generation time. Rows that no run's entry
    accounts for (a lost or cut stats.partial.json) were paid for by runs whose hours are
    gone: the cost is then unknown, not those rows over the surviving runs' hours."""
    out = summarize(runs)
    if counts:
        unaccounted = (counts.get("rows") or 0) - sum(int(r.get("rows") or 0) for r in runs)
        if unaccounted > 0:
            gap = (f"{unaccounted} rows were written by runs whose stats are lost (a "
                   "deleted or cut stats.partial.json)")
            out["cost_unknown"] = "; ".join(filter(None, [out["cost_unknown"], gap]))
        for k in COUNT_KEYS:
            out[k] = counts[k]
        out["error_kinds"] = dict(counts.get("error_kinds") or {})
        out["total_tokens"] = out["input_tokens"] + out["output_tokens"]
        g = out["generate_s"]
        out["images_per_s"] = _rate(out["images"], g)
        out["requests_per_s"] = _rate(out["requests"], g)
        out["output_tokens_per_s"] = _rate(out["output_tokens"], g)
        out["total_tokens_per_s"] = _rate(out["total_tokens"], g)
        _cost_rate(out)
    return out


def batch_span(runs: list[dict]) -> tuple[float, float] | None:
    """(first batch start, last batch end) in wall-clock seconds over runs, or None.

    A run's generation starts at `generate_started_at` (older stats: at its first batch
    written, `first_batch_at`, which leaves out the first batch) and ends at `last_batch_at`."""
    firsts, lasts = [], []
    for r in runs:
        f = r.get("generate_started_at") or r.get("first_batch_at")
        if f is None or r.get("last_batch_at") is None:
            continue
        firsts.append(f)
        lasts.append(r["last_batch_at"])
    return (min(firsts), max(lasts)) if firsts else None


def merge_parallel(shards: list[dict]) -> dict:
    """Shard totals -> one report.

    Two aggregate rates, labelled apart: `*_per_s` is the sum of per-shard rates (what the
    shards would do if they all ran at once, which they may not: an array with fewer GPUs
    than shards runs them in waves), and `wall_*_per_s` divides the totals by the real
    wall-clock span from the first batch of any shard to the last batch of any shard
    (`wall_span_s`), from the `runs` each shard's stats.json records."""
    out = summarize(shards)
    for k in ("images_per_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
        out[k] = round(sum(float(s.get(k) or 0) for s in shards), 3)
    span = batch_span([r for s in shards for r in (s.get("runs") or [])])
    out["wall_span_s"] = round(span[1] - span[0], 3) if span else None
    w = out["wall_span_s"] or 0
    out["wall_images_per_s"] = _rate(out["images"], w) if span else None
    out["wall_output_tokens_per_s"] = _rate(out["output_tokens"], w) if span else None
    return out


def write(path, summary: dict, runs: list[dict], extra: dict | None = None):
    doc = dict(summary)
    doc["runs"] = runs
    if extra:
        doc.update(extra)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=str)
    os.replace(tmp, path)


def _memory_line(samples: list[dict]) -> str:
    """'A GB PSS at 1,000 images, B GB at 10,000 images, C GB at the end (N processes)'."""
    samples = samples[-4:]  # a resumed shard or a merge holds several runs' samples
    if not samples:
        return "-"
    parts = []
    for i, m in enumerate(samples):
        pss = m.get("total_pss_gb")
        gb, kind = (m.get("total_rss_gb"), "RSS") if pss is None else (pss, "PSS")
        at = "the end" if m.get("end") else f"{m.get('images', 0):,} images"
        parts.append(f"{gb:.2f} GB {kind} at {at}" if i == 0 else f"{gb:.2f} GB at {at}")
    return ", ".join(parts) + f" ({samples[-1].get('processes')} processes)"


def _cost_row(summary: dict) -> tuple[str, str]:
    """Images per GPU-hour; on a CPU (no GPU named) per device-hour: the run's wall time
    times the devices it held, from the command's start to its exit."""
    unit = "GPU-hour" if summary.get("gpu_name") else "device-hour"
    hours = summary.get("gpu_hours") or 0
    if summary.get("cost_unknown"):
        return (f"images per {unit}", f"unknown: {summary['cost_unknown']} (at least "
                                      f"{hours:.4g} {unit}s)")
    rate = summary.get("images_per_gpu_hour")
    return (f"images per {unit}", f"{'-' if rate is None else f'{rate:,.2f}'} (over "
                                  f"{hours:.4g} {unit}s, the command's start to its exit)")


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
        ("images/s", f(summary["images_per_s"])),
        _cost_row(summary),
        ("requests/s", f(summary["requests_per_s"])),
        ("output tok/s", f(summary["output_tokens_per_s"])),
        ("total tok/s", f(summary["total_tokens_per_s"])),
        ("load / compile / cudagraph s",
         f"{f(summary['load_s'])} / {f(summary['compile_s'])} / {f(summary['cudagraph_s'])}"),
        ("init / warm-up / generate / total s",
         f"{f(summary['init_s'])} / {f(summary['warmup_s'])} / {f(summary['generate_s'])} / "
         f"{f(summary['total_s'])}"),
        ("peak host RSS", f(summary["peak_rss_gb"], " GB")),
        ("host memory, all processes", _memory_line(summary.get("host_rss") or [])),
        ("device", f(summary["gpu_name"])), ("peak GPU memory", f(summary["gpu_peak_mem_gb"], " GB")),
        ("compile cache", "-" if summary["cache_hit"] is None else
         ("hit" if summary["cache_hit"] else "miss") + f" ({summary['cache_key']})"),
        ("first row after / shutdown s",
         f"{f(summary.get('time_to_first_row_s'))} / {f(summary.get('shutdown_s'))}"),
    ]
    if summary.get("error_kinds"):
        rows.insert(2, ("errors by kind", format_kinds(summary["error_kinds"])))
    if "wall_span_s" in summary:  # merge: say which aggregate is which
        rows[rows.index(("images/s", f(summary["images_per_s"])))] = (
            "images/s (sum of shard rates)", f(summary["images_per_s"]))
        rows.insert(rows.index(("requests/s", f(summary["requests_per_s"]))), (
            "images/s (wall clock)",
            f"{f(summary.get('wall_images_per_s'))} over {f(summary.get('wall_span_s'))} s from "
            "the first batch of any shard to the last"))
    w = max(len(k) for k, _ in rows)
    lines = [title, "-" * (w + 30)] + [f"{k:<{w}}  {v}" for k, v in rows]
    return "\n".join(lines)


class RunRecord:
    """This run's entry in its shard's stats, from the command's start to its exit.

    `begin` saves it before any engine starts (a run that fails to start, or is killed with
    -9 before its first batch, still leaves its start and its lock's token), `publish` writes
    the finished shard's stats.json before the commit that makes the shard complete, and
    `end` is the run's last act: after the final file, the stats and the reaping of its
    processes, it records the end and saves the entry again (stats.json when published, else
    the partial stats). What no entry can count: the interpreter's start before this package
    is imported (~0.03 s) and, after `end`, printing the summary, releasing the lock and the
    process's exit."""

    def __init__(self, writer, st: RunStats, took_over: dict | None = None):
        self.writer, self.st, self.took_over = writer, st, took_over
        self.previous: list[dict] = []
        self.saving = False  # False until the shard's earlier entries are known
        self.published: tuple[dict, dict] | None = None  # (counts, extra) of stats.json
        self.committed = False  # the shard's final file is published: stats.json is ours
        self.summary: dict | None = None
        self.title, self.failure = "", None  # of the summary the run shows after `end`

    def begin(self, save: bool = True) -> None:
        """Read the earlier runs' entries (settling those that never recorded an end) and
        save ours. `save=False` (--overwrite): the old entries go with the old rows, once the
        engines are up (`restart`)."""
        self.previous = settle_lost(self.writer.previous_stats(), self.took_over)
        if save:
            self.saving = True
            self.save()

    def restart(self) -> None:
        """The shard's rows were removed (--overwrite): only this run's entry is left."""
        self.previous, self.saving = [], True
        self.save()

    def runs(self) -> list[dict]:
        return self.previous + [self.st.to_dict()]

    def save(self) -> None:
        self.writer.save_partial_stats(self.runs())

    def publish(self, counts: dict, extra: dict) -> dict:
        """stats.json of the finished shard, ended as of now; `end` moves the end later."""
        self.st.ended_at = time.time()
        self.published = (counts, extra)
        return self._write_final()

    def _write_final(self) -> dict:
        runs = self.runs()
        self.summary = whole_shard(runs, self.published[0])
        write(self.writer.stats_path, self.summary, runs, self.published[1])
        return self.summary

    def end(self) -> None:
        """Record the end, now. A statistic: a failure to save it never changes the run's
        exit (the entry saved before stands)."""
        self.st.ended_at = time.time()
        lock = getattr(self.writer, "lock", None)
        if lock is not None and (lock.lost or not lock.holds()):
            return  # another run owns the shard now: its files are not ours to write
        try:
            if self.committed:
                self._write_final()
            elif self.saving:
                self.save()
        except Exception:
            pass
