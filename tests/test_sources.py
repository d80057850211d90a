"""Sources: spec parsing/validation and every reader, with exact records. No engine."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from internvl_batch import sources
from internvl_batch.sources import Record, SourceError, SourceSpec, open_source
from tests.helpers import BAD_IMAGES, make_coco


def _png(color=(10, 20, 30), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _records(value: str, **options) -> list[Record]:
    return list(open_source(SourceSpec.parse(value, **options)))


# -- SourceSpec ------------------------------------------------------------------------------

def test_parse_splits_kind_and_target():
    spec = SourceSpec.parse("folder:/data/imgs:with:colons", limit=3)
    assert (spec.kind, spec.target, spec.limit) == ("folder", "/data/imgs:with:colons", 3)
    assert spec.describe() == "folder:/data/imgs:with:colons"
    assert SourceSpec.parse("sample").describe() == "sample"


def test_unknown_kind():
    with pytest.raises(SourceError) as e:
        SourceSpec.parse("nope")
    assert str(e.value) == ("unknown dataset 'nope': use sample, coco, folder:DIR, "
                            "parquet:GLOB, hf:NAME_OR_PATH or wds:TARS")


@pytest.mark.parametrize("kind", ["folder", "parquet", "hf", "wds"])
def test_missing_target(kind):
    with pytest.raises(SourceError) as e:
        SourceSpec.parse(kind)
    assert str(e.value) == f"--dataset {kind}: needs a target, e.g. {kind}:PATH"
    with pytest.raises(SourceError, match="needs a target"):
        SourceSpec.parse(f"{kind}:")


def test_coco_without_paths():
    with pytest.raises(SourceError) as e:
        SourceSpec.parse("coco")
    assert "--dataset coco needs --data-dir (images) and --annotations" in str(e.value)
    assert "coco:DIR holding both" in str(e.value)
    # any one of the three is enough to pass validation
    SourceSpec.parse("coco", data_dir="/x")
    SourceSpec.parse("coco", annotations="/x.json")
    SourceSpec.parse("coco:/x")


def test_negative_limit():
    with pytest.raises(SourceError, match=r"^--limit must be >= 0$"):
        SourceSpec.parse("sample", limit=-1)


def test_source_error_is_value_error():
    assert issubclass(SourceError, ValueError)


# -- COCO ------------------------------------------------------------------------------------

@pytest.fixture
def coco(tmp_path):
    images, ann = make_coco(tmp_path / "coco", 6, bad=True)
    return images, ann


def test_coco_records(coco):
    images, ann = coco
    doc = json.loads(ann.read_text())
    recs = _records("coco", data_dir=str(images), annotations=str(ann))
    assert len(recs) == 6 + len(BAD_IMAGES)
    assert [r.seq for r in recs] == list(range(len(recs)))
    # order and ids follow images[] of the annotations file
    assert [r.id for r in recs] == [str(img["id"]) for img in doc["images"]]
    assert [r.image_ref for r in recs] == [img["file_name"] for img in doc["images"]]
    assert recs[0].id == "0" and recs[0].image_ref == "000000000000.jpg"
    assert recs[0].payload == str(images / "000000000000.jpg")
    # references: that image's captions, in annotation order
    for r in recs[:6]:
        want = tuple(a["caption"] for a in doc["annotations"] if str(a["image_id"]) == r.id)
        assert len(want) == 2 and r.references == want
    names = list(BAD_IMAGES)
    for k, r in enumerate(recs[6:]):
        assert r.id == str(100000 + k) and r.image_ref == names[k]
        assert r.references == (names[k],)


def test_coco_missing_file_still_yields_record(coco):
    images, ann = coco
    recs = {r.image_ref: r for r in _records("coco", data_dir=str(images), annotations=str(ann))}
    r = recs["bad_missing.jpg"]
    assert r.payload == str(images / "bad_missing.jpg")
    assert not Path(r.payload).exists()


def test_coco_annotations_found_under_data_dir(tmp_path):
    images, ann = make_coco(tmp_path / "c", 3)
    ann.rename(images / ann.name)  # annotations under the image dir: discovered by glob
    recs = _records("coco", data_dir=str(images))
    assert [r.id for r in recs] == ["0", "1", "2"]
    assert all(Path(r.payload).is_file() for r in recs)


def test_coco_image_root_defaults_to_annotations_dir(tmp_path):
    images, ann = make_coco(tmp_path / "c", 2)
    flat = tmp_path / "flat"  # images beside the JSON
    images.rename(flat)
    ann = ann.rename(flat / ann.name)
    recs = _records("coco", annotations=str(ann))
    assert recs[0].payload == str(ann.parent / "000000000000.jpg")
    assert all(Path(r.payload).is_file() for r in recs)


def test_coco_image_root_annotations_beside_images_dir(tmp_path):
    # make_coco's layout: ROOT/annotations/captions_synth.json + ROOT/images/
    images, ann = make_coco(tmp_path / "c", 2)
    recs = _records("coco", annotations=str(ann))
    assert [r.payload for r in recs] == [str(images / "000000000000.jpg"),
                                         str(images / "000000000001.jpg")]
    recs = _records(f"coco:{tmp_path / 'c'}")  # DIR holding annotations/ and images/
    assert [r.payload for r in recs] == [str(images / "000000000000.jpg"),
                                         str(images / "000000000001.jpg")]


def test_coco_image_root_not_found_falls_back_to_annotations_dir(tmp_path):
    images, ann = make_coco(tmp_path / "c", 2)
    for f in images.iterdir():
        f.unlink()
    recs = _records("coco", annotations=str(ann))
    assert recs[0].payload == str(ann.parent / "000000000000.jpg")
    assert not Path(recs[0].payload).exists()  # a missing-file row later, not a SourceError


def test_coco_dir_holding_both_standard_layout(tmp_path):
    root = tmp_path / "coco2017"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    Image.new("RGB", (32, 24)).save(root / "val2017" / "000000397133.jpg")
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({
        "images": [{"id": 397133, "file_name": "000000397133.jpg"}],
        "annotations": [{"id": 1, "image_id": 397133, "caption": "a kitchen"}]}))
    (rec,) = _records(f"coco:{root}")
    assert rec.references == ("a kitchen",)
    assert Path(rec.payload).is_file(), rec.payload
    assert rec.payload == str(root / "val2017" / "000000397133.jpg")
    # the annotations file given directly: its parent's val2017/ sibling
    (rec,) = _records("coco", annotations=str(root / "annotations" / "captions_val2017.json"))
    assert rec.payload == str(root / "val2017" / "000000397133.jpg")


def test_coco_dir_images_subdir_and_split_precedence(tmp_path):
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "images" / "a.jpg")
    (root / "captions_train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}))
    (rec,) = _records(f"coco:{root}")
    assert rec.payload == str(root / "images" / "a.jpg")
    # DIR/<split> comes before DIR/images
    (root / "train").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "a.jpg")
    (rec,) = _records(f"coco:{root}")
    assert rec.payload == str(root / "train" / "a.jpg")
    # and DIR itself before both
    Image.new("RGB", (8, 8)).save(root / "a.jpg")
    (rec,) = _records(f"coco:{root}")
    assert rec.payload == str(root / "a.jpg")


def test_coco_data_dir_not_a_directory(tmp_path):
    images, ann = make_coco(tmp_path / "c", 1)
    with pytest.raises(SourceError, match=r"^--data-dir .*nope is not a directory$"):
        _records("coco", data_dir=str(tmp_path / "nope"), annotations=str(ann))
    with pytest.raises(SourceError, match="is not a directory"):
        _records("coco", data_dir=str(ann), annotations=str(ann))  # a file


def test_coco_errors(tmp_path):
    with pytest.raises(SourceError, match=r"no captions_\*\.json under .*; pass --annotations FILE"):
        _records(f"coco:{tmp_path}")
    with pytest.raises(SourceError, match=r"annotations file .*nope\.json not found"):
        _records("coco", annotations=str(tmp_path / "nope.json"))
    bad = tmp_path / "captions_bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(SourceError, match="is not a COCO captions file"):
        _records("coco", annotations=str(bad))
    bad.write_text("{not json")
    with pytest.raises(SourceError, match="is not a COCO captions file"):
        _records("coco", annotations=str(bad))


# -- folder ----------------------------------------------------------------------------------

def _folder(tmp_path, with_captions: bool) -> Path:
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.webp", "sub/d.PNG"):
        Image.new("RGB", (10, 10)).save(root / name, format={"jpg": "JPEG"}.get(
            name.rsplit(".", 1)[1].lower(), name.rsplit(".", 1)[1].upper()))
    (root / "notes.txt").write_text("ignored")
    if with_captions:
        (root / "captions.jsonl").write_text(
            json.dumps({"file": "a.jpg", "captions": ["an a", "another a"]}) + "\n\n"
            + json.dumps({"file": "sub/c.webp", "captions": ["a c"]}) + "\n")
    return root


def test_folder_with_captions(tmp_path):
    root = _folder(tmp_path, with_captions=True)
    recs = _records(f"folder:{root}")
    assert [(r.seq, r.id, r.image_ref) for r in recs] == [
        (0, "a.jpg", "a.jpg"), (1, "b.png", "b.png"), (2, "sub/c.webp", "sub/c.webp"),
        (3, "sub/d.PNG", "sub/d.PNG")]
    assert [r.references for r in recs] == [("an a", "another a"), (), ("a c",), ()]
    assert [r.payload for r in recs] == [str(root / r.image_ref) for r in recs]


def test_folder_without_captions(tmp_path):
    recs = _records(f"folder:{_folder(tmp_path, with_captions=False)}")
    assert [r.id for r in recs] == ["a.jpg", "b.png", "sub/c.webp", "sub/d.PNG"]
    assert all(r.references == () for r in recs)


def test_folder_errors(tmp_path):
    with pytest.raises(SourceError, match=r"^folder .*nope does not exist or is not a directory$"):
        _records(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"^no images \(\.bmp, \.gif, .*\) under "):
        _records(f"folder:{tmp_path / 'empty'}")
    root = _folder(tmp_path, with_captions=False)
    (root / "captions.jsonl").write_text('{"file": "a.jpg"}\n{"captions": []}\n')
    with pytest.raises(SourceError, match=r"captions\.jsonl:2: expected"):
        _records(f"folder:{root}")
    # Latin-1 bytes and non-string captions were tracebacks (the latter
    # only once the engine had started), a string caption became its characters
    (root / "captions.jsonl").write_bytes(b'{"file": "caf\xe9.jpg", "captions": ["x"]}\n')
    with pytest.raises(SourceError, match=r"captions\.jsonl: not UTF-8 \(byte 13\); save it "
                                          r"as UTF-8"):
        _records(f"folder:{root}")
    for bad in ('{"file": "a.jpg", "captions": [1, null]}', '{"file": "a.jpg", "captions": "x"}',
                '{"file": 7, "captions": []}', '["a.jpg"]'):
        (root / "captions.jsonl").write_text(bad + "\n")
        with pytest.raises(SourceError, match=r"captions\.jsonl:1: expected \{\"file\""):
            _records(f"folder:{root}")


# -- sample ----------------------------------------------------------------------------------

def test_sample_source():
    recs = _records("sample")
    assert len(recs) >= 16
    assert [r.seq for r in recs] == list(range(len(recs)))
    assert all(r.id.startswith("sample/") for r in recs)
    assert all(r.id == "sample/" + r.image_ref for r in recs)
    assert all(len(r.references) == 2 and all(c.strip() for c in r.references) for r in recs)
    assert all(Path(r.payload).is_file() for r in recs)
    assert recs[0].id == "sample/00_astronaut.jpg"
    assert len(sources.sample_captions()) == 2 * len(recs)


# -- --limit ---------------------------------------------------------------------------------

def test_limit():
    assert [r.id for r in _records("sample", limit=3)] == [
        "sample/00_astronaut.jpg", "sample/01_camera.jpg", "sample/02_chelsea.jpg"]
    assert _records("sample", limit=0) == []
    assert len(_records("sample", limit=10_000)) == len(_records("sample"))


def test_limit_stops_reading(monkeypatch):
    consumed = []

    def huge(self):
        def gen():
            for i in range(10_000):
                consumed.append(i)
                yield Record(i, str(i), str(i), None)
        return gen()

    monkeypatch.setattr(sources.READERS["sample"], "records", huge)
    assert [r.seq for r in open_source(SourceSpec.parse("sample", limit=5))] == [0, 1, 2, 3, 4]
    assert len(consumed) <= 6


def test_reader_owns_sharding_after_the_limit():
    """--limit counts the dataset's first N records; each shard then takes its seq % N."""
    spec = SourceSpec.parse("sample", limit=7)
    shards = [[r.seq for r in open_source(spec, i, 3)] for i in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]


