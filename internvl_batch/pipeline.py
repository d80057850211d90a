"""The run: source -> decode workers -> prompts -> engine -> Parquet sink -> stats.

Exit codes: 0 shard complete; 2 a user error, another run holds the shard, or its rows were
written with other settings; 3 more than --max-error-rate of the rows failed (stopped early,
or the finished shard as a whole); 4 a process of the run died (the vLLM engine, or a
decode worker); 5 the output could not be written; 75 (EX_TEMPFAIL) stopped early by
SIGUSR1/SIGTERM (Slurm preemption); 130 stopped by SIGINT (Ctrl-C; the shell's convention,
so a wrapper can tell a person's stop from preemption). In every case each finished row is
kept and a rerun resumes; a batch whose engine or decode worker died is never written, so
its images are captioned by the rerun instead of becoming error rows.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

from . import __version__, fingerprint, prompts, stats as stats_mod
from .config import ConfigError, EngineSpec, RunConfig
from .engine import EngineDead, Engines
from .images import (Decoded, DecodeWorkerDied, make_pool, prefetch, start_workers,
                     stop_pool)
from .outlock import ShardLock
from .processes import STOP_SIGNALS, start as process_start
from .progress import Progress
from .sinks import ShardWriter, WriteFailed, Written
from .sources import Records, open_source

if TYPE_CHECKING:
    from .cache import Entry

EXIT_OK, EXIT_ERROR_RATE, EXIT_ENGINE_DIED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 0, 3, 4, 75, 130
EXIT_WRITE_FAILED = 5  # the output could not be written (disk full, permissions)


def _stop_code(signum: int) -> int:
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


@dataclass
class Terminal:
    """Where a run speaks: status lines, the reason it stopped, its final summary, and the
    stream its progress bar draws on. The command line points these at the terminal while
    vLLM's own output goes to a log file (console.py); tests and the bench keep the default."""

    info: Callable[[str], None] = print
    error: Callable[[str], None] | None = None  # default: info
    summary: Callable[[dict, str], None] | None = None  # (summary, table); default: info(table)
    # the progress bar's stream, asked for once the engine's output is redirected; default stderr
    stream: Callable[[], TextIO] | None = None
    quiet: bool = False  # no progress bar
    starting: Callable[[], None] | None = None  # called once the checks pass, before the engine
    # called once the run's work is over (engines closed, rows published or kept), before
    # its end is recorded: the command line stops any process of the run still left here,
    # so that the cost figure covers it
    ending: Callable[[], None] | None = None

    def fail(self, message: str) -> None:
        (self.error or self.info)(message)

    def done(self, summary: dict, table: str) -> None:
        if self.summary is not None:
            self.summary(summary, table)
        else:
            self.info(table)


