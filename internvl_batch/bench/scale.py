"""What the pipeline costs around the engine, at a million records: the host's feed rate,
resume, merge, memory and bytes per row, with the engine replaced by an instant captioner.

    python -m internvl_batch.bench.scale --work /tmp/scale --records 1000000 \
        --out results/cpu-2core/pipeline-scale

Every measured run is the library's own `pipeline.run` in a process of its own, watched
from here (peak RSS of each of its processes from /proc, CPU time from the kernel's
accounting of the process and the children it waited for):

* **feed**: COCO-size JPEGs (`synthdata.make_coco`) through decode workers, the one-tile
  preprocessing an engine does before its GPU work (resize to 448x448, normalise), Parquet
  and stats: images/s on this host, and images per CPU-second of all its processes, which
  is the feed rate one core gives.
* **resume**: tiny images (a 32 px JPEG; no tiling) so that a million rows take minutes: a
  run stopped after 10k, then after 1M rows written, and each resumed; the resumed run's
  time to its first new row is how long it took to find its place.
* **memory**: the peak RSS of every process of those runs, at 10k and at 1M rows.
* **merge**: the 1M rows split into 1,000 shards (written by the library's ShardWriter and
  stats, not by 1,000 runs), then `internvl-batch merge` (and `--compact`) as a user runs it.

`InstantCaptioner` exists for this benchmark only: it answers every request at once with
words drawn from a small vocabulary (not a model's text: real captions compress less).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .instant import Watch, measure

EXTRA = 2_048  # records past the stop: what the resumed run captions


# -- datasets ----------------------------------------------------------------------------

def tiny_parquet(path: Path, n: int) -> Path:
    """`n` records in one Parquet file: a 32 px JPEG (one of 16), a key, a caption. The
    images repeat, so the file stays small (dictionary encoding); every record is still
    read, decoded and written as its own row."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    if path.is_file() and pq.read_metadata(path).num_rows == n:
        return path
    jpegs = []
    for i in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (16 * i, 255 - 16 * i, 128)).save(buf, "JPEG", quality=85)
        jpegs.append(buf.getvalue())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    step = 8_192  # rows per row group: the reader holds one or two at a time
    with pq.ParquetWriter(tmp, pa.schema([("image", pa.binary()), ("key", pa.string()),
                                          ("caption", pa.string())])) as w:
        for lo in range(0, n, step):
            ids = range(lo, min(n, lo + step))
            w.write_table(pa.table({"image": [jpegs[i % 16] for i in ids],
                                    "key": [f"{i:09d}" for i in ids],
                                    "caption": [f"a small square, number {i}" for i in ids]}),
                          row_group_size=step)
    os.replace(tmp, path)
    return path


def coco_subset(root: Path, n: int) -> tuple[Path, Path]:
    from ..synthdata import make_coco

    ann = root / "annotations" / "captions_synth.json"
    if ann.is_file() and len(json.loads(ann.read_text())["images"]) == n:
        return root / "images", ann
    return make_coco(root, n, seed=0)


def run_stats(output: Path) -> dict:
    """The shard's stats: stats.json once finished, else the partial entries' last."""
    final = output / "part-00000-of-00001.stats.json"
    if final.is_file():
        return json.loads(final.read_text())
    partial = output / "_parts" / "part-00000-of-00001" / "stats.partial.json"
    return json.loads(partial.read_text())["runs"][-1]


def _roles(procs: list[dict]) -> dict:
    """{role: {"processes", "peak_rss_gb" (the largest of that role), "cpu_s" (summed)}}."""
    out: dict[str, dict] = {}
    for p in procs:
        r = out.setdefault(p["role"], {"processes": 0, "peak_rss_gb": 0.0, "cpu_s": 0.0})
        r["processes"] += 1
        r["peak_rss_gb"] = max(r["peak_rss_gb"], p["peak_rss_gb"])
        r["cpu_s"] = round(r["cpu_s"] + p["cpu_s"], 2)
    return out


def _base(src: Path, out: Path, workers: int, limit: int | None = None) -> dict:
    return {"dataset": f"parquet:{src}", "output": str(out), "tile": False, "workers": workers,
            "batch_size": 256, "source": {"id_column": "key", "caption_column": "caption",
                                          "limit": limit}}