def test_registry_drives_parse_and_help():
    assert list(sources.READERS) == ["sample", "coco", "folder", "parquet", "hf", "wds"]
    assert sources.dataset_help() == ("sample | coco | folder:DIR | parquet:GLOB | "
                                      "hf:NAME_OR_PATH | wds:TARS")

    @sources.register
    class Numbers(sources.Reader):
        kind, usage, needs_target = "numbers", "numbers:N", True

        def records(self):
            return (Record(i, str(i), str(i), None) for i in range(int(self.spec.target)))

    try:
        assert [r.id for r in open_source(SourceSpec.parse("numbers:4"), 1, 2)] == ["1", "3"]
        assert "numbers:N" in sources.dataset_help()
    finally:
        del sources.READERS["numbers"]


# -- Parquet ---------------------------------------------------------------------------------

def test_parquet_binary_column(tmp_path):
    imgs = [_png((i, 0, 0)) for i in range(3)]
    pq.write_table(pa.table({"image": pa.array(imgs, pa.binary()),
                             "caption": ["one", "two", "three"],
                             "key": ["k0", "k1", "k2"]}), tmp_path / "d.parquet")
    recs = _records(f"parquet:{tmp_path}/*.parquet", caption_column="caption")
    assert [(r.seq, r.id, r.image_ref) for r in recs] == [
        (0, "d.parquet:0", "d.parquet[0]"), (1, "d.parquet:1", "d.parquet[1]"),
        (2, "d.parquet:2", "d.parquet[2]")]
    assert [r.payload for r in recs] == imgs
    assert [r.references for r in recs] == [("one",), ("two",), ("three",)]
    recs = _records(f"parquet:{tmp_path}/d.parquet", id_column="key")
    assert [r.id for r in recs] == ["k0", "k1", "k2"]
    assert all(r.references == () for r in recs)


