"""Sources: where images and reference captions come from.

Every source yields `Record`s lazily, in a deterministic order, with a stable `seq` (position
in the dataset) and `id`. Records carry a *reference* to the image (a path or raw bytes), not
pixels: decoding happens later, in parallel workers (`images.py`), so memory stays bounded by
the prefetch window however large the dataset is.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from itertools import chain, islice
from pathlib import Path
from typing import ClassVar, Iterable, Iterator, Sequence

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class SourceError(ValueError):
    """A dataset that cannot be opened at all (wrong path, wrong format): a user error."""


@dataclass(frozen=True)
class Record:
    seq: int
    id: str
    image_ref: str
    payload: bytes | str | None = field(repr=False)  # raw bytes, a file path, or None if absent
    references: tuple[str, ...] = ()

    def __post_init__(self):
        # Parquet strings are UTF-8: a file name that is not (Python keeps its bytes as lone
        # surrogates) or a JSON "\udce9" would fail the whole chunk at every rerun. The id and
        # ref get a printable spelling here, once, so resume compares what was written; the
        # payload keeps the real path to open.
        if not _utf8(self.id):
            object.__setattr__(self, "id", _printable(self.id))
        if not _utf8(self.image_ref):
            object.__setattr__(self, "image_ref", _printable(self.image_ref))
        if not all(_utf8(r) for r in self.references):
            object.__setattr__(self, "references", tuple(_printable(r) for r in self.references))


def _utf8(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(s: str) -> str:
    """`s` with what UTF-8 cannot hold spelled as \\xNN (file name bytes) or \\udNNN."""
    return s.encode("utf-8", "surrogateescape" if _only_escapes(s) else "backslashreplace") \
        .decode("utf-8", "backslashreplace")


def _only_escapes(s: str) -> bool:
    """True if every surrogate in `s` is one of surrogateescape's (U+DC80-U+DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in s)


@dataclass(frozen=True)
class SourceSpec:
    """Parsed `--dataset` value plus the options that go with it."""

    kind: str
    target: str = ""
    data_dir: str | None = None
    annotations: str | None = None
    split: str = "train"
    image_column: str = "image"
    caption_column: str | None = None
    id_column: str | None = None
    limit: int | None = None

    @classmethod
    def parse(cls, value: str, **options) -> "SourceSpec":
        kind, _, target = value.partition(":")
        spec = cls(kind=kind, target=target, **options)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.kind not in READERS:
            raise SourceError(f"unknown dataset {self.kind!r}: use {_usages(' or ')}")
        reader = READERS[self.kind]
        if reader.needs_target and not self.target:
            raise SourceError(f"--dataset {self.kind}: needs a target, e.g. {self.kind}:PATH")
        reader.check(self)
        if self.limit is not None and self.limit < 0:
            raise SourceError("--limit must be >= 0")

    def describe(self) -> str:
        return f"{self.kind}:{self.target}" if self.target else self.kind

    def identity(self) -> dict:
        """What decides which record a `seq` is, by the flag a user knows: the dataset (paths
        made absolute, so a rerun from another directory is the same), the options its kind
        reads, and --limit. Part of the shard's settings fingerprint: a rerun into the same
        --output with another dataset would otherwise skip its records by the ids of the first
        one's and publish those captions as its own."""
        def norm(v):
            return os.path.abspath(v) if isinstance(v, str) and v and \
                (self.kind != "hf" or os.path.exists(v)) else v

        out = {"dataset": f"{self.kind}:{norm(self.target)}" if self.target else self.kind}
        for opt in READERS[self.kind].options:
            v = getattr(self, opt)
            out[opt] = norm(v) if opt in ("data_dir", "annotations") else v
        out["limit"] = self.limit
        return out


# -- the registry of readers --------------------------------------------------------------

