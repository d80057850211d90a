"""`show`: the HTML gallery, checked in a real headless Chromium (DOM and screenshot), on a
merged multi-shard output, on Parquet-sourced images, on a 100k-row output, and on a real
sample run."""
from __future__ import annotations

import io
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from internvl_batch.cli import cli
from internvl_batch.gallery import GalleryOptions, build, choose, error_kind
from internvl_batch.outputs import open_output
from tests.conftest import needs_vllm
from tests.output_helpers import metadata, row, write_output

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    pytest.skip("chromium is not installed (apt-get install chromium; scripts/test.sh does "
                "as root on Debian)")


def _browser(*args, timeout=120) -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium refuses to run as root with its sandbox (CI runs as root)
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", "--user-data-dir=" + str(_profile()), *args]
    p = subprocess.run(cmd, capture_output=True, timeout=timeout)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-2000:]
    return p


def _profile() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="ivb-chromium-"))


def dump_dom(page: Path) -> str:
    """The DOM as the browser built it (parsed, styled, after any script)."""
    return _browser("--dump-dom", page.resolve().as_uri()).stdout.decode()


def screenshot(page: Path, png: Path, size=(1280, 1000)) -> Path:
    _browser(f"--screenshot={png}", f"--window-size={size[0]},{size[1]}",
             page.resolve().as_uri())
    return png


class Dom(HTMLParser):
    """Cards, group headings, images and scripts of a gallery page."""

    def __init__(self, text: str):
        super().__init__()
        self.cards: list[dict] = []
        self.groups: list[dict] = []
        self.imgs: list[str] = []
        self.scripts = 0
        self._cur: dict | None = None
        self._grab: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "article" and "card" in cls:
            self._cur = {"seq": int(a["data-seq"]), "id": a["data-id"], "error": "error" in cls,
                         "caption": "", "msg": "", "img": None, "ph": ""}
            self.cards.append(self._cur)
        elif tag == "h2" and "group" in cls:
            self.groups.append({"kind": a.get("data-kind"), "id": a.get("id"), "text": ""})
            self._grab = "group"
        elif tag == "img":
            self.imgs.append(a.get("src", ""))
            if self._cur is not None:
                self._cur["img"] = a.get("src")
        elif tag == "script":
            self.scripts += 1
        elif tag == "p" and "cap" in cls:
            self._grab = "caption"
        elif tag == "p" and "msg" in cls:
            self._grab = "msg"
        elif tag == "div" and "ph" in cls:
            self._grab = "ph"

    def handle_endtag(self, tag):
        if tag in ("p", "h2", "div"):
            self._grab = None

    def handle_data(self, data):
        if self._grab == "group":
            self.groups[-1]["text"] += data
        elif self._grab and self._cur is not None:
            self._cur[self._grab] += data


def _images(folder: Path, names: list[str]):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(names):
        Image.new("RGB", (640, 480), (40 * k % 256, 120, 200 - 30 * k % 200)).save(folder / n)


# -- unit ------------------------------------------------------------------------------------

def test_error_kind_groups_by_reason():
    assert error_kind("missing file: /data/a/1.jpg") == "missing file"
    assert error_kind("aspect ratio 4000x10 exceeds 200:1") == "aspect ratio NxN exceeds N:N"
    assert error_kind("empty file (0 bytes)") == "empty file (N bytes)"
    assert error_kind("engine: ValueError: prompt too long") == "engine"


def test_choose_is_deterministic_and_keeps_errors():
    errors = [None] * 1000
    for i in range(0, 1000, 100):
        errors[i] = "missing file: x"
    errors[7] = "corrupt image: y"
    opts = GalleryOptions(sample=50, seed=3, max_errors=5)
    ok, err = choose(errors, opts)
    assert ok == choose(errors, opts)[0] and len(ok) == 50 and ok == sorted(ok)
    assert all(errors[i] is None for i in ok)
    assert ok != choose(errors, GalleryOptions(sample=50, seed=4))[0]
    # the cap keeps the rarest kind: the one corrupt image is never crowded out
    assert len(err) == 5 and 7 in err
    ok_all, err_all = choose(errors, GalleryOptions(sample=None, max_errors=100))
    assert len(ok_all) == 989 and len(err_all) == 11


# -- in the browser ----------------------------------------------------------------------------

@pytest.fixture
def merged(tmp_path):
    """A 2-shard merged output: 10 captioned rows (one whose image is gone), 3 error rows of
    two kinds, and a caption that tries to inject markup."""
    imgs = tmp_path / "imgs"
    _images(imgs, [f"{i}.jpg" for i in range(10) if i != 4])
    rows = [row(i, f"{i}.jpg", caption=f"caption number {i}",
                references=[f"reference {i}a", f"reference {i}b"]) for i in range(10)]
    rows[3]["caption"] = '<script>alert("x")</script> & <b>bold</b>'
    rows[5]["references"] = ["</li><img src=x onerror=alert(1)>"]
    rows += [row(10, "10.jpg", error="missing file: /gone/10.jpg"),
             row(11, "11.jpg", error="missing file: /gone/11.jpg"),
             row(12, "12.jpg", error="corrupt image: OSError: image file is truncated")]
    return write_output(tmp_path / "out", rows, metadata({"target": str(imgs)}, num_shards=2),
                        shards=2)