def test_parquet_hf_struct(tmp_path):
    imgs = [_png((0, i, 0)) for i in range(2)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "img": pa.array([{"bytes": imgs[0], "path": "x/0.png"}, {"bytes": imgs[1], "path": None}],
                        struct),
        "sentences": pa.array([{"raw": ["r1", "r2"]}, {"raw": ["r3"]}],
                              pa.struct([("raw", pa.list_(pa.string()))])),
    }), tmp_path / "s.parquet")
    recs = _records(f"parquet:{tmp_path / 's.parquet'}", image_column="img",
                    caption_column="sentences")
    assert [r.payload for r in recs] == imgs
    assert [r.image_ref for r in recs] == ["x/0.png", "s.parquet[1]"]
    assert [r.references for r in recs] == [("r1", "r2"), ("r3",)]


def test_parquet_relative_paths(tmp_path):
    sub = tmp_path / "set"
    (sub / "imgs").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(sub / "imgs" / "a.png")
    absolute = tmp_path / "abs.png"
    Image.new("RGB", (4, 4)).save(absolute)
    pq.write_table(pa.table({"image": ["imgs/a.png", str(absolute), None],
                             "caps": [["x", "y"], [], None]}), sub / "p.parquet")
    recs = _records(f"parquet:{sub / 'p.parquet'}", caption_column="caps")
    assert recs[0].payload == str(sub / "imgs" / "a.png")  # relative to the parquet file
    assert recs[0].image_ref == "imgs/a.png"
    assert recs[1].payload == str(absolute) and recs[1].image_ref == str(absolute)
    assert recs[2].payload is None and recs[2].image_ref == "p.parquet[2]"
    assert [r.references for r in recs] == [("x", "y"), (), ()]


