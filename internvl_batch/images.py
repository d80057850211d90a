"""Image decoding and validation, run ahead of the engine in worker processes.

vLLM's `LLM.generate` does its own multimodal preprocessing serially in the calling process,
so anything we leave undone (file I/O, JPEG decode, colour conversion) also runs serially
there and the GPU waits. Decoding here, in a pool, in order, with a bounded window of work in
flight, keeps the engine fed and memory flat.

Every failure becomes an `ImageError` with a one-line reason that lands in the row's `error`
column; a bad image never stops the run.
"""
from __future__ import annotations

import io
import os
import signal
import time
import warnings
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterable, Iterator

from .processes import STOP_SIGNALS, lifeline
from .sources import Record

# A 16-bit TIFF or a 10k x 10k PNG decodes to hundreds of MB; past this it is not a caption
# job but a decompression bomb.
MAX_PIXELS = 64_000_000
# vLLM's tiler handles any aspect, but a 1:1000 strip has no content worth a caption and
# blows up the tile search; reject beyond this.
MAX_ASPECT = 200.0


class ImageError(Exception):
    pass


class DecodeWorkerDied(RuntimeError):
    """A decode worker process died (killed: out of host memory, a signal); its images and
    those queued behind them will not come back from this pool."""


@dataclass
class Decoded:
    record: Record
    image: object | None  # PIL.Image.Image in RGB, or None on error (or once rendered)
    error: str | None = None
    # the engine's input rendered by vLLM in the worker (preprocess.Processed), when the
    # workers render prompts; the image itself is then not sent back
    request: object | None = None


