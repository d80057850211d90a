"""Image decoding: every bad-image kind becomes a one-line error; odd-but-valid images decode
to sensible RGB; `prefetch` keeps input order. No engine."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from internvl_batch import images
from internvl_batch.images import Decoded, decode, make_pool, prefetch, start_workers
from internvl_batch.sources import Record, SourceSpec, open_source
from tests.helpers import BAD_IMAGES, make_coco


@pytest.fixture(scope="module")
def bad_records(tmp_path_factory):
    images_dir, ann = make_coco(tmp_path_factory.mktemp("imgs") / "coco", 4, bad=True)
    recs = open_source(SourceSpec.parse("coco", data_dir=str(images_dir), annotations=str(ann)))
    return {r.image_ref: r for r in recs}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_images_map(bad_records, name):
    d = decode(bad_records[name])
    assert isinstance(d, Decoded) and d.record is bad_records[name]
    if BAD_IMAGES[name]:
        assert d.image is None
        assert d.error and "\n" not in d.error and d.error == d.error.strip()
    else:
        assert d.error is None, d.error
        assert d.image.mode == "RGB"


def test_bad_image_reasons(bad_records):
    err = {n: decode(bad_records[n]).error for n in BAD_IMAGES if BAD_IMAGES[n]}
    assert err["bad_empty.jpg"] == "empty file (0 bytes)"
    assert err["bad_missing.jpg"] == f"missing file: {bad_records['bad_missing.jpg'].payload}"
    assert err["bad_strip.png"] == "aspect ratio 4000x10 exceeds 200:1"
    assert err["bad_corrupt.jpg"].startswith("not a readable image: cannot identify image file")
    assert err["bad_text.jpg"].startswith("not a readable image: cannot identify image file")
    assert err["bad_truncated.jpg"].startswith("corrupt image: OSError: image file is truncated")


def test_ok_16bit_is_rescaled_not_clipped(bad_records):
    im = decode(bad_records["ok_16bit.png"]).image
    a = np.asarray(im)
    assert im.mode == "RGB" and a.shape == (100, 200, 3)
    assert a.std() > 40  # a full gradient, not a flat white/black frame
    assert a.min() == 0 and a.max() == 255
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()  # grey
    assert a[0, 0, 0] == 0 and a[-1, -1, 0] == 255  # min -> 0, max -> 255


def test_ok_alpha_composited_on_white(bad_records):
    a = np.asarray(decode(bad_records["ok_alpha.png"]).image).astype(int)
    # (255, 0, 0) at alpha 100/255 over white: 255 * (1 - 100/255) = 155 for G and B
    assert a.shape == (200, 300, 3)
    assert (a[..., 0] == 255).all()
    assert (abs(a[..., 1] - 155) <= 1).all() and (abs(a[..., 2] - 155) <= 1).all()


def test_ok_cmyk_palette_1x1_wide(bad_records):
    for name, size in (("ok_cmyk.jpg", (200, 150)), ("ok_palette.gif", (64, 64)),
                       ("ok_1x1.png", (1, 1)), ("ok_wide.png", (1200, 40))):
        im = decode(bad_records[name]).image
        assert im.mode == "RGB" and im.size == size, name
    assert decode(bad_records["ok_1x1.png"]).image.getpixel((0, 0)) == (9, 9, 9)
    assert decode(bad_records["ok_wide.png"]).image.getpixel((5, 5)) == (90, 9, 9)


def test_rgba_transparent_is_white():
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    import io

    buf = io.BytesIO()
    im.save(buf, "PNG")
    out = decode(Record(0, "t", "t", buf.getvalue())).image
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_bytes_and_path_decode_identically(bad_records):
    for name in ("000000000000.jpg", "ok_alpha.png", "ok_16bit.png", "ok_cmyk.jpg"):
        r = bad_records[name]
        with open(r.payload, "rb") as f:
            data = f.read()
        a = decode(r).image
        b = decode(Record(r.seq, r.id, r.image_ref, data)).image
        assert a.size == b.size and a.mode == b.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b)), name


def test_payload_none_and_empty_bytes():
    assert decode(Record(0, "a", "a", None)).error == "no image in this record"
    assert decode(Record(0, "a", "a", b"")).error == "empty image bytes"
    err = decode(Record(0, "a", "a", b"\x89PNG\r\n\x1a\nrubbish")).error
    assert err.startswith("not a readable image: ") and "\n" not in err


def test_max_side_shrinks(bad_records):
    r = bad_records["000000000000.jpg"]
    full = decode(r).image
    small = decode(r, max_side=100).image
    assert max(full.size) == 640 and max(small.size) == 100
    # aspect ratio kept (within rounding)
    assert abs(small.size[0] / small.size[1] - full.size[0] / full.size[1]) < 0.05


def test_too_many_pixels(tmp_path):
    p = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(p)  # 72 Mpx, below Pillow's own bomb warning
    assert decode(Record(0, "h", "h", str(p))).error == \
        f"too large: 9000x8000 pixels (limit {images.MAX_PIXELS})"


def test_decoder_bug_costs_one_row(monkeypatch):
    def boom(payload, max_side=None):
        raise KeyError("x\ny")

    monkeypatch.setattr(images, "load_rgb", boom)
    d = decode(Record(0, "a", "a", b"x"))
    assert d.image is None and d.error.startswith("decode failed: KeyError: ")


# -- prefetch ----------------------------------------------------------------------------------

def _mixed_records(bad_records, n=40) -> list[Record]:
    base = list(bad_records.values())
    return [Record(i, f"r{i}", base[i % len(base)].image_ref, base[i % len(base)].payload)
            for i in range(n)]


def _check(out: list[Decoded], recs: list[Record]):
    assert [d.record.id for d in out] == [r.id for r in recs]
    for d, r in zip(out, recs):
        assert (d.error is not None) == BAD_IMAGES.get(r.image_ref, False), r.image_ref
        assert (d.image is None) == (d.error is not None)


def test_prefetch_inline_preserves_order(bad_records):
    recs = _mixed_records(bad_records)
    _check(list(prefetch(recs, None, window=4, chunk=3)), recs)
    assert make_pool(0) is None and make_pool(-1) is None


def test_prefetch_process_pool_preserves_order(bad_records):
    recs = _mixed_records(bad_records, 45)
    pool = make_pool(2)
    try:
        # window smaller than the input, chunks of uneven fill
        _check(list(prefetch(iter(recs), pool, window=5, chunk=2)), recs)
        _check(list(prefetch(recs, pool, window=512, chunk=16)), recs)
        assert list(prefetch([], pool)) == []
    finally:
        pool.shutdown()


def test_prefetch_window_bounds_reads(bad_records):
    """Records are pulled lazily: at most window + chunk ahead of what was consumed."""
    recs = _mixed_records(bad_records, 60)
    pulled = []

    def source():
        for r in recs:
            pulled.append(r.seq)
            yield r

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        it = prefetch(source(), pool, window=8, chunk=4)
        first = next(it)
        assert first.record.seq == 0
        assert len(pulled) <= 8 + 4
        rest = list(it)
    assert [d.record.seq for d in [first, *rest]] == list(range(60))


def test_start_workers_starts_the_pool_before_the_first_batch(tmp_path):
    """`run` starts the decode processes while the engines start: each submit of an empty
    chunk starts a process (none is idle yet), and decoding afterwards works as before."""
    start_workers(None, 4)  # inline decode: nothing to start
    pool = make_pool(2)
    try:
        start_workers(pool, 2)
        assert len(pool._processes) == 2
        assert list(prefetch([], pool)) == []
    finally:
        pool.shutdown()


def _workers(pool, n: int) -> list[int]:
    start_workers(pool, n)
    deadline = time.time() + 60
    while len(pool._processes or {}) < n and time.time() < deadline:
        time.sleep(0.02)
    return list(pool._processes)


def _ignores(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(mask >> (sig - 1) & 1)


def test_decode_workers_outlive_the_stop_signals_of_the_process_group(bad_records):
    """`timeout`, Slurm and Ctrl-C signal the run's whole process group; the run decides
    when its workers stop. A worker killed while it sent results back left the pool waiting
    forever (CPython 3.11.7: `benchmarks/cpu/pool-kill-hang.py`); now they ignore the signals
    and decode on."""
    recs = _mixed_records(bad_records, 45)
    pool = make_pool(2)
    try:
        pids = _workers(pool, 2)
        deadline = time.time() + 60  # spawned, a worker imports before its initializer runs
        while time.time() < deadline and not all(_ignores(pid, signal.SIGTERM) for pid in pids):
            time.sleep(0.02)
        for pid in pids:
            for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                os.kill(pid, s)
        _check(list(prefetch(recs, pool, window=8, chunk=4)), recs)
        assert [p.exitcode for p in pool._processes.values()] == [None, None]
    finally:
        pool.shutdown()


def test_a_dead_decode_worker_is_one_error_not_a_hang():
    """The OOM killer's SIGKILL cannot be ignored: a future the pool never fails (its
    result pipe holding half a message) or one it fails as broken both end in
    DecodeWorkerDied naming the worker and its signal, within a poll; `stop_pool` then
    stops the other worker (busy for a minute, SIGTERM ignored) at once."""
    from concurrent.futures import Future

    from internvl_batch.images import DecodeWorkerDied, _result, stop_pool

    pool = make_pool(2)
    try:
        fut = pool.submit(time.sleep, 60)
        pids = _workers(pool, 2)
        procs = list(pool._processes.values())
        os.kill(pids[0], signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(DecodeWorkerDied, match=rf"pid {pids[0]}\) killed by SIGKILL"):
            _result(fut, pool, poll_s=0.1)
        with pytest.raises(DecodeWorkerDied, match="killed by SIGKILL"):
            _result(Future(), pool, poll_s=0.1)  # never completed, as in the hang
        stop_pool(pool)
        while time.time() - t0 < 10 and any(p.exitcode is None for p in procs):
            time.sleep(0.05)
        assert [p.exitcode is not None for p in procs] == [True, True]
        assert time.time() - t0 < 5
    finally:
        pool.shutdown(wait=False)


def test_prefetch_on_a_pool_broken_by_a_dead_worker_is_one_error(bad_records):
    """Once the pool has noticed the death itself, its next submit raises BrokenProcessPool:
    prefetch turns that into the same DecodeWorkerDied (2 of 15 SIGKILL tries ended there in
    `benchmarks/cpu/pool-kill-hang.py` before)."""
    from internvl_batch.images import DecodeWorkerDied

    pool = make_pool(1)
    try:
        pid = _workers(pool, 1)[0]
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and not pool._broken:
            time.sleep(0.02)
        assert pool._broken
        with pytest.raises(DecodeWorkerDied, match=rf"pid {pid}\) killed by SIGKILL"):
            list(prefetch(_mixed_records(bad_records, 20), pool, window=8, chunk=4))
    finally:
        pool.shutdown(wait=False)