def test_parquet_multiple_files_continue_seq(tmp_path):
    for name, n in (("b.parquet", 2), ("a.parquet", 3)):
        pq.write_table(pa.table({"image": pa.array([_png()] * n, pa.binary())}), tmp_path / name)
    recs = _records(f"parquet:{tmp_path}/*.parquet")
    assert [r.id for r in recs] == ["a.parquet:0", "a.parquet:1", "a.parquet:2",
                                    "b.parquet:3", "b.parquet:4"]
    assert [r.id for r in _records(f"parquet:{tmp_path}/*.parquet", limit=4)] == \
        [r.id for r in recs[:4]]


def test_parquet_missing_image_column(tmp_path):
    pq.write_table(pa.table({"picture": pa.array([b"x"], pa.binary()), "text": ["t"]}),
                   tmp_path / "m.parquet")
    with pytest.raises(SourceError) as e:
        _records(f"parquet:{tmp_path / 'm.parquet'}")
    msg = str(e.value)
    assert "has no column 'image' (columns: picture, text); pass --image-column" in msg
    assert "m.parquet" in msg and "\n" not in msg


def test_parquet_no_files(tmp_path):
    with pytest.raises(SourceError, match=r"^no Parquet files match '.*/\*\.parquet'$"):
        _records(f"parquet:{tmp_path}/*.parquet")