class Records:
    """An iterator of records that knows how many it will yield where that is cheap to know
    (a file listing, a COCO file, Parquet footers): `total`, else None. The progress bar
    shows percent and ETA from it.

    `split_at(start)` is how a resume skips what is written: the ids of the records before
    `start` (to check that they are still the records written there) and the records from
    `start` on. By default it reads through the records before `start`; a reader that can
    list ids without building records (`Reader.split`: Parquet reads only its id column)
    makes a resume at a million rows cost about what reading one index does."""

    def __init__(self, it: Iterable[Record], total: int | None, split=None):
        self._it, self.total, self._split = iter(it), total, split

    def __iter__(self) -> "Records":
        return self

    def __next__(self) -> Record:
        self._split = None  # started: a split now would skip what was taken
        return next(self._it)

    def split_at(self, start: int) -> "tuple[Sequence[str], Records]":
        """(ids of the records with seq < start, in order: a list, or an Arrow string column
        from a reader's `split`; the records from seq `start`)."""
        got = self._split(start) if self._split is not None else None
        if got is not None:
            return got[0], Records(got[1], self.total)
        ids: list[str] = []
        for r in self._it:
            if r.seq >= start:
                return ids, Records(chain([r], self._it), self.total)
            ids.append(r.id)
        return ids, Records(iter(()), self.total)


def shard_size(total: int, shard_index: int, num_shards: int) -> int:
    """How many of seq 0..total-1 have seq % num_shards == shard_index."""
    return len(range(shard_index, total, num_shards))


class Reader:
    """One kind of dataset. A subclass sets `kind` and `usage` and writes `records()` (every
    record in dataset order, `seq` = position); the base applies --limit and picks a shard.
    Adding a kind = one `@register`ed subclass here."""

    kind: ClassVar[str]
    usage: ClassVar[str]          # how --dataset spells it, e.g. "folder:DIR"
    needs_target: ClassVar[bool] = False
    # the SourceSpec fields besides the target that this kind reads (SourceSpec.identity)
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: SourceSpec):
        self.spec = spec

    @classmethod
    def check(cls, spec: SourceSpec) -> None:
        """Reject options this kind cannot work with (cheap: no file is opened)."""

    def records(self) -> Iterator[Record]:
        raise NotImplementedError

    def split(self, start: int) -> "tuple[Sequence[str], Iterator[Record]] | None":
        """(the ids of every record with seq < start, the records from seq `start` on), both
        in dataset order and before --limit and sharding, without building the records
        before `start`; None where this kind cannot (Records.split_at then reads through)."""
        return None

    def read(self, shard_index: int = 0, num_shards: int = 1) -> Records:
        records = self.records()  # raises SourceError now, before any model is loaded
        total = getattr(records, "total", None)
        limit = self.spec.limit
        if limit is not None:
            # stop reading: a streamed hub dataset may be endless
            records = islice(records, limit)
            total = min(total, limit) if total is not None else None
        if num_shards > 1:
            records = (r for r in records if r.seq % num_shards == shard_index)

        def split(start: int):
            start = start if limit is None else min(start, limit)
            got = self.split(start)
            if got is None:
                return None
            ids, rest = got
            if limit is not None:
                rest = islice(rest, limit - start)
            ids = ids[shard_index::num_shards] if num_shards > 1 else ids
            return ids, (r for r in rest if r.seq % num_shards == shard_index)

        return Records(records, shard_size(total, shard_index, num_shards)
                       if total is not None else None,
                       split if type(self).split is not Reader.split else None)


READERS: dict[str, type[Reader]] = {}


def register(cls: type[Reader]) -> type[Reader]:
    READERS[cls.kind] = cls
    return cls


def _usages(last_sep: str = ", ") -> str:
    u = [r.usage for r in READERS.values()]
    return ", ".join(u[:-1]) + last_sep + u[-1] if len(u) > 1 else "".join(u)


def dataset_help() -> str:
    """--dataset's help text, from the registry."""
    return " | ".join(r.usage for r in READERS.values())


def open_source(spec: SourceSpec, shard_index: int = 0, num_shards: int = 1) -> Records:
    """The dataset's records in order (by default all shards, else one shard's)."""
    return READERS[spec.kind](spec).read(shard_index, num_shards)


