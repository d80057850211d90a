"""WebDataset test data: tars written by img2dataset itself (downloading the package's sample
photos from a local HTTP server bound to 127.0.0.1), and hand-broken tars."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from internvl_batch.sources import sample_dir

PER_TAR = 6  # img2dataset --number_sample_per_shard: 17 photos + one dead link -> 3 tars


def photo_captions() -> dict[str, str]:
    """file name -> its first reference caption (the img2dataset caption column)."""
    lines = (sample_dir() / "captions.jsonl").read_text().splitlines()
    return {d["file"]: d["captions"][0] for d in map(json.loads, filter(str.strip, lines))}


def img2dataset_tars(root: Path) -> Path:
    """`root/tars/{00000..00002}.tar` (+ NNNNN.parquet, NNNNN_stats.json) as img2dataset writes
    them for a URL list of the sample photos and one URL that answers 404."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
         "--directory", str(sample_dir())],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        # "Serving HTTP on 127.0.0.1 port 41235 (http://127.0.0.1:41235/) ..."
        port = int(server.stdout.readline().split(" port ")[1].split()[0])
        caps = photo_captions()
        urls = [f"http://127.0.0.1:{port}/{name}" for name in caps] + \
            [f"http://127.0.0.1:{port}/no-such-photo.jpg"]
        pq.write_table(pa.table({"url": urls, "caption": [*caps.values(), "a dead link"]}),
                       root / "urls.parquet")
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")  # it asks PyPI otherwise
        subprocess.run(
            [sys.executable, "-c", "from img2dataset import main; main()",
             "--url_list", str(root / "urls.parquet"), "--input_format", "parquet",
             "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
             "--output_folder", str(root / "tars"), "--processes_count", "1",
             "--thread_count", "2", "--number_sample_per_shard", str(PER_TAR),
             "--resize_mode", "no", "--enable_wandb", "False",
             "--distributor", "multiprocessing"],
            check=True, timeout=300, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
    finally:
        server.terminate()
        server.wait(10)
    return root / "tars"


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def jpeg(color=(200, 30, 30), size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def png(color=(30, 30, 200)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "PNG")
    return buf.getvalue()


def cut_offsets(path: Path, sample: int) -> dict[str, int]:
    """Byte offsets at which to cut `path` (3 members a sample): at the start of sample
    `sample`'s first header ("boundary"), inside that header ("header"), and inside the data
    of its first member ("data")."""
    with tarfile.open(path) as tf:
        members = [m for m in tf if m.isreg()]
    first = members[3 * sample]
    return {"boundary": first.offset, "header": first.offset + 100,
            "data": first.offset_data + 10}


def cut(src: Path, dst: Path, at: int) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes()[:at])
    return dst


def mixed_members() -> list[tuple[str, bytes]]:
    """A tar with one of each bad sample among good ones (see test_wds.MIXED)."""
    meta = json.dumps({"caption": "from the json", "key": "k"}).encode()
    return [("a.jpg", jpeg()), ("a.txt", b"a red square"),                  # 0 fine
            ("b.jpg", b"this is not an image\n"), ("b.txt", b"text"),      # 1 not an image
            ("c.txt", b"no picture here"), ("c.json", meta),               # 2 no image
            ("a.jpg", jpeg((0, 0, 0))),                                     # 3 duplicate key
            ("d.png", png()), ("d.json", meta),                            # 4 png, json caption
            ("README", b"not a sample"), ("e.jpg", jpeg((0, 90, 0)))]      # 5 fine