# -- Hugging Face datasets (save_to_disk) ------------------------------------------------------

@pytest.fixture
def hf_dir(tmp_path):
    import datasets

    ims = [Image.new("RGB", (20 + i, 10), (30 * i, 0, 0)) for i in range(4)]
    ds = datasets.Dataset.from_dict(
        {"image": ims, "caption": [f"cap {i}" for i in range(4)],
         "caps": [[f"a{i}", f"b{i}"] for i in range(4)], "uid": [f"u{i}" for i in range(4)]},
        features=datasets.Features({
            "image": datasets.Image(), "caption": datasets.Value("string"),
            "caps": datasets.Sequence(datasets.Value("string")), "uid": datasets.Value("string")}))
    path = tmp_path / "hf"
    ds.save_to_disk(str(path))
    return path, ims


def test_hf_save_to_disk(hf_dir):
    path, ims = hf_dir
    recs = _records(f"hf:{path}", caption_column="caption")
    assert [(r.seq, r.id, r.image_ref) for r in recs] == [
        (i, f"train-{i}", f"{path}[train][{i}]") for i in range(4)]
    assert [r.references for r in recs] == [(f"cap {i}",) for i in range(4)]
    for r, im in zip(recs, ims):
        assert isinstance(r.payload, bytes) and r.payload[:8] == b"\x89PNG\r\n\x1a\n"
        got = Image.open(io.BytesIO(r.payload))
        assert got.size == im.size and got.convert("RGB").getpixel((0, 0)) == im.getpixel((0, 0))
    recs = _records(f"hf:{path}", caption_column="caps", id_column="uid", limit=2)
    assert [(r.id, r.references) for r in recs] == [("u0", ("a0", "b0")), ("u1", ("a1", "b1"))]


def test_hf_deterministic_order(hf_dir):
    path, _ = hf_dir
    key = lambda rs: [(r.seq, r.id, r.image_ref, r.payload, r.references) for r in rs]  # noqa
    assert key(_records(f"hf:{path}")) == key(_records(f"hf:{path}"))


def test_hf_errors(hf_dir, tmp_path):
    path, _ = hf_dir
    with pytest.raises(SourceError) as e:
        _records(f"hf:{path}", image_column="img")
    assert str(e.value) == (f"hf:{path} has no column 'img' (columns: image, caption, caps, uid); "
                            "pass --image-column")
    with pytest.raises(SourceError, match=r"^cannot open hf:.*nothing \(split train\): "):
        _records(f"hf:{tmp_path / 'nothing'}")


def test_folder_and_coco_deterministic_order(coco, tmp_path):
    images, ann = coco
    key = lambda rs: [(r.seq, r.id, r.image_ref, r.payload, r.references) for r in rs]  # noqa
    assert key(_records("coco", data_dir=str(images), annotations=str(ann))) == \
        key(_records("coco", data_dir=str(images), annotations=str(ann)))
    assert key(_records(f"folder:{images}")) == key(_records(f"folder:{images}"))