def test_gallery_in_browser(merged, tmp_path):
    out = open_output(merged)
    assert len(out.files) == 2
    pages = build(out, tmp_path / "g" / "gallery.html", GalleryOptions(page_size=8))
    assert [p.name for p in pages] == ["gallery.html", "gallery-p2.html"]

    doms = [Dom(dump_dom(p)) for p in pages]
    cards = [c for d in doms for c in d.cards]
    assert len(doms[0].cards) == 8 and len(doms[1].cards) == 5
    # captioned rows first in seq order (across both shards), then errors grouped by kind
    assert [c["seq"] for c in cards[:10]] == list(range(10))
    assert [c["seq"] for c in cards[10:]] == [10, 11, 12]
    assert [c["error"] for c in cards] == [False] * 10 + [True] * 3
    groups = doms[1].groups
    assert [(g["kind"], g["text"].split("(")[-1]) for g in groups] == \
        [("missing file", "2 rows)"), ("corrupt image", "1 rows)")]
    assert "missing file: /gone/10.jpg" in cards[10]["msg"]
    # escaping: the injected markup is text, never elements
    assert all(d.scripts == 0 for d in doms)
    assert cards[3]["caption"] == '<script>alert("x")</script> & <b>bold</b>'
    assert not any(src == "x" for d in doms for src in d.imgs)
    # thumbnails for every present image; a placeholder saying why for the missing one
    assert all(c["img"].startswith("data:image/jpeg;base64,") for c in cards[:10] if c["seq"] != 4)
    assert cards[4]["img"] is None and "missing file" in cards[4]["ph"]
    html = pages[0].read_text()
    assert "Errors by kind" in html and 'href="gallery-p2.html#err-1"' in html

    png = screenshot(pages[0], tmp_path / "shot.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1280, 1000)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # something was drawn: text and thumbnails, not a blank page


def test_parquet_source_images_found_by_seq(tmp_path):
    """Images stored as bytes in the source Parquet files: found again by the row's seq
    (its position across the source glob), not by image_ref."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def jpeg(color):
        b = io.BytesIO()
        Image.new("RGB", (300, 200), color).save(b, "JPEG")
        return b.getvalue()

    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"image": [jpeg((255, 0, 0)), jpeg((0, 255, 0))]}), src / "a.parquet")
    pq.write_table(pa.table({"image": [None, jpeg((0, 0, 255))]}), src / "b.parquet")
    rows = [row(i, f"x.parquet[{i}]") for i in range(4)]
    out = write_output(tmp_path / "out", rows,
                       metadata({"kind": "parquet", "target": str(src / "*.parquet")}))
    page = build(open_output(out), None, GalleryOptions())[0]
    assert page == out / "gallery.html"
    dom = Dom(page.read_text())
    assert [c["img"] is not None for c in dom.cards] == [True, True, False, True]
    assert "no image in the row" in dom.cards[2]["ph"]
    # the colours prove the right rows were taken: red, green, -, blue
    from PIL import Image as I

    import base64
    rgb = [I.open(io.BytesIO(base64.b64decode(c["img"].split(",", 1)[1]))).getpixel((5, 5))
           for c in dom.cards if c["img"]]
    assert [max(range(3), key=lambda k: p[k]) for p in rgb] == [0, 1, 2]


def test_coco_and_hf_sources_find_their_images(tmp_path):
    """coco: file names under the image directory found as the source finds it (here from
    coco:DIR alone); hf: the seq-th row of a save_to_disk() dataset."""
    import datasets
    from PIL import Image

    from tests.helpers import make_coco

    images_dir, ann = make_coco(tmp_path / "coco", 3)
    names = sorted(p.name for p in images_dir.glob("*.jpg"))
    rows = [row(i, n) for i, n in enumerate(names)] + [row(3, "absent.jpg")]
    out = write_output(tmp_path / "o1", rows,
                       metadata({"kind": "coco", "target": str(tmp_path / "coco")}))
    dom = Dom(build(open_output(out), None, GalleryOptions())[0].read_text())
    assert [c["img"] is not None for c in dom.cards] == [True, True, True, False]
    assert "missing file" in dom.cards[3]["ph"]

    Image.new("RGB", (50, 40), (1, 2, 3)).save(tmp_path / "a.png")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "a.png")] * 2}).cast_column(
        "image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    rows = [row(i, f"hf[train][{i}]") for i in range(3)]  # seq 2 is past the dataset's end
    out = write_output(tmp_path / "o2", rows,
                       metadata({"kind": "hf", "target": str(tmp_path / "hf")}))
    dom = Dom(build(open_output(out), None, GalleryOptions())[0].read_text())
    assert [c["img"] is not None for c in dom.cards] == [True, True, False]
    assert "row not in the dataset" in dom.cards[2]["ph"]


def test_100k_rows_open_only_the_sampled_images(tmp_path, monkeypatch):
    """100k rows (1,000 of them errors) whose images exist for only 5 files: the page shows a
    sample and decodes only the images of the rows it shows."""
    import internvl_batch.images as images_mod
    from PIL import Image

    imgs = tmp_path / "imgs"
    _images(imgs, [f"{i}.jpg" for i in range(5)])
    rows = [row(i, f"{i}.jpg", caption=f"c{i}") if i % 100 else
            row(i, f"{i}.jpg", error="missing file: gone") for i in range(100_000)]
    out = write_output(tmp_path / "out", rows, metadata({"target": str(imgs)}))
    del rows

    calls = {"load_rgb": 0, "open": 0}
    real_load, real_open = images_mod.load_rgb, Image.open

    def counting_load(*a, **kw):
        calls["load_rgb"] += 1
        return real_load(*a, **kw)

    def counting_open(*a, **kw):
        calls["open"] += 1
        return real_open(*a, **kw)

    monkeypatch.setattr(images_mod, "load_rgb", counting_load)
    monkeypatch.setattr(Image, "open", counting_open)
    t0 = time.perf_counter()
    pages = build(open_output(out), None, GalleryOptions(sample=40, max_errors=10,
                                                          page_size=100))
    elapsed = time.perf_counter() - t0
    assert len(pages) == 1
    dom = Dom(pages[0].read_text())
    assert len(dom.cards) == 50 and sum(c["error"] for c in dom.cards) == 10
    assert calls["load_rgb"] == 50           # one per shown row, none for the other 99,950
    assert calls["open"] <= 50               # missing files are never opened
    assert "40 of 99,000 captioned rows shown (a sample, seed 0); 10 of 1,000 error rows" \
        in pages[0].read_text()
    assert elapsed < 60, elapsed  # ~1 s on the 2-core dev machine


def test_cli_show(merged, tmp_path):
    r = CliRunner().invoke(cli, ["show", str(merged), "--sample", "4", "--page-size", "3"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == f"{merged / 'gallery.html'} (+2 more pages beside it)"
    assert (merged / "gallery-p3.html").is_file()
    r = CliRunner().invoke(cli, ["show", str(tmp_path / "nope")])
    assert r.exit_code == 2 and r.output.strip() == f"Error: {tmp_path / 'nope'} does not exist"
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["show", str(tmp_path / "empty")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    # a negative seed, an --out that cannot be written: one line, exit 2 (were tracebacks)
    r = CliRunner().invoke(cli, ["show", str(merged), "--seed", "-1"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    (tmp_path / "file").write_text("x")
    r = CliRunner().invoke(cli, ["show", str(merged), "--out", str(tmp_path / "file" / "g.html")])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == \
        f"Error: cannot write {tmp_path / 'file' / 'g.html'}: File exists"


def test_page_links_survive_odd_file_names(merged, tmp_path):
    """`--out "run#1.html"` linked its pages as `run#1-p2.html`: a browser reads `#1-p2.html`
    as a fragment of `run`."""
    pages = build(open_output(merged), tmp_path / "run#1 %.html",
                  GalleryOptions(page_size=5))
    assert [p.name for p in pages] == ["run#1 %.html", "run#1 %-p2.html", "run#1 %-p3.html"]
    first = pages[0].read_text()
    assert 'href="run%231%20%25-p2.html"' in first and 'href="run#1' not in first


# -- the real thing: a sample run with real vLLM ------------------------------------------------

@needs_vllm
@pytest.mark.vllm
def test_sample_run_gallery(engine, engine_spec, tmp_path):
    """Caption the embedded sample set with the session engine, show it, look at it in the
    browser (every row, every thumbnail, a screenshot), score it."""
    from internvl_batch.config import RunConfig, SamplingSpec
    from internvl_batch.pipeline import EXIT_OK, run
    from internvl_batch.scores import score_output
    from internvl_batch.sources import SourceSpec, sample_captions

    out = tmp_path / "sample"
    cfg = RunConfig(source=SourceSpec.parse("sample"), engine=engine_spec, output=out,
                    sampling=SamplingSpec(max_tokens=8), batch_size=8, workers=1,
                    progress=False)
    assert run(cfg, started=engine) == EXIT_OK
    page = build(open_output(out), None, GalleryOptions())[0]
    dom = Dom(dump_dom(page))
    n = len(list((Path(__file__).parents[1] / "internvl_batch/data/sample").glob("*.jpg")))
    assert len(dom.cards) == n == 17 and not dom.groups
    assert all(c["img"].startswith("data:image/jpeg;base64,") for c in dom.cards)
    assert all(c["caption"] for c in dom.cards)
    shot = screenshot(page, tmp_path / "sample.png")
    assert shot.stat().st_size > 10_000
    s = score_output(open_output(out), use_java=False)
    assert s.scored == 17 and s.excluded == {"error": 0, "no_caption": 0, "no_references": 0}
    assert len(sample_captions()) == 34  # two references per image, all carried
