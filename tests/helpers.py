"""Test data: COCO-format sets with every kind of bad image a real crawl contains."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

from internvl_batch.synthdata import make_coco as _make_coco

# file name -> True if the row must carry an error, False if it must caption fine
BAD_IMAGES = {
    "bad_corrupt.jpg": True,      # random bytes
    "bad_truncated.jpg": True,    # first 40 % of a real JPEG
    "bad_empty.jpg": True,        # 0 bytes
    "bad_missing.jpg": True,      # listed in the annotations, absent on disk
    "bad_text.jpg": True,         # a text file with an image extension
    "bad_strip.png": True,        # 4000x10: beyond the aspect-ratio limit
    "ok_cmyk.jpg": False,
    "ok_16bit.png": False,
    "ok_alpha.png": False,
    "ok_1x1.png": False,
    "ok_wide.png": False,         # 1200x40 (30:1): unusual but valid
    "ok_palette.gif": False,
}


def _write_bad(images_dir: Path):
    import numpy as np
    from PIL import Image

    good = io.BytesIO()
    Image.new("RGB", (320, 240), (10, 200, 30)).save(good, "JPEG")
    rng = np.random.default_rng(0)
    (images_dir / "bad_corrupt.jpg").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    data = good.getvalue()
    (images_dir / "bad_truncated.jpg").write_bytes(data[: int(len(data) * 0.4)])
    (images_dir / "bad_empty.jpg").write_bytes(b"")
    (images_dir / "bad_text.jpg").write_text("this is not an image\n")
    Image.new("RGB", (4000, 10), (1, 2, 3)).save(images_dir / "bad_strip.png")
    Image.new("CMYK", (200, 150), (0, 128, 255, 0)).save(images_dir / "ok_cmyk.jpg")
    arr16 = (np.arange(200 * 100, dtype=np.uint16).reshape(100, 200) * 3)
    Image.fromarray(arr16).save(images_dir / "ok_16bit.png")  # uint16 -> "I;16" (Pillow 13 rejects an explicit mode)
    Image.new("RGBA", (300, 200), (255, 0, 0, 100)).save(images_dir / "ok_alpha.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(images_dir / "ok_1x1.png")
    Image.new("RGB", (1200, 40), (90, 9, 9)).save(images_dir / "ok_wide.png")
    Image.new("P", (64, 64), 3).save(images_dir / "ok_palette.gif")


def make_coco(root, n: int, bad: bool = False, seed: int = 0):
    """(images_dir, annotations_path): n generated images, plus BAD_IMAGES if bad."""
    images_dir, ann = _make_coco(root, n, seed=seed, workers=0)
    if bad:
        _write_bad(images_dir)
        doc = json.loads(ann.read_text())
        for k, name in enumerate(BAD_IMAGES):
            iid = 100000 + k
            doc["images"].append({"id": iid, "file_name": name})
            doc["annotations"].append({"id": 900000 + k, "image_id": iid, "caption": name})
        ann.write_text(json.dumps(doc))
    return images_dir, ann


def hold_lock(path: str, ready, release) -> None:
    """Another process's flock on `path` (a compile-cache builder) until `release` is set."""
    import fcntl
    import os

    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    ready.set()
    release.wait(300)
    os.close(fd)


# -- process trees, read from /proc ------------------------------------------------------------

def proc_name(pid: int) -> str | None:
    """The process's name (comm), or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    comm, rest = stat.split("(", 1)[1].rsplit(")", 1)
    return None if rest.split()[0] in ("Z", "X") else comm


def descendants(root: int) -> dict[int, str]:
    """{pid: name} of the living processes below `root` (by parent pid, in /proc)."""
    kids: dict[int, list[int]] = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = {}, list(kids.get(root, ()))
    while todo:
        pid = todo.pop()
        name = proc_name(pid)
        if name is not None:
            out[pid] = name
        todo.extend(kids.get(pid, ()))
    return out


def still_alive(pids, within_s: float) -> dict[int, str]:
    """{pid: name} of `pids` still running after up to `within_s` seconds."""
    import time

    deadline = time.monotonic() + within_s
    while True:
        left = {pid: n for pid in pids if (n := proc_name(pid)) is not None}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)