# -- sample -----------------------------------------------------------------------------

def sample_dir() -> Path:
    return Path(str(resources.files("internvl_batch") / "data" / "sample"))


def sample_captions() -> list[str]:
    path = sample_dir() / "captions.jsonl"
    if not path.is_file():
        return []
    return [c for line in path.read_text().splitlines() if line.strip()
            for c in json.loads(line)["captions"]]


@register
class SampleReader(Reader):
    """The photos embedded in the package (with reference captions)."""

    kind, usage = "sample", "sample"

    def records(self) -> Iterator[Record]:
        return _folder_records(sample_dir(), id_prefix="sample/")


# -- COCO captions ------------------------------------------------------------------------

@register
class CocoReader(Reader):
    """A COCO captions file (images[] + annotations[]) and its image directory."""

    kind, usage = "coco", "coco"
    options = ("data_dir", "annotations")

    @classmethod
    def check(cls, spec: SourceSpec) -> None:
        if not (spec.data_dir or spec.annotations or spec.target):
            raise SourceError("--dataset coco needs --data-dir (images) and --annotations "
                              "(captions_*.json), or coco:DIR holding both")

    def records(self) -> Iterator[Record]:
        return _coco(self.spec)


def _coco(spec: SourceSpec) -> Iterator[Record]:
    data_dir, ann = spec.data_dir, spec.annotations
    if spec.target and not data_dir:
        data_dir = spec.target
    if not ann:
        found = sorted(glob.glob(os.path.join(data_dir or ".", "**", "captions_*.json"),
                                 recursive=True))
        if not found:
            raise SourceError(f"no captions_*.json under {data_dir}; pass --annotations FILE")
        ann = found[0]
    if not os.path.isfile(ann):
        raise SourceError(f"annotations file {ann} not found")
    try:
        with open(ann) as f:
            doc = json.load(f)
    except ValueError as e:
        raise SourceError(f"{ann} is not a COCO captions file (need images[] and "
                          f"annotations[]): {e}") from None
    images, annotations = validate_coco(doc, ann)
    image_root = _coco_image_root(data_dir, ann, images)
    refs: dict[int, list[str]] = {}
    for a in annotations:
        if "image_id" in a and "caption" in a:
            refs.setdefault(a["image_id"], []).append(str(a["caption"]).strip())

    def gen():
        for seq, img in enumerate(images):
            name = str(img.get("file_name", ""))
            path = image_root / name
            image_id = img.get("id", seq)
            yield Record(seq, str(image_id), name, str(path),
                         tuple(refs.get(image_id, ())))
    return Records(gen(), len(images))


def validate_coco(doc, ann: str) -> tuple[list[dict], list[dict]]:
    """(images, annotations) of a COCO captions document, or SourceError naming the first
    malformed entry: found before any engine starts instead of as error rows after."""
    need = "need images[] of {id, file_name} and annotations[] of {image_id, caption}"
    if not isinstance(doc, dict):
        raise SourceError(f"{ann} is not a COCO captions file ({need}): "
                          f"top level is a {type(doc).__name__}")
    images, annotations = doc.get("images"), doc.get("annotations", [])
    if not isinstance(images, list):
        what = "missing" if images is None else f"a {type(images).__name__}, not a list"
        raise SourceError(f"{ann} is not a COCO captions file ({need}): images is {what}")
    if not isinstance(annotations, list):
        raise SourceError(f"{ann} is not a COCO captions file ({need}): annotations is a "
                          f"{type(annotations).__name__}, not a list")
    for i, img in enumerate(images):
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) \
                or not img["file_name"].strip():
            raise SourceError(f"{ann}: images[{i}] has no file_name ({need})")
        if isinstance(img.get("id"), (list, dict)):
            raise SourceError(f"{ann}: images[{i}] has an id that is not a number or string")
    for i, a in enumerate(annotations):
        if not isinstance(a, dict):
            raise SourceError(f"{ann}: annotations[{i}] is a {type(a).__name__}, not an "
                              f"object ({need})")
        if isinstance(a.get("image_id"), (list, dict)):
            raise SourceError(f"{ann}: annotations[{i}] has an image_id that is not a number "
                              "or string")
    return images, annotations