def feed(work: Path, n: int, workers: int, log) -> dict:
    """Images per second and per CPU-second at one tile, COCO-size JPEGs. The CPU of a run
    of 64 images (process starts, imports) is taken off, so per image is the marginal cost."""
    images, ann = coco_subset(work / "coco", n)
    runs = {}
    for label, limit in (("start", min(64, n // 2)), ("all", None)):
        out = work / f"feed-{label}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = {"dataset": "coco", "output": str(out), "tile": True, "workers": workers,
               "batch_size": 256, "source": {"data_dir": str(images), "annotations": str(ann),
                                             "limit": limit}}
        runs[label] = dict(measure(cfg, work, f"feed-{label}"), stats=run_stats(out))
        log(f"feed {label}: {runs[label]['wall_s']} s, {runs[label]['cpu_s']} CPU-s")
    a, b = runs["all"], runs["start"]
    per_image = (a["cpu_s"] - b["cpu_s"]) / (a["stats"]["images"] - b["stats"]["images"])
    if per_image <= 0:  # the start-up's own variation exceeded the images' cost
        raise SystemExit(f"feed: {n} images are too few to tell their CPU from start-up's "
                         "(the marginal cost came out <= 0); pass more --coco images")
    st = a["stats"]
    return {"images": st["images"], "errors": st["errors"], "workers": workers,
            "wall_s": a["wall_s"], "generate_s": st["generate_s"],
            "images_per_s": round(st["images"] / st["generate_s"], 1),
            "cpu_s": a["cpu_s"], "cpu_s_first_64": b["cpu_s"],
            "cpu_ms_per_image": round(per_image * 1000, 3),
            "images_per_core_s": round(1 / per_image, 1),
            "by_role": _roles(a["processes"]),
            "bytes_per_row": _bytes_per_row(work / "feed-all")}


def _bytes_per_row(out: Path) -> float:
    import pyarrow.parquet as pq

    final = out / "part-00000-of-00001.parquet"
    return round(final.stat().st_size / pq.read_metadata(final).num_rows, 1)


def stop_and_resume(work: Path, src: Path, n: int, workers: int, log) -> dict:
    """A run of the first n + EXTRA records of `src` stopped once `n` rows are written (the
    batch in flight finishes), then resumed: the resumed run captions the rest and
    publishes all of them. Every case reads the same file (--limit), so that the source's
    row groups, which the reader holds one at a time, are the same size in each."""
    from ..sinks import ShardWriter

    out = work / f"out-{n}"
    shutil.rmtree(out, ignore_errors=True)
    base = _base(src, out, workers, limit=n + EXTRA)
    first = measure(dict(base, stop_after=n), work, f"first-{n}")
    entry = run_stats(out)
    log(f"{n:,}: stopped (exit {first['code']}) after {entry['rows']:,} rows, {first['wall_s']} s")
    t0 = time.perf_counter()
    keys = len(ShardWriter(out, 0, 1).written())  # what the resume reads first
    index_s = time.perf_counter() - t0
    again = measure(base, work, f"resume-{n}")
    st = run_stats(out)
    resumed = st["runs"][-1]
    log(f"{n:,}: resumed (exit {again['code']}): first new row after "
        f"{resumed['time_to_first_row_s']} s, {again['wall_s']} s in all")
    samples = [[m["images"], sum(q["rss_gb"] for q in m["by_process"] if q["role"] == "main")]
               for m in entry.get("host_rss") or []]
    return {"rows_written": entry["rows"], "rows_in_shard": st["rows_in_shard"],
            "main_rss_gb_during": samples,
            "stopped": {"code": first["code"], "wall_s": first["wall_s"],
                        "cpu_s": first["cpu_s"],
                        "rows_per_s": round(entry["rows"] / entry["generate_s"], 1),
                        "by_role": _roles(first["processes"])},
            "resumed": {"code": again["code"], "wall_s": again["wall_s"],
                        "cpu_s": again["cpu_s"],
                        "time_to_first_row_s": resumed["time_to_first_row_s"],
                        "finalize_and_exit_s": round(resumed["ended_at"]
                                                     - resumed["last_batch_at"], 3),
                        "by_role": _roles(again["processes"])},
            "index_s": round(index_s, 3), "index_rows": keys,
            "bytes_per_row": _bytes_per_row(out)}


def split_shards(final: Path, dest: Path, shards: int) -> int:
    """The rows of one finished shard as `shards` finished shards (seq % shards), written
    by the library's ShardWriter, each with a stats.json made by stats.whole_shard from one
    entry holding its share of the run's time. Returns the rows written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .. import stats as stats_mod
    from ..sinks import ShardWriter, read_metadata

    shutil.rmtree(dest, ignore_errors=True)
    t = pq.read_table(final)
    md = read_metadata(final)
    whole = json.loads(final.with_name(final.name.replace(".parquet", ".stats.json"))
                       .read_text())
    seq = t.column("seq").to_numpy()
    order = np.argsort(seq % shards, kind="stable")
    sizes = np.bincount(seq % shards, minlength=shards)
    t = t.take(pa.array(order))
    total = 0
    for i in range(shards):
        part = t.slice(total, int(sizes[i]))
        w = ShardWriter(dest, i, shards)
        w.fingerprint = md.get("fingerprint")
        w.open().write(part.to_pylist())
        n = w.finalize({k: v for k, v in md.items() if k != "fingerprint"})
        share = n / max(1, t.num_rows)
        run = {k: whole[k] * share for k in ("wall_s", "gpu_hours", "generate_s")}
        runs = [dict(run, rows=n, images=w.counts["images"], ended_at=whole["runs"][-1][
            "ended_at"])]
        stats_mod.write(w.stats_path, stats_mod.whole_shard(runs, w.counts), runs,
                        {"shard": w.name, "rows_in_shard": n, "complete": True,
                         "metadata": md})
        w.commit()
        total += n
    return total


def merge_cost(out: Path, compact: Path | None = None) -> dict:
    """`internvl-batch merge OUT` as a user runs it: seconds and peak RSS."""
    args = [sys.executable, "-m", "internvl_batch", "merge", str(out)]
    if compact is not None:
        compact.unlink(missing_ok=True)
        args += ["--compact", str(compact)]
    t0 = time.time()
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # VmHWM from /proc, not the kernel's ru_maxrss: that one starts from this process's
    # size at the fork and survives the exec
    watch = Watch(p.pid, every_s=0.05)
    err = p.stderr.read()
    status = p.wait()
    seconds = time.time() - t0
    procs = watch.stop()
    if status != 0:
        raise RuntimeError(f"merge failed ({status}): {err[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_gb": max(q["peak_rss_gb"] for q in procs)}


def merge_case(work: Path, final: Path, shards: int, log) -> dict:
    dest = work / f"merge-{shards}"
    t0 = time.perf_counter()
    rows = split_shards(final, dest, shards)
    log(f"{shards} shards of {rows:,} rows written in {time.perf_counter() - t0:.0f} s")
    plain = merge_cost(dest)
    log(f"merge: {plain}")
    compact = merge_cost(dest, work / f"merge-{shards}.parquet")
    log(f"merge --compact: {compact}")
    return {"shards": shards, "rows": rows, "merge": plain, "merge_compact": compact}


def run_all(work: Path, *, records: int, small: int, coco: int, shards: int, workers: int,
            log=print) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    fed = feed(work, coco, workers, log)
    src = tiny_parquet(work / f"tiny-{records + EXTRA}.parquet", records + EXTRA)
    few = stop_and_resume(work, src, small, workers, log)
    many = stop_and_resume(work, src, records, workers, log)
    merged = merge_case(work, work / f"out-{records}" / "part-00000-of-00001.parquet", shards,
                        log)
    doc = {"feed": fed, "resume_small": few, "resume_large": many, "merge": merged}
    doc["table"] = table(doc)
    return doc


H100_IMAGES_PER_S = 380  # per GPU, measured end to end (docs/performance.md)


def table(doc: dict) -> dict:
    """The figures the issue asks for, flat: what the smoke test checks and README shows."""
    fed, few, many, merged = doc["feed"], doc["resume_small"], doc["resume_large"], doc["merge"]
    node = 8 * H100_IMAGES_PER_S

    def peaks(case: dict, key: str) -> dict:
        return {role: r["peak_rss_gb"] for role, r in case[key]["by_role"].items()}

    out = {
        "feed_images_per_s": fed["images_per_s"],
        "feed_workers": fed["workers"],
        "feed_cpu_ms_per_image": fed["cpu_ms_per_image"],
        "feed_images_per_core_s": fed["images_per_core_s"],
        "cores_for_8_h100": round(node / fed["images_per_core_s"], 1),
        "resume_rows_small": few["rows_written"],
        "resume_rows_large": many["rows_written"],
        "resume_first_row_s_small": few["resumed"]["time_to_first_row_s"],
        "resume_first_row_s_large": many["resumed"]["time_to_first_row_s"],
        "index_s_small": few["index_s"],
        "index_s_large": many["index_s"],
        "rows_per_s_large": many["stopped"]["rows_per_s"],
        "finalize_s_large": many["resumed"]["finalize_and_exit_s"],
        "merge_shards": merged["shards"],
        "merge_rows": merged["rows"],
        "merge_s": merged["merge"]["seconds"],
        "merge_peak_rss_gb": merged["merge"]["peak_rss_gb"],
        "merge_compact_s": merged["merge_compact"]["seconds"],
        "merge_compact_peak_rss_gb": merged["merge_compact"]["peak_rss_gb"],
        "peak_rss_gb_small": peaks(few, "stopped"),
        "peak_rss_gb_large": peaks(many, "stopped"),
        "peak_rss_gb_resume_small": peaks(few, "resumed"),
        "peak_rss_gb_resume_large": peaks(many, "resumed"),
        "bytes_per_row_tiny": many["bytes_per_row"],
        "bytes_per_row_coco": fed["bytes_per_row"],
    }
    main_small, main_large = out["peak_rss_gb_small"]["main"], out["peak_rss_gb_large"]["main"]
    out["main_rss_growth_pct"] = round(100 * (main_large / main_small - 1), 1)
    # the run's own samples (stats.host_memory at 1k, 10k, 100k images and at the end)
    out["main_rss_gb_during_large"] = many["main_rss_gb_during"]
    return out


def write(dest: Path, doc: dict) -> None:
    """scale.json (everything) and README.md (the table, the command, what it means)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "scale.json").write_text(json.dumps(doc, indent=2) + "\n")
    (dest / "README.md").write_text(readme(doc))


def readme(doc: dict) -> str:
    t = doc["table"]

    def rss(key: str) -> str:
        return ", ".join(f"{role} {gb:.3f}" for role, gb in sorted(t[key].items()))

    rows = [
        ("host feed, one tile (decode + 448 px tile + Parquet + stats)",
         f"{t['feed_images_per_s']:,} images/s on {doc['host']['cpus']} cores "
         f"({t['feed_workers']} decode workers)"),
        ("CPU per image, all processes (marginal)", f"{t['feed_cpu_ms_per_image']} ms"),
        ("feed per CPU core", f"{t['feed_images_per_core_s']:,} images/s"),
        (f"cores to feed 8 H100 at {H100_IMAGES_PER_S} images/s each",
         f"{t['cores_for_8_h100']}"),
        (f"resume: first new row, {t['resume_rows_small']:,} rows written",
         f"{t['resume_first_row_s_small']} s (reading the written keys: "
         f"{t['index_s_small']} s)"),
        (f"resume: first new row, {t['resume_rows_large']:,} rows written",
         f"{t['resume_first_row_s_large']} s (reading the written keys: "
         f"{t['index_s_large']} s)"),
        ("pipeline rows/s, tiny images, no tiling", f"{t['rows_per_s_large']:,}"),
        (f"finalize {t['resume_rows_large'] + EXTRA:,} rows + stats + exit",
         f"{t['finalize_s_large']} s"),
        (f"merge, {t['merge_shards']:,} shards, {t['merge_rows']:,} rows",
         f"{t['merge_s']} s, {t['merge_peak_rss_gb']} GB peak RSS"),
        ("merge --compact (one Parquet file of all rows)",
         f"{t['merge_compact_s']} s, {t['merge_compact_peak_rss_gb']} GB peak RSS"),
        (f"peak RSS (GB) per process, {t['resume_rows_small']:,} rows", rss("peak_rss_gb_small")),
        (f"peak RSS (GB) per process, {t['resume_rows_large']:,} rows", rss("peak_rss_gb_large")),
        ("main process growth, 10k -> 1M rows", f"{t['main_rss_growth_pct']} %"),
        ("main process RSS during the 1M run (images: GB)",
         ", ".join(f"{n:,}: {gb:.3f}" for n, gb in t["main_rss_gb_during_large"])),
        (f"peak RSS (GB), resume + finalize, {t['resume_rows_small']:,} rows",
         rss("peak_rss_gb_resume_small")),
        (f"peak RSS (GB), resume + finalize, {t['resume_rows_large']:,} rows",
         rss("peak_rss_gb_resume_large")),
        ("output bytes per row: tiny set / COCO-size set",
         f"{t['bytes_per_row_tiny']} / {t['bytes_per_row_coco']}"),
    ]
    lines = ["# The pipeline at a million records, engine aside", "",
             "Measured by `internvl_batch/bench/scale.py` with the engine replaced by its "
             "instant captioner (no model: every request answered at once with 8-14 words "
             "from a 30-word vocabulary). Figures are one run each on a shared machine.", "",
             "```", doc["command"], "```", "", "| what | measured |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines + ["", NOTES, ""])


NOTES = """What each figure is:

- **Feed**: COCO-size synthetic JPEGs (`synthdata.make_coco`, mostly 640x480) through the
  decode workers, then in the main process the one-tile preprocessing an engine does before
  its GPU work (resize to 448x448, normalise to float32: a stand-in for vLLM's InternVL
  processor, which also tokenises and schedules: the real engine's host work is more),
  Parquet chunks and stats. CPU per image is all processes' CPU (the kernel's accounting)
  less that of a 64-image run (process starts, imports), over the images between them.
- **Resume**: a run stopped by SIGUSR1 once the rows were written, then the same command
  again. "First new row" is the resumed run's `time_to_first_row_s`: open the source, take
  the lock, read the written (seq, id) keys, skip the records already written, caption and
  write the first batch. The 1M rows use a tiny set (a 32 px JPEG, repeated, one Parquet
  file in row groups of 8,192) so they take minutes: no tiling there, so its rows/s is the
  pipeline's per-row cost (source, decode, Parquet, stats), not a feed rate. Both cases read
  the same file (`--limit`).
- **Merge**: the 1M-row shard split into 1,000 finished shards by the library's ShardWriter
  (stats.json per shard from stats.whole_shard), then `python -m internvl_batch merge` in a
  process of its own.
- **Peak RSS**: VmHWM of every process, polled from /proc (every 0.2 s; 0.05 s for merge).
  The main process of the feed holds the decode window of decoded images: at COCO sizes
  that is most of its memory (`scale.json`, `feed.by_role`)."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m internvl_batch.bench.scale",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="scratch folder (datasets, outputs)")
    ap.add_argument("--records", type=int, default=1_000_000,
                    help="rows written before the large resume (and merged)")
    ap.add_argument("--small", type=int, default=10_000,
                    help="rows written before the small resume")
    ap.add_argument("--coco", type=int, default=2_000, help="COCO-size JPEGs for the feed")
    ap.add_argument("--shards", type=int, default=1_000, help="shards merged")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="decode workers (default: one per core)")
    ap.add_argument("--out", default=None, help="folder for scale.json and README.md")
    a = ap.parse_args(argv)
    doc = run_all(Path(a.work), records=a.records, small=a.small, coco=a.coco,
                  shards=a.shards, workers=a.workers, log=lambda m: print(m, flush=True))
    doc["command"] = "python -m internvl_batch.bench.scale " + " ".join(argv)
    doc["host"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                   "machine": platform.machine(),
                   "self_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                             / 2**20, 3)}
    if a.out:
        write(Path(a.out), doc)
    print(json.dumps(doc["table"], indent=2))


if __name__ == "__main__":
    main()