def load_rgb(payload: bytes | str | None, max_side: int | None = None):
    """Decode an image reference to an RGB PIL image, or raise ImageError(reason)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if payload is None:
        raise ImageError("no image in this record")
    if isinstance(payload, str):
        if not os.path.exists(payload):
            raise ImageError(f"missing file: {payload}")
        if os.path.getsize(payload) == 0:
            raise ImageError("empty file (0 bytes)")
        src = payload
    else:
        if len(payload) == 0:
            raise ImageError("empty image bytes")
        src = io.BytesIO(payload)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"too large: {w}x{h} pixels (limit {MAX_PIXELS})")
                if max(w, h) / max(1, min(w, h)) > MAX_ASPECT:
                    raise ImageError(f"aspect ratio {w}x{h} exceeds {MAX_ASPECT:.0f}:1")
                if max_side and max(w, h) > max_side:
                    # draft() lets libjpeg decode at 1/2, 1/4, 1/8 scale: far cheaper than
                    # decoding full size and resizing afterwards
                    im.draft("RGB", (max_side, max_side))
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ImageError(f"not a readable image: {str(e).splitlines()[0][:200]}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # truncated JPEG/PNG surface as OSError("image file is truncated") and friends
        raise ImageError(f"corrupt image: {type(e).__name__}: {str(e)[:200]}") from None
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.BICUBIC)
    return rgb


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/float greyscale: convert("RGB") would clip to white; rescale to 8 bits
        import numpy as np

        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.astype("uint8"), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # composite on white: black-background alpha makes dark captions ("a black image")
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB") if im.mode != "RGB" else im.copy()


def decode(record: Record, max_side: int | None = None) -> Decoded:
    if record.error is not None:  # the source knows already (a tar cut short, no image)
        return Decoded(record, None, record.error)
    try:
        return Decoded(record, load_rgb(record.payload, max_side))
    except ImageError as e:
        return Decoded(record, None, str(e))
    except Exception as e:  # a decoder bug must cost one row, not the run
        return Decoded(record, None, f"decode failed: {type(e).__name__}: {str(e)[:200]}")


def _decode_many(records: list[Record], max_side: int | None,
                 render: tuple | None = None) -> list[Decoded]:
    """Decode `records`; with `render` = (prompt text, mm_processor_kwargs) also render each
    decodable image into the engine's input with vLLM's renderer (preprocess.py)."""
    out = [decode(r, max_side) for r in records]
    if render is not None and out:
        renderer = _renderer()
        for d in out:
            if d.error is None:
                _render(renderer, d, *render)
    return out


class RendererFailed(RuntimeError):
    """A decode worker could not build vLLM's renderer: no row of the run can be rendered,
    so the run stops (exit 4) instead of failing every row."""


def _renderer():
    from . import preprocess

    try:
        return preprocess.worker_renderer()
    except Exception as e:
        raise RendererFailed(f"a decode worker could not set up vLLM's renderer: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                             ) from None


def _render(renderer, d: Decoded, prompt_text: str, mm_kwargs: dict | None) -> None:
    from . import prompts

    try:
        d.request = renderer.process(prompts.request(prompt_text, d.image, mm_kwargs))
    except Exception as e:  # e.g. a prompt longer than max_model_len: this row fails
        d.error = f"preprocess: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    d.image = None


def make_pool(workers: int, renderer: tuple[dict, dict] | None = None) -> Executor | None:
    """Processes sidestep the GIL for decode; 0 means decode inline (debugging, tiny runs).
    `renderer` = (LLM keyword arguments, environment): the workers also render prompts with
    vLLM (preprocess.py)."""
    if workers <= 0:
        return None
    import multiprocessing as mp

    # fork would copy a process that may already hold CUDA/vLLM state; spawn is clean
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_start_worker,
                               initargs=(lifeline.token(), renderer))


def _start_worker(parent: lifeline.Parent, renderer: tuple[dict, dict] | None) -> None:
    """A decode worker ignores the stop signals (below) and leaves when `parent`, the
    process that made the pool, is gone: the pool's queues would otherwise keep it waiting
    for work forever after a `kill -9` of the run. The lifeline comes before the renderer,
    whose vLLM import takes seconds a dead parent should not wait for."""
    _ignore_stop_signals()
    lifeline.watch(parent)
    if renderer is not None:
        from . import preprocess

        preprocess.init_worker(*renderer)


# Stopping is the run's decision (pipeline._Signals: finish the batch, flush, exit 75/130),
# but `timeout`, Slurm and Ctrl-C signal the whole process group, decode workers included.
# A worker killed while it sends its decoded images back leaves half a message in the
# pool's result pipe, and CPython's ProcessPoolExecutor (3.11.7 here) then waits for the
# rest forever: no future fails, and the run hung after SIGTERM (on CI). Measured with
# `benchmarks/cpu/pool-kill-hang.py` (a 2-worker pool signalled mid-stream): 6 and 11 of 15
# tries hung in two runs; with the signals ignored, 0 of 15, results kept coming
# (docs/performance.md). So the workers ignore the stop signals; the run stops them when it
# stops the pool.
def _ignore_stop_signals() -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _workers(pool: Executor) -> list:
    """The pool's worker processes (`_processes`: ProcessPoolExecutor's own table of them,
    3.8 to 3.13; None once the pool has shut down)."""
    return list((getattr(pool, "_processes", None) or {}).values())


def _dead(procs: list) -> list:
    """The processes of `procs` that have ended badly (a nonzero exit or a signal)."""
    return [p for p in procs if p.exitcode not in (None, 0)]


def _dead_worker(pool: Executor, expect: bool = False) -> str | None:
    """How a worker of `pool` ended, if one has, else None.

    A SIGTERM death is named last: the workers ignore SIGTERM, so it comes from the pool
    itself, which terminates the other workers once one died (CPython's broken-pool
    teardown; a worker still in its initializer does not ignore it yet), not the cause.
    Exit statuses lag (the pool's thread reaps a worker while we look, and multiprocessing
    then answers None for a moment), so while only SIGTERM deaths show, or none although
    the pool said one died (`expect`: BrokenProcessPool), it looks again, for up to 0.5 s
    (1 s when expected)."""
    deadline = time.monotonic() + (1.0 if expect else 0.5)
    while True:
        dead = _dead(_workers(pool))
        if (any(p.exitcode != -signal.SIGTERM for p in dead) or (not dead and not expect)
                or time.monotonic() >= deadline):
            break
        time.sleep(0.05)
    for proc in sorted(dead, key=lambda p: p.exitcode == -signal.SIGTERM):
        code = proc.exitcode
        if code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
            if code == -signal.SIGKILL:
                how += " (out of host memory?)"
        else:
            how = f"exited with code {code}"
        return f"a decode worker (pid {proc.pid}) {how}"
    return None


def _result(future: Future, pool: Executor, poll_s: float = 1.0) -> list:
    """`future.result()`, but a dead worker is an error rather than a wait that never ends
    (the pool does not always notice: see `_ignore_stop_signals`; the OOM killer's SIGKILL is
    not ignorable)."""
    while True:
        try:
            return future.result(timeout=poll_s)
        except FutureTimeout:
            dead = _dead_worker(pool)
            if dead:
                raise DecodeWorkerDied(dead) from None
        except BrokenProcessPool:
            raise _broken(pool) from None
        except RendererFailed as e:
            raise DecodeWorkerDied(str(e)) from None


def _broken(pool: Executor) -> DecodeWorkerDied:
    """The error for a pool that noticed a dead worker itself (BrokenProcessPool, from a
    result or from the next submit); the worker's exit status comes a moment later."""
    return DecodeWorkerDied(_dead_worker(pool, expect=True) or "a decode worker died")