def _coco_image_root(data_dir: str | None, ann: str, images: list[dict]) -> Path:
    """Where file_name is relative to. COCO ships DIR/annotations/captions_val2017.json beside
    DIR/val2017/; flat layouts put images beside the JSON or in DIR/images. Candidates are
    tried from --data-dir (or the JSON's folder) outwards; the first holding the first listed
    image wins, and with no match file names stay relative to --data-dir."""
    if data_dir and not os.path.isdir(data_dir):
        raise SourceError(f"--data-dir {data_dir} is not a directory")
    top = Path(data_dir) if data_dir else Path(ann).parent
    split = Path(ann).stem.split("_", 1)[-1]  # captions_val2017 -> val2017
    candidates = [top, top / split, top / "images", top.parent / split, top.parent / "images",
                  top.parent]
    first = next((str(im.get("file_name", "")) for im in images if im.get("file_name")), None)
    if first:
        for c in candidates:
            if (c / first).is_file():
                return c
    return top


# -- folder -----------------------------------------------------------------------------

@register
class FolderReader(Reader):
    """Every image under a directory (sorted), captions from its captions.jsonl if any."""

    kind, usage, needs_target = "folder", "folder:DIR", True

    def records(self) -> Iterator[Record]:
        root = Path(self.spec.target)
        if not root.is_dir():
            raise SourceError(f"folder {root} does not exist or is not a directory")
        return _folder_records(root)


def _folder_records(root: Path, id_prefix: str = "") -> Iterator[Record]:
    captions: dict[str, tuple[str, ...]] = {}
    cap_file = root / "captions.jsonl"
    if cap_file.is_file():
        shape = '{"file": "NAME", "captions": ["text", ...]}'
        try:
            text = cap_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SourceError(f"{cap_file}: not UTF-8 (byte {e.start}); save it as UTF-8, one "
                              f"{shape} per line") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                file, caps = row["file"], row.get("captions") or []
            except (ValueError, KeyError, TypeError):
                raise SourceError(f"{cap_file}:{n}: expected {shape}") from None
            # a string would become its characters, a number a traceback once the engine ran
            if not isinstance(file, str) or not isinstance(caps, list) or \
                    not all(isinstance(c, str) for c in caps):
                raise SourceError(f"{cap_file}:{n}: expected {shape} (file a string, captions "
                                  "a list of strings)")
            captions[file] = tuple(caps)
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise SourceError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")

    def gen():
        for seq, path in enumerate(files):
            rel = path.relative_to(root).as_posix()
            yield Record(seq, id_prefix + rel, rel, str(path), captions.get(rel, ()))
    return Records(gen(), len(files))


# -- Parquet ------------------------------------------------------------------------------

@register
class ParquetReader(Reader):
    """Parquet files matching a glob: image bytes, {bytes, path} structs or paths."""

    kind, usage, needs_target = "parquet", "parquet:GLOB", True
    options = ("image_column", "caption_column", "id_column")

    def records(self) -> Iterator[Record]:
        footers = _parquet_footers(self.spec)
        # Parquet footers hold the row counts: no data is read for this
        return Records(_parquet_rows(self.spec, footers), sum(m.num_rows for m in footers.values()))

    def split(self, start: int):
        footers = _parquet_footers(self.spec)
        return _parquet_ids(self.spec, footers, start), _parquet_rows(self.spec, footers, start)


