"""Reading WebDataset tars: this tool's reader (stdlib tarfile, random access) against the
`webdataset` package's (the version img2dataset installs), on the same tars, page cache warm.

    python benchmarks/wds_read.py [--samples 2000] [--tars 3] [--repeat 3] [--dir /tmp/wdsbench]

Builds `--tars` tars of `--samples` samples each (the package's sample photos as KEY.jpg,
with KEY.txt and KEY.json, as img2dataset lays them out), then times, best of `--repeat`:
a full read (image bytes and captions of every sample), counting the samples (the progress
bar's total when no img2dataset stats file is beside a tar), and a resume that passes over
the first 95 % of one tar. Prints one line per measurement.
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
    import webdataset as wds

    n = nbytes = 0
    for k, s in enumerate(wds.WebDataset(paths, shardshuffle=False)):
        if skip_first and k % (len_per := _per(paths)) < skip_first:
            continue  # it has to read them all the same: it cannot skip a member's data
        n += 1
        nbytes += len(s["jpg"])
        _ = s["txt"].decode(), json.loads(s["json"])
    return n, nbytes


def _per(paths):
    return int(os.environ["WDS_BENCH_PER"])


def best(fn, *a, repeat: int):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*a)
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--tars", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/wdsbench")
    a = ap.parse_args()
    paths = build(Path(a.dir), a.tars, a.samples)
    os.environ["WDS_BENCH_PER"] = str(a.samples)
    mb = sum(os.path.getsize(p) for p in paths) / 1e6
    total = a.tars * a.samples
    print(f"{a.tars} tars x {a.samples} samples, {mb:.0f} MB")
    skip = int(a.samples * 0.95)
    for what, fn, args in (
            ("full read, ours (tarfile, random access)", ours, (paths,)),
            ("full read, webdataset", theirs, (paths,)),
            ("count samples, ours (headers only)", ours_count, (paths,)),
            ("resume past 95 % of each tar, ours", ours, (paths, skip)),
            ("resume past 95 % of each tar, webdataset (reads all)", theirs, (paths, skip))):
        s, (n, _) = best(fn, *args, repeat=a.repeat)
        print(f"{what}: {s:.3f} s for {n} samples ({total / s:,.0f} samples/s of the tars, "
              f"{mb / s:,.0f} MB/s)")


if __name__ == "__main__":
    main()