class Stop(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Signals:
    """Turn SIGUSR1/SIGTERM/SIGINT into a flag checked between batches: finish the batch,
    flush. (On Ctrl-C vLLM's engine-core process, in our process group, stops too; the batch
    in flight is then dropped and captioned by the rerun.)"""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        from . import cache

        cache.request_stop(False)
        for s in STOP_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        from . import cache

        self.received = signum
        cache.request_stop()  # an engine start failing now is the signal's doing

    @property
    def exit_code(self) -> int:
        return _stop_code(self.received)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "none"

    def __exit__(self, *exc):
        from . import cache

        for s, h in self._old.items():
            signal.signal(s, h)
        cache.request_stop(False)


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        return None


# The first batch is small so that the first rows are written (and a user sees the job work)
# a moment after the engines are ready rather than after a whole batch: on H100 one replica
# takes ~3 s for 256 one-tile images (docs/performance.md), under 0.5 s for 32.
FIRST_BATCH = 32


def _batches(items, n, first: int | None = None):
    """Lists of `n` items; the first one of `first` items when given."""
    it = iter(items)
    size = first or n
    while chunk := list(islice(it, size)):
        yield chunk
        size = n


def fit_batches(records, batch_size: int, engines: int):
    """(records, batch size) so that a small input still reaches every engine replica.

    Replicas take whole batches, so 192 images in batches of 256 would all go to one of four
    engines (measured on COCO sizes: 1.26x the plain script instead of ~2x). Looking ahead
    at most `batch_size * engines` records (cheap: images are decoded later) tells whether
    the input is that small; if so it is split evenly. Large inputs keep `batch_size`."""
    if engines <= 1:
        return records, batch_size
    records = iter(records)
    head = list(islice(records, batch_size * engines))
    if len(head) < batch_size * engines:
        batch_size = max(1, -(-len(head) // engines))
    return chain(head, records), batch_size


def _row(d: Decoded, prompt_text: str, tokens_per_tile: int, res=None) -> dict:
    r = d.record
    row = {"id": r.id, "seq": r.seq, "image_ref": r.image_ref, "references": list(r.references),
           "prompt": prompt_text, "caption": None, "prompt_tokens": None, "image_tokens": None,
           "tiles": None, "output_tokens": None, "finish_reason": None, "error": d.error}
    if res is not None:
        row.update(caption=res.text if not res.error else None,
                   prompt_tokens=res.prompt_tokens, image_tokens=res.image_tokens,
                   tiles=res.image_tokens // tokens_per_tile if tokens_per_tile else None,
                   output_tokens=res.output_tokens, finish_reason=res.finish_reason,
                   error=res.error)
    return row


class DatasetChanged(ConfigError):
    """A resumed shard's dataset no longer has, at a position already written, the record
    that was written there (a file added or removed in the middle, an edited annotations
    file): skipping by (seq, id) would caption the shifted records again under new
    positions, and the shard would hold some images twice (exit 2)."""


def not_done(records, done, output: Path):
    """The records whose (seq, id) is not written yet (`done`: {seq: id}, or (seq, id)
    pairs); DatasetChanged at the first position written under another id. Records
    appended after the last one written resume as new."""
    by_seq = done if isinstance(done, dict) else dict(done)
    for r in records:
        was = by_seq.get(r.seq)
        if was is None:
            yield r
        elif was != r.id:
            raise DatasetChanged(
                f"the dataset changed since {output}'s rows were written: record {r.seq} is "
                f"now {r.id!r}, the row written for it is {was!r}; rerun with --overwrite to "
                "caption it again, or write to another --output")


def resume(records: Records, written: Written, shard_index: int, num_shards: int,
           output: Path):
    """The shard's records not written yet. The written prefix (rows are written in seq
    order) is skipped through `Records.split_at`, which lists its ids without building its
    records where the source can, and every id is checked against the row written at its
    position; rows written past the prefix are skipped one by one (`not_done`)."""
    import pyarrow as pa

    k = written.prefix(shard_index, num_shards)
    start = shard_index + k * num_shards  # the first seq of the shard not in the prefix
    ids, rest = records.split_at(start)
    if not isinstance(ids, pa.ChunkedArray):
        ids = pa.chunked_array([pa.array(list(ids), pa.string())])
    step = 65_536  # compared a slice at a time: no copy of a million ids at once
    for lo in range(0, min(k, len(ids)), step):  # a shrunk dataset: what is still there
        theirs = written.ids.slice(lo, min(step, k - lo, len(ids) - lo))
        mine = ids.slice(lo, len(theirs))
        if not mine.equals(theirs):
            j = next(j for j in range(len(theirs)) if mine[j] != theirs[j])
            raise DatasetChanged(
                f"the dataset changed since {output}'s rows were written: record "
                f"{shard_index + (lo + j) * num_shards} is now {mine[j].as_py()!r}, the row "
                f"written for it is {theirs[j].as_py()!r}; rerun with --overwrite to caption "
                "it again, or write to another --output")
    return not_done(rest, written.after(k), output)


class _EarlyStop(Exception):
    """A stop signal before the batches' own handling (`_Signals`) is in place."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _stop_at_once():
    """Until `_Signals` takes over: SIGTERM/SIGUSR1/SIGINT stop the run where it is (listing
    a large folder, waiting for another run's lock with --wait, reading what is written),
    with one line and the exit code of a stop, instead of a traceback or a death by signal
    that a Slurm requeue would not recognise."""
    def handle(signum, frame):
        raise _EarlyStop(signum)

    old = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(cfg: RunConfig, log=print, started=None, term: Terminal | None = None,
        started_at: float | None = None) -> int:
    """Caption one shard. `started` = (Engines, Entry) reuses engines (tests, benchmarks);
    `started_at`: wall clock of the command's start (default: now), which the time to the
    first row and the wall time behind images per GPU-hour count from."""
    term = term or Terminal(info=log)
    try:
        with _stop_at_once():
            return _run_shard(cfg, started, term, started_at or time.time())
    except _EarlyStop as e:
        term.fail(f"stopped by signal {signal.Signals(e.signum).name}; rows written so far "
                  "are kept; rerun to resume")
        return _stop_code(e.signum)


def _run_shard(cfg: RunConfig, started, term: Terminal, started_at: float) -> int:
    log = term.info
    writer = ShardWriter(cfg.output, cfg.shard_index, cfg.num_shards)
    writer.fingerprint = fingerprint.of(cfg)
    if started is None:  # one line now, not after the lock or as a replica's death:
        from .engine import check_device

        check_device(cfg.engine)  # GPU-only settings on CPU
        process_start.method()  # a bad INTERNVL_BATCH_START_METHOD
    if writer.is_complete() and not cfg.overwrite:
        return _complete(cfg, writer, term)
    # raises SourceError before any model is loaded
    records = open_source(cfg.source, cfg.shard_index, cfg.num_shards)
    if started is None:  # a model that cannot fit here: one line before anything is written
        from .engine import maybe_cuda, plan_layout

        plan_layout(cfg.engine, cfg.replicas, cuda=maybe_cuda())
    # one writer per shard, from before reading what is written to the final commit
    with ShardLock(cfg.output, writer.name).acquire(wait=cfg.wait, log=log) as lock:
        writer.lock = lock
        if not cfg.overwrite:  # (--overwrite removes the old rows once the engines are up)
            if writer.is_complete():  # finished by the run we waited for
                return _complete(cfg, writer, term)
            writer.check_settings(writer.fingerprint)  # before any engine starts
        return _run_locked(cfg, writer, records, term, started, started_at)


def _complete(cfg: RunConfig, writer: ShardWriter, term: Terminal) -> int:
    """A finished shard: nothing to do, unless it was made with other settings (exit 2) or
    too many of its rows failed (exit 3, again: a rerun must not turn a failure into 0)."""
    writer.check_settings(writer.fingerprint)
    bad = stats_mod.error_rate_exceeded(writer.final_counts(), cfg.max_error_rate)
    if bad:
        term.fail(f"{writer.final} is complete but {bad}")
        return EXIT_ERROR_RATE
    term.info(f"{writer.final} is complete: nothing to do (delete it to caption again)")
    return EXIT_OK


def _run_locked(cfg: RunConfig, writer: ShardWriter, records, term: Terminal, started,
                started_at: float) -> int:
    # by position and id: a dataset may repeat an id; --overwrite: none of the old rows count
    done = Written() if cfg.overwrite else writer.written()
    # a source that can pass over what is written without reading it does (wds: whole tars)
    records = records.resume(done.seqs)
    mine = resume(records, done, cfg.shard_index, cfg.num_shards, cfg.output)
    n_done = len(done)
    if n_done:
        term.info(f"resuming {writer.name}: {n_done} rows already written")
        del done
        writer.forget_index()  # the index is used: ~22 MB at a million rows, then heap
    # this run's entry in the shard's stats, saved before the engines start (`_run`)
    rec = stats_mod.RunRecord(writer, stats_mod.RunStats(
        started_at=started_at, lock_token=getattr(writer.lock, "token", None)),
        getattr(writer.lock, "took_over", None))
    if term.starting is not None:
        term.starting()
    progress = Progress(records.total, f"caption {writer.name}", initial=n_done,
                        enabled=cfg.progress and not term.quiet,
                        stream=term.stream() if term.stream else None)
    try:
        code = _run_trapped(cfg, writer, mine, progress, term, started, rec)
    finally:
        if term.ending is not None:
            term.ending()
        rec.end()  # last: the cost figure covers the final file, the stats and the reaping
    if rec.committed:  # the shard is complete: its summary, with the time up to its end
        term.done(rec.summary, stats_mod.table(rec.summary, rec.title))
        if rec.failure:
            term.fail(rec.failure)
    return code


def _run_trapped(cfg: RunConfig, writer: ShardWriter, mine, progress: Progress,
                 term: Terminal, started, rec: stats_mod.RunRecord) -> int:
    """_run with its ways of failing turned into exit codes and one line each."""
    # trap preemption from the start: engine start-up alone can take minutes
    with _Signals() as sig:
        try:
            return _run(cfg, writer, mine, progress, sig, term, started, rec)
        except (EngineDead, DecodeWorkerDied) as e:  # a process of the run died
            if sig.received:  # the job's signal reached it too: a stop, not a crash
                term.fail(f"stopped by signal {sig.name}; the batch in flight was dropped, "
                          "rows written so far are kept; rerun to resume")
                return sig.exit_code
            if isinstance(e, EngineDead):
                term.fail(f"the vLLM engine died ({e}); rows written so far are kept; "
                          "rerun to resume")
            else:
                term.fail(f"{e}; rows written so far are kept; rerun to resume (if memory "
                          "ran out: fewer --workers or a smaller --batch-size)")
            return EXIT_ENGINE_DIED
        except WriteFailed as e:
            term.fail(f"{e}; rows committed before are kept; make room (or fix the "
                      "permissions) and rerun to resume")
            return EXIT_WRITE_FAILED
        except Exception:
            if sig.received:  # vLLM's processes got the job's SIGTERM too and died mid-start
                term.fail(f"stopped by signal {sig.name} during start-up; rerun to resume")
                return sig.exit_code
            raise
        finally:
            progress.close()


def _run(cfg: RunConfig, writer: ShardWriter, mine, progress: Progress, sig: "_Signals",
         term: Terminal, started, rec: stats_mod.RunRecord) -> int:
    t_start = time.perf_counter()
    rec.begin(save=not cfg.overwrite)  # before the engines: their start costs too
    progress.phase("starting the engine")
    feed, renderer, replicas = plan_feed(cfg, started, term.info)
    # the decode workers start (spawn, imports; a renderer's vLLM import and config) while
    # the engines do: on H200 the first row came 5.6 s after four warm replicas were ready,
    # with the workers started only then (docs/performance.md)
    pool = make_pool(feed["workers"], renderer)
    start_workers(pool, feed["workers"])
    t_engines = time.time()
    try:
        engine, entry = started or open_engines(cfg.engine, cfg.cache_dir, replicas, term.info)
    except BaseException:
        stop_pool(pool)
        raise
    if sig.received:
        stop_pool(pool)
        if started is None:
            engine.close()
        raise Stop(sig.exit_code, "signal during start-up")
    info = engine.info()
    st, started_at = rec.st, rec.st.started_at
    _engine_stats(st, engine, entry, info)
    st.feed = feed
    t_ready = time.time()
    if started is None:  # engines handed over (tests, bench) did not start in this run
        st.start_timeline = start_timeline(engine, started_at, t_engines, t_ready)
    prompt_text = prompts.render(cfg.prompt)
    metadata = _metadata(cfg, info, entry)

    if cfg.overwrite:
        # only now, with the engines up: a run that fails to start (a wrong --model, a GPU
        # setting on CPU, a signal) leaves the rows it was asked to replace where they were
        removed = writer.clear()
        term.info(f"--overwrite: removed {', '.join(str(p) for p in removed) or 'nothing'}")
        rec.restart()
    writer.open()
    previous = rec.previous
    mine, batch_size = fit_batches(mine, feed["batch_size"], engine.replicas)
    render = (prompt_text, None) if renderer is not None else None
    stream = engine.imap(_requests(mine, pool, batch_size, prompt_text, feed["window"], render),
                         cfg.sampling)
    progress.begin()
    code, message = EXIT_OK, None
    tokens_per_tile = engine.tokens_per_tile
    try:
        _write_batches(cfg, stream, writer, st, previous, progress, sig,
                       lambda d, res: _row(d, prompt_text, tokens_per_tile, res))
    except Stop as s:
        code, message = s.code, str(s)
    finally:
        stream.close()  # batches still at replicas are dropped: a rerun captions them
        progress.close()
        if st.rows:  # every process still up: decode workers, replicas, engine cores
            _sample_memory(st, end=True)
        stop_pool(pool)
        st.gpu_peak_mem_gb = engine.gpu_memory_used_gb()
        # a replica pool serves from its first ready replica; the others joined (or not)
        # since: their starts and cache hits are known only now
        st.cache_hit = entry.hit
        if started is None:
            st.start_timeline = start_timeline(engine, started_at, t_engines, t_ready)
            engine.close()
        # every row is in a durable chunk by now; the stats written below (final or
        # partial) come after the close, so they hold shutdown_s
        st.closed_at = time.time()
        st.generate_s = round(st.generate_s, 3)
        st.total_s = round(time.perf_counter() - t_start, 3)
        if code != EXIT_OK or sys.exc_info()[0] is not None:
            rec.save()  # an engine death too: the next run adds to these
    if code != EXIT_OK:
        term.fail(message)
        return code
    return _finish(cfg, writer, rec, metadata)


def _engine_stats(st: stats_mod.RunStats, engine: Engines, entry: "Entry", info: dict) -> None:
    """How the engine started, into this run's stats."""
    t = engine.timings
    st.init_s = round(t.total_s, 3)
    st.load_s, st.compile_s, st.cudagraph_s = t.load_s, t.compile_s, t.cudagraph_s
    st.warmup_s = round(t.warmup_s, 3)
    st.cache_hit, st.cache_key = entry.hit, entry.key
    st.gpu_name = info["device"] if info["cuda"] else None


def start_timeline(engine: Engines, started_at: float, t_engines: float, t_ready: float) -> dict:
    """How this run started, in seconds from the command's start: until the engines were
    asked for (imports, source, lock, resume scan), until they could serve (a replica pool:
    its first replica), and each ready engine's phases (timeline.py) with `start_offset_s`,
    when that engine began."""
    engines = []
    for e in engine.start_timelines():
        e = dict(e)
        if e.get("started_at"):
            e["start_offset_s"] = round(e["started_at"] - started_at, 3)
        if e.get("process_started_at"):  # a replica's process: its start, before its imports
            e["process_offset_s"] = round(e["process_started_at"] - started_at, 3)
        engines.append(e)
    return {"engines_asked_s": round(t_engines - started_at, 3),
            "engines_ready_s": round(t_ready - started_at, 3), "engines": engines}


def _metadata(cfg: RunConfig, info: dict, entry: "Entry") -> dict:
    """What the finished Parquet file records about how it was made."""
    return {"internvl_batch": __version__, "config": cfg.to_dict(), "versions": info,
            "model_config_hash": entry.fields.get("model_config_hash"),
            "cache_key": entry.key, "git_sha": git_sha(), "argv": sys.argv}


def _requests(records, pool, batch_size: int, prompt_text: str, window: int,
              render: tuple | None = None):
    """(decoded batch, requests of its decodable images): decode runs `window` ahead. With
    `render` the workers have rendered each request already (preprocess.py)."""
    batches = _batches(prefetch(records, pool, window=window, render=render), batch_size,
                       first=min(batch_size, FIRST_BATCH))
    for batch in batches:
        yield batch, [d.request if render else prompts.request(prompt_text, d.image)
                      for d in batch if d.error is None]


def plan_feed(cfg: RunConfig, started, log) -> tuple[dict, tuple | None, int | None]:
    """(feed plan, renderer arguments for the decode workers or None, engine count or None
    for one engine here): where prompts are rendered (`--preprocess`), how many decode
    workers, the batch size and read-ahead window, from the device, the CPUs, the engines
    and the largest image the model tiles (sizing.plan_feed)."""
    from . import preprocess, sizing
    from .cache import CompileCache, hf_home_default
    from .engine import has_cuda

    cuda = has_cuda()
    cache = CompileCache(cfg.cache_dir)
    spec = cache.resolve(cfg.engine)
    if started is not None:
        replicas = n = started[0].replicas
    else:
        replicas = auto_replica_count(spec, cache, cuda, log, cfg.replicas)
        n = replicas
    mode = preprocess.choose(cfg.preprocess, spec, cuda) if cfg.workers != 0 else "engine"
    tiles, side = sizing.max_tiles(spec.model, spec.max_dynamic_patch)
    feed = sizing.plan_feed(render_in_workers=mode == "workers", replicas=n,
                            cpus=sizing.usable_cpus(), workers=cfg.workers,
                            batch_size=cfg.batch_size, tiles=tiles, side=side)
    renderer = (preprocess.renderer_kwargs(spec, cuda), hf_home_default(cache.root)) \
        if mode == "workers" else None
    if cuda or mode == "workers":
        log(f"feed: prompts rendered in the {feed['preprocess']}, {feed['workers']} decode "
            f"worker(s), batches of {feed['batch_size']} (up to {tiles} tiles per image)")
    return feed, renderer, replicas


def _write_batches(cfg: RunConfig, stream, writer: ShardWriter, st: stats_mod.RunStats,
                   previous: list[dict], progress, sig: "_Signals", make_row) -> None:
    """Write each batch's rows as it comes back; Stop on the error-rate rule or a signal."""
    t0 = time.perf_counter()  # waiting on decode or on engines counts as generation
    st.generate_started_at = time.time()
    rss_at = list(stats_mod.RSS_AT)
    for batch, results in stream:
        results = iter(results)
        rows = []
        for d in batch:
            res = next(results) if d.error is None else None
            rows.append(make_row(d, res))
            st.add_row(error=rows[-1]["error"], answered=res is not None and not res.error,
                       prompt_tokens=res.prompt_tokens if res else 0,
                       image_tokens=res.image_tokens if res else 0,
                       output_tokens=res.output_tokens if res else 0)
        writer.write(rows)
        if rss_at and st.images >= rss_at[0]:  # a few ms, at 1k, 10k and 100k images
            _sample_memory(st)
            rss_at = [n for n in rss_at if n > st.images]
        st.generate_s += time.perf_counter() - t0
        st.last_batch_at = time.time()
        st.first_batch_at = st.first_batch_at or st.last_batch_at
        writer.save_partial_stats(previous + [st.to_dict()])  # survives kill -9
        t0 = time.perf_counter()
        progress.update(len(rows), err=st.errors)
        _check_stop(cfg, st, writer, sig)


def _sample_memory(st: stats_mod.RunStats, end: bool = False) -> None:
    """A statistic only: it must never stop a run (nor hide the error that ends one)."""
    try:
        st.host_rss.append(stats_mod.host_memory(st.images, end=end))
    except Exception:
        pass


def _check_stop(cfg: RunConfig, st: stats_mod.RunStats, writer: ShardWriter,
                sig: "_Signals") -> None:
    if st.rows >= cfg.min_rows_for_error_rate and st.errors / st.rows > cfg.max_error_rate:
        raise Stop(EXIT_ERROR_RATE,
                   f"stopped: {st.errors}/{st.rows} rows failed, above "
                   f"--max-error-rate {cfg.max_error_rate} "
                   f"({stats_mod.format_kinds(st.error_kinds)}); see the error column "
                   f"in {writer.parts} (rows written so far are kept)")
    if sig.received:
        raise Stop(sig.exit_code,
                   f"stopped by signal {sig.name} after {st.rows} rows; rerun the same "
                   "command to resume")


def _finish(cfg: RunConfig, writer: ShardWriter, rec: stats_mod.RunRecord,
            metadata: dict) -> int:
    """Final Parquet file, then stats.json, then the rename that makes the shard complete;
    exit 3 if too many of the whole shard's rows failed (the rows are kept: the shard is
    done). The summary is shown by the caller, once the run's end is recorded."""
    total_rows = writer.finalize(metadata)
    try:
        rec.publish(writer.counts, {"shard": writer.name, "rows_in_shard": total_rows,
                                    "complete": True, "metadata": metadata,
                                    "start_timeline": rec.st.start_timeline})
    except OSError as e:
        writer.abandon()
        raise WriteFailed(f"cannot write {writer.stats_path}: {e.strerror or e}") from e
    writer.commit()
    rec.committed = True
    rec.title = f"internvl-batch {writer.name}: {total_rows} rows -> {writer.final}"
    bad = stats_mod.error_rate_exceeded(writer.counts, cfg.max_error_rate)
    if bad:
        rec.failure = f"failed: {bad}; see the error column in {writer.final}"
        return EXIT_ERROR_RATE
    return EXIT_OK


def auto_replica_count(spec: EngineSpec, cache, cuda: bool, log,
                       replicas: int | None = None) -> int:
    """The engine count from the model's and the devices' sizes (`--replicas auto`), or
    `replicas`; ConfigError (one line, before any engine starts) where the model cannot fit
    or its parallel sizes cannot work here (engine.plan_layout)."""
    from .engine import plan_layout

    layout = plan_layout(cache.resolve(spec), replicas, cuda=cuda)
    if replicas is None and (cuda or spec.gpus_per_engine > 1):  # on CPU: one engine
        log(f"--replicas auto: {layout.why}")
    return layout.engines


def open_engines(spec: EngineSpec, cache_dir, replicas: int | None,
                 log) -> "tuple[Engines, Entry]":
    """(engine, cache entry) for `spec`: `replicas` engine processes when > 1, else one engine
    here; None picks the count from the model's and the device's sizes."""
    from .cache import CompileCache

    cache = CompileCache(cache_dir)
    n = replicas
    if n is None:
        from .engine import has_cuda

        n = auto_replica_count(spec, cache, has_cuda(), log)
    if n > 1:
        from .replicas import ReplicaPool

        pool = ReplicaPool(spec, cache_dir, n, log).start()
        return pool, pool.entry
    return cache.start_engine(spec, log=log)