def _parquet_footers(spec: SourceSpec) -> dict:
    """{file: its footer} of the files matching the glob, in order, once each is checked."""
    files = sorted(f for f in glob.glob(spec.target, recursive=True) if os.path.isfile(f))
    if not files:
        hint = f" (a folder: use parquet:{spec.target.rstrip('/')}/*.parquet)" \
            if os.path.isdir(spec.target) else ""
        raise SourceError(f"no Parquet files match {spec.target!r}{hint}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    footers = {}
    for f in files:  # every footer now: a file that is not Parquet is one line, not a crash
        try:
            footers[f] = pq.ParquetFile(f).metadata
        except (pa.ArrowException, OSError) as e:
            raise SourceError(f"{f} is not a readable Parquet file ({str(e).splitlines()[0]}); "
                              "narrow the glob to Parquet files") from None
    # every file, not the first only: a later one without the id column switched its rows to
    # name:seq ids, one without the image column became error rows (found 2026-12-06)
    for f in files:
        schema = footers[f].schema.to_arrow_schema()
        if spec.image_column not in schema.names:
            raise SourceError(f"{f} has no column {spec.image_column!r} "
                              f"(columns: {', '.join(schema.names)}); pass --image-column, or "
                              "narrow the glob to files that have it")
        for flag, col in (("--caption-column", spec.caption_column),
                          ("--id-column", spec.id_column)):
            if col and col not in schema.names:
                raise SourceError(f"{f} has no column {col!r} "
                                  f"(columns: {', '.join(schema.names)}); fix {flag}, or "
                                  "narrow the glob to files that have it")
        if spec.caption_column:
            _check_caption_type(schema.field(spec.caption_column).type, spec.caption_column,
                                where=f"{f}: " if len(files) > 1 else "")
    return footers


def _parquet_rows(spec: SourceSpec, footers: dict, start: int = 0) -> Iterator[Record]:
    """The records from seq `start` on; files and row groups wholly before it are not read."""
    import pyarrow.parquet as pq

    seq = 0
    for path, md in footers.items():
        if seq + md.num_rows <= start:
            seq += md.num_rows
            continue
        pf = pq.ParquetFile(path)
        cols = [c for c in (spec.image_column, spec.caption_column, spec.id_column)
                if c and c in pf.schema_arrow.names]
        groups = []
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if seq + n <= start:
                seq += n
            else:
                groups.append(g)
        for batch in pf.iter_batches(batch_size=256, columns=cols, row_groups=groups):
            if seq + batch.num_rows <= start:
                seq += batch.num_rows
                continue
            for row in batch.to_pylist():
                if seq >= start:
                    payload, ref = _payload_of(row.get(spec.image_column), Path(path).parent)
                    rid = row.get(spec.id_column) if spec.id_column else None
                    yield Record(seq, str(rid) if rid is not None else f"{Path(path).name}:{seq}",
                                 ref or f"{Path(path).name}[{seq}]", payload,
                                 _captions_of(row.get(spec.caption_column)))
                seq += 1


def _parquet_ids(spec: SourceSpec, footers: dict, stop: int):
    """The ids of the records with seq < stop (an Arrow string column), reading only the id
    column (none at all when ids are positions): what a resume checks its written rows
    against. Text and integer ids stay Arrow arrays: no Python string per row."""
    import pyarrow as pa

    parts = []
    seq = 0
    for path, md in footers.items():
        take = min(md.num_rows, stop - seq)
        if take <= 0:
            break
        name = Path(path).name
        col = _id_column(spec.id_column, path, md, take) if spec.id_column else None
        if col is None or col.null_count == len(col):
            parts.append(pa.array([f"{name}:{seq + j}" for j in range(take)], pa.string()))
        elif col.null_count == 0 and (pa.types.is_string(col.type) or
                                      pa.types.is_large_string(col.type) or
                                      pa.types.is_integer(col.type)):
            parts += col.cast(pa.string()).chunks  # what str() makes of each value
        else:
            parts.append(pa.array([str(v) if v is not None else f"{name}:{seq + j}"
                                   for j, v in enumerate(col.to_pylist())], pa.string()))
        seq += take
    return pa.chunked_array(parts, pa.string())


def _id_column(column: str, path: str, md, take: int):
    """The first `take` values of `column`, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    groups, n = [], 0
    while n < take:
        n += md.row_group(len(groups)).num_rows
        groups.append(len(groups))
    with pq.ParquetFile(path) as pf:
        return pf.read_row_groups(groups, columns=[column]).column(0).slice(0, take)


def _check_caption_type(typ, column: str, where: str = "") -> None:
    """Reference captions are text, a list of texts, or a struct holding them (COCO-style
    {"raw": [...]}); a number column named by mistake is one line now, not a crash mid-run."""
    import pyarrow as pa

    def texty(t) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)

    ok = texty(typ) or pa.types.is_struct(typ) or (
        (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and texty(typ.value_type))
    if not ok:
        raise SourceError(f"{where}--caption-column {column!r} holds {typ}, not text or a list of "
                          "texts; name the column with the reference captions, or leave "
                          "--caption-column out")


def _payload_of(value, base: Path) -> tuple[bytes | str | None, str]:
    """Image cell -> (payload, reference): bytes, {bytes, path} structs (HF style) or paths."""
    if value is None:
        return None, ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), ""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), str(value.get("path") or "")
        if value.get("path"):
            value = value["path"]
        else:
            return None, ""
    if isinstance(value, str):
        p = Path(value)
        return str(p if p.is_absolute() else base / p), value
    if hasattr(value, "save"):  # a decoded PIL image (HF datasets without decode=False)
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue(), ""
    return None, ""


def _captions_of(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (dict, list, tuple)):  # a number where text was expected
        return (str(value),)
    if isinstance(value, dict):  # e.g. {"raw": [...]} or {"text": ...}
        for k in ("raw", "text", "caption", "captions"):
            if k in value:
                return _captions_of(value[k])
        return ()
    return tuple(str(v) for v in value)


# -- Hugging Face datasets ----------------------------------------------------------------

@register
class HFReader(Reader):
    """A Hugging Face dataset: a save_to_disk() directory or a hub name (streamed)."""

    kind, usage, needs_target = "hf", "hf:NAME_OR_PATH", True
    options = ("split", "image_column", "caption_column", "id_column")

    def records(self) -> Iterator[Record]:
        return _hf(self.spec)


def _hf(spec: SourceSpec) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise SourceError("--dataset hf: needs the 'datasets' package (pip install datasets)")
    target = spec.target
    try:
        if os.path.isdir(target) and os.path.isfile(os.path.join(target, "dataset_info.json")):
            ds = datasets.load_from_disk(target)  # a save_to_disk() Dataset
        elif os.path.isdir(target) and os.path.isfile(os.path.join(target, "dataset_dict.json")):
            ds = datasets.load_from_disk(target)[spec.split]
        else:
            ds = datasets.load_dataset(target, split=spec.split, streaming=True)
    except Exception as e:  # datasets raises many types; all mean "cannot open this"
        raise SourceError(f"cannot open hf:{target} (split {spec.split}): "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    features = getattr(ds, "features", None) or {}
    if features and spec.image_column not in features:
        raise SourceError(f"hf:{target} has no column {spec.image_column!r} "
                          f"(columns: {', '.join(features)}); pass --image-column")
    for flag, col in (("--caption-column", spec.caption_column), ("--id-column", spec.id_column)):
        if features and col and col not in features:
            raise SourceError(f"hf:{target} has no column {col!r} "
                              f"(columns: {', '.join(features)}); fix {flag}")
    if isinstance(features.get(spec.image_column), datasets.Image):
        # raw bytes, so decoding runs in our workers instead of the reading thread
        ds = ds.cast_column(spec.image_column, datasets.Image(decode=False))

    def gen():
        for seq, row in enumerate(ds):
            payload, ref = _payload_of(row.get(spec.image_column), Path(target))
            rid = row.get(spec.id_column) if spec.id_column else None
            yield Record(seq, str(rid) if rid is not None else f"{spec.split}-{seq}",
                         ref or f"{target}[{spec.split}][{seq}]", payload,
                         _captions_of(row.get(spec.caption_column)))
    # a saved Dataset knows its length; a streamed one does not
    return Records(gen(), len(ds) if hasattr(ds, "__len__") else None)
