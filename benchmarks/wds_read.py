"""Reading WebDataset tars: this tool's reader (stdlib tarfile, random access) against the
`webdataset` package's (the version img2dataset installs), on the same tars, page cache warm.

    python benchmarks/wds_read.py [--samples 2000] [--tars 3] [--repeat 5] [--dir /tmp/wdsbench]

Builds `--tars` tars of `--samples` samples each (the package's sample photos as KEY.jpg,
with KEY.txt and KEY.json, as img2dataset lays them out), then times, best and median of
`--repeat` rounds with the cases interleaved: a full read (image bytes and captions of every
sample), counting the samples (the progress bar's total when no img2dataset stats file is
beside a tar), and a resume that passes over the first 95 % of each tar. One line a case.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from pathlib import Path


def build(folder: Path, tars: int, samples: int) -> list[str]:
    from internvl_batch.sources import sample_dir

    photos = sorted(p for p in sample_dir().iterdir() if p.suffix == ".jpg")
    blobs = [p.read_bytes() for p in photos]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in range(tars):
        path = folder / f"{t:05d}.tar"
        paths.append(str(path))
        if path.is_file():
            continue
        with tarfile.open(path, "w") as tf:
            for i in range(samples):
                key = f"{t:05d}{i:04d}"
                caption = f"caption of sample {key}".encode()
                meta = json.dumps({"key": key, "caption": caption.decode()}).encode()
                for suffix, data in (("jpg", blobs[i % len(blobs)]), ("txt", caption),
                                     ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return paths


def ours(paths, skip_first: int = 0):
    from internvl_batch.sources import Tar, tar_samples

    n = nbytes = 0
    for i, p in enumerate(paths):
        skip = set(range(skip_first)) if skip_first else frozenset()
        for r in tar_samples(Tar(i, p, os.path.getsize(p)), skip):
            if r is not None:
                n += 1
                nbytes += len(r.payload)
    return n, nbytes


def ours_count(paths):
    from internvl_batch.sources import Tar, _header_count

    return sum(_header_count(Tar(i, p, os.path.getsize(p))) for i, p in enumerate(paths)), 0


def theirs(paths, skip_first: int = 0):
    """webdataset's reader; it cannot pass over a member without reading it, so a resume
    reads the samples it skips."""
    import webdataset as wds

    n = nbytes = pos = 0
    url = None
    for s in wds.WebDataset(paths, shardshuffle=False):
        pos = pos + 1 if s["__url__"] == url else 0
        url = s["__url__"]
        if pos < skip_first:
            continue
        n += 1
        nbytes += len(s["jpg"])
        _ = s["txt"].decode(), json.loads(s["json"])
    return n, nbytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--tars", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/wdsbench")
    a = ap.parse_args()
    paths = build(Path(a.dir), a.tars, a.samples)
    mb = sum(os.path.getsize(p) for p in paths) / 1e6
    total = a.tars * a.samples
    print(f"{a.tars} tars x {a.samples} samples, {mb:.0f} MB; best and median of {a.repeat}, "
          "the measurements interleaved")
    skip = int(a.samples * 0.95)
    cases = (("full read, ours (tarfile, random access)", ours, (paths,)),
             ("full read, webdataset", theirs, (paths,)),
             ("count samples, ours (headers only)", ours_count, (paths,)),
             ("resume past 95 % of each tar, ours", ours, (paths, skip)),
             ("resume past 95 % of each tar, webdataset (reads all)", theirs, (paths, skip)))
    times: dict[str, list[float]] = {what: [] for what, _, _ in cases}
    yielded = {}
    for _ in range(a.repeat):  # interleaved: load from other work hits every case alike
        for what, fn, args in cases:
            t = time.perf_counter()
            yielded[what] = fn(*args)[0]
            times[what].append(time.perf_counter() - t)
    for what, ts in times.items():
        ts.sort()
        print(f"{what}: {ts[0]:.3f} s best, {ts[len(ts) // 2]:.3f} s median, "
              f"{yielded[what]} samples yielded ({total / ts[0]:,.0f} samples/s of the tars)")


if __name__ == "__main__":
    main()