def start_workers(pool: Executor | None, workers: int) -> None:
    """Have the pool start its processes now (each imports this package and PIL, on spawn)
    rather than at the first real batch: `run` calls it before the engines start, so the
    workers are up when the first images are wanted. Nothing is waited for."""
    if pool is None:
        return
    for _ in range(workers):  # a submit starts a process while none is idle yet
        pool.submit(_warm_worker)


def _warm_worker() -> None:
    """A worker's first task: build its renderer now (vLLM import, config), while the
    engines start, if it renders prompts."""
    from . import preprocess

    if preprocess._worker_args is not None:
        try:
            preprocess.worker_renderer()
        except Exception:  # said once, by the first batch that needs it (RendererFailed)
            pass


def stop_pool(pool: Executor | None) -> None:
    """Stop the decode workers without waiting for them (they leave once they have read the
    pool's stop); in a pool with a dead worker, kill the others: they may wait forever on a
    queue lock the dead one held, and the pool's own stop would wait with them."""
    if pool is None:
        return
    procs = _workers(pool)
    pool.shutdown(wait=False, cancel_futures=True)
    if _dead(procs):
        for p in procs:
            if p.exitcode is None:
                p.kill()


def prefetch(records: Iterable[Record], pool: Executor | None, *, window: int = 512,
             chunk: int = 16, max_side: int | None = None,
             render: tuple | None = None) -> Iterator[Decoded]:
    """Decode `records` in `pool`, yielding in input order with at most `window` in flight;
    `render`: see `_decode_many`."""
    if pool is None:
        for r in records:
            yield from _decode_many([r], max_side, render)
        return
    pending: deque[Future] = deque()
    in_flight = 0
    buf: list[Record] = []
    it = iter(records)
    exhausted = False
    while True:
        while not exhausted and in_flight < window:
            try:
                buf.append(next(it))
            except StopIteration:
                exhausted = True
            if buf and (len(buf) >= chunk or exhausted):
                try:
                    pending.append(pool.submit(_decode_many, buf, max_side, render))
                except BrokenProcessPool:
                    raise _broken(pool) from None
                in_flight += len(buf)
                buf = []
        if not pending:
            return
        done = _result(pending.popleft(), pool)
        in_flight -= len(done)
        yield from done

