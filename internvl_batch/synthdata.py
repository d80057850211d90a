"""Generated COCO-format datasets: benchmarks and tests need many images and no downloads.

Sizes follow COCO's mix (most images 640 px on the long side, landscape and portrait), so the
tiler sees realistic aspect ratios, not only 448x448 squares. Content is smooth gradients
plus shapes and a little noise: JPEGs of a realistic size, cheap to generate, deterministic
for a seed.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# (width, height, weight): COCO 2017's commonest sizes, roughly in proportion
COCO_SIZES = [(640, 480, 40), (480, 640, 12), (640, 427, 15), (427, 640, 6), (500, 375, 6),
              (640, 640, 5), (612, 612, 4), (640, 360, 6), (375, 500, 3), (800, 600, 3)]
SQUARE_448 = [(448, 448, 1)]
WORDS = ("a man woman dog cat bus train plate of food on the street table in a room "
         "near large small red blue green white black sitting standing two people").split()


def _image(seed: int, w: int, h: int):
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 1, (3, 3))
    img = np.stack([(c[i, 0] * x / w + c[i, 1] * y / h + c[i, 2]) * 127 for i in range(3)], -1)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype("uint8")
    im = Image.fromarray(img, "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
    return im


def _write_one(args):
    i, w, h, path, seed = args
    _image(seed * 1_000_003 + i, w, h).save(path, "JPEG", quality=85)


def make_coco(out: str | os.PathLike, n: int, *, seed: int = 0, sizes=None,
              workers: int | None = None) -> tuple[Path, Path]:
    """Write n JPEGs and a COCO captions file. Returns (images_dir, annotations_path)."""
    import numpy as np

    out = Path(out)
    images_dir, ann_dir = out / "images", out / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    sizes = sizes or COCO_SIZES
    rng = np.random.default_rng(seed)
    weights = np.array([s[2] for s in sizes], dtype=float)
    picks = rng.choice(len(sizes), size=n, p=weights / weights.sum())
    jobs, images, annotations = [], [], []
    for i in range(n):
        w, h, _ = sizes[picks[i]]
        name = f"{i:012d}.jpg"
        jobs.append((i, w, h, str(images_dir / name), seed))
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for k in range(2):
            words = rng.choice(WORDS, size=8)
            annotations.append({"id": 2 * i + k, "image_id": i, "caption": " ".join(words)})
    workers = workers if workers is not None else min(16, os.cpu_count() or 1)
    if workers > 1 and n > 64:
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_write_one, jobs, chunksize=32))
    else:
        for j in jobs:
            _write_one(j)
    ann = ann_dir / "captions_synth.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations}))
    return images_dir, ann
