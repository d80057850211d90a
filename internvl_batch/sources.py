"""Sources: where images and reference captions come from.

Every source yields `Record`s lazily, in a deterministic order, with a stable `seq` (position
in the dataset) and `id`. Records carry a *reference* to the image (a path or raw bytes), not
pixels: decoding happens later, in parallel workers (`images.py`), so memory stays bounded by
the prefetch window however large the dataset is.
"""
from __future__ import annotations

import glob
import hashlib
import heapq
import json
import lzma
import os
import re
import tarfile
import zlib
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
    # why the source itself cannot give this record an image (a tar cut short, a sample
    # without an image member): the row's error, without asking the decoder
    error: str | None = None

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
        out.update(READERS[self.kind].identity_of_files(self))
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

    def resume(self, seqs: Iterable[int]) -> "Records":
        """Told the seqs already written before the first record is read. A kind
        that can pass over written records without reading them (wds: whole tars) does so;
        the others yield everything and the pipeline's resume filter skips what is done."""
        return self

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

    @classmethod
    def identity_of_files(cls, spec: SourceSpec) -> dict:
        """What decides which record a seq is beyond the --dataset value and options (wds:
        the tar files and their sizes); {} where the dataset value says it all."""
        return {}

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
    # name:seq ids, one without the image column became error rows
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


# -- WebDataset tar shards ------------------------------------------------------------------

# A sample's image: the first of these members it has (img2dataset writes KEY.jpg, or KEY.png /
# KEY.webp with --encode_format)
WDS_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
# seq = the tar's number in the expanded --dataset list * TAR_STRIDE + the sample's position in
# it: the same whatever the shard count, known without opening another tar, and readable
# (12000000345 = tar 12, sample 345)
TAR_STRIDE = 1_000_000_000
# An image member above this is no image to caption (a 64 MP RGBA bitmap, images.MAX_PIXELS,
# is 256 MiB); reading it would only take the host's memory. Captions and metadata: 1 MiB.
MAX_IMAGE_BYTES, MAX_TEXT_BYTES = 256 << 20, 1 << 20
# WebDataset's own rule (webdataset.tariterators.base_plus_ext): a member's key is its path up to
# the first dot of its file name, its suffix the rest
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# what reading a cut, corrupt or unreadable (.gz, .xz) tar raises
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class Tar:
    index: int  # position in the expanded --dataset list (the seq's high part)
    path: str   # absolute
    size: int   # bytes


@register
class WdsReader(Reader):
    """WebDataset tar shards as img2dataset writes them: KEY.jpg (.jpeg, .png, .webp) with
    KEY.txt and/or KEY.json ("caption") per sample. Sharded by tar, balanced by size."""

    kind, usage, needs_target = "wds", "wds:TARS", True

    @classmethod
    def check(cls, spec: SourceSpec) -> None:
        if "://" in spec.target or spec.target.startswith("pipe:"):
            raise SourceError(f"--dataset wds:{spec.target}: reads local tar files (a path, a "
                              "brace pattern or a glob), not URLs or pipes; copy or mount the "
                              "tars and pass their path")

    @classmethod
    def identity_of_files(cls, spec: SourceSpec) -> dict:
        # which tar a seq's high part names, and which tars each shard reads (by size): a tar
        # added, removed or changed in size since rows were written is another dataset
        tars = list_tars(spec.target)
        listing = "\n".join(f"{t.path}\t{t.size}" for t in tars).encode()
        return {"tars": f"{len(tars)} tars, {sum(t.size for t in tars)} bytes, "
                        f"{hashlib.sha256(listing).hexdigest()[:16]}"}

    def records(self) -> Iterator[Record]:
        return self.read()

    def read(self, shard_index: int = 0, num_shards: int = 1) -> Records:
        # a shard opens its own tars only; --limit counts within the shard for the same reason
        tars = list_tars(self.spec.target)
        mine = assign_tars([t.size for t in tars], num_shards)[shard_index]
        return TarRecords([tars[i] for i in mine], self.spec.limit)


def list_tars(pattern: str) -> list[Tar]:
    """The tars of a wds: value, in order: braces expanded ({00000..00331}, {a,b}), then each
    glob matched (sorted); a tar named twice counts once. SourceError, before any engine
    starts, for a tar that does not exist and for a glob that matches none."""
    import braceexpand

    try:
        names = list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError:
        raise SourceError(f"--dataset wds:{pattern}: unbalanced braces; write ranges as "
                          "{00000..00331} and lists as {a,b}") from None
    paths: dict[str, int] = {}
    missing = []
    for name in names:
        found = sorted(glob.glob(name, recursive=True)) if glob.has_magic(name) else [name]
        found = [f for f in found if os.path.isfile(f)]
        if not found:
            missing.append(name)
        for f in found:
            paths.setdefault(os.path.abspath(f), os.stat(f).st_size)
    if missing:
        hint = (f"{missing[0]} is a folder: use wds:{missing[0].rstrip('/')}/*.tar"
                if os.path.isdir(missing[0]) else
                "fix the pattern, or take the tars that are there with a glob (wds:DIR/*.tar)")
        what = (f"no tar files match {pattern!r}" if not paths else
                f"{len(missing)} of the {len(names)} tars of {pattern!r} do not exist "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        raise SourceError(f"--dataset wds: {what}; {hint}")
    return [Tar(i, p, size) for i, (p, size) in enumerate(paths.items())]


def assign_tars(sizes: list[int], num_shards: int) -> list[list[int]]:
    """Tar numbers per shard, balanced by bytes: largest first, each to the shard with the
    fewest bytes so far (ties: the lower number), so every task computes the same split from
    the listing alone; each shard's tars in dataset order. Equal sizes deal out round-robin."""
    loads = [(0, k) for k in range(num_shards)]
    out: list[list[int]] = [[] for _ in range(num_shards)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, k = heapq.heappop(loads)
        out[k].append(i)
        heapq.heappush(loads, (load + sizes[i], k))
    return [sorted(x) for x in out]


class TarRecords(Records):
    """One shard's tars, in order. `resume` passes over the tars already captioned without
    opening them: rows are written in the shard's order, so a tar before the last one with
    rows written was read to its end (its rows then number 0..n-1)."""

    def __init__(self, tars: list[Tar], limit: int | None):
        self.tars, self.limit = tars, limit
        self._split = None
        self._done: dict[int, set[int]] = {}
        self._it = self._samples()  # runs from the first next(), after resume()
        self._total: list[int | None] = []

    def split_at(self, start: int) -> "tuple[list[str], TarRecords]":
        """Nothing to split off: `resume` has passed over every written position already, and
        a shard's seqs (tar number x TAR_STRIDE + position) are not the strided ones the
        default split assumes, so it would swallow unwritten records below `start`."""
        return [], self

    @property
    def total(self) -> int | None:
        """Asked after `resume`, so that a finished tar counts as its rows written, without
        opening it; the others from img2dataset's stats, else their headers."""
        if not self._total:
            last = self._last_started()
            finished = {t.index: len(self._done.get(t.index, ())) for t in self.tars
                        if self._finished(t, last)}
            total = shard_total([t for t in self.tars if t.index not in finished])
            if total is not None:
                total += sum(finished.values())
                total = min(total, self.limit) if self.limit is not None else total
            self._total.append(total)
        return self._total[0]

    def _last_started(self) -> int:
        return max((t.index for t in self.tars if t.index in self._done), default=-1)

    def _finished(self, tar: Tar, last: int) -> bool:
        done = self._done.get(tar.index, ())
        return tar.index < last and (not done or max(done) == len(done) - 1)

    def resume(self, seqs: Iterable[int]) -> "TarRecords":
        for seq in seqs:
            self._done.setdefault(seq // TAR_STRIDE, set()).add(seq % TAR_STRIDE)
        return self

    def _samples(self) -> Iterator[Record]:
        last = self._last_started()
        left = self.limit  # positions of the shard, written ones included (as islice did)
        for tar in self.tars:
            done = self._done.get(tar.index, set())
            if self._finished(tar, last):
                left = None if left is None else left - len(done)
                continue
            for rec in tar_samples(tar, done):
                if left is not None:
                    if left <= 0:
                        return
                    left -= 1
                if rec is not None:
                    yield rec
            if left is not None and left <= 0:
                return


class _Members:
    """A tar's members grouped into samples (consecutive members sharing a key; a suffix the
    sample already has starts another sample with the same key), and how the tar ended:
    `cut` says why it did not end with its end-of-archive marker. tarfile itself stops
    quietly at a header cut short or at garbage, and at a cut between two members: only
    that marker tells a whole tar from one that lost its last samples."""

    def __init__(self, tf: tarfile.TarFile):
        self.tf, self.cut = tf, None

    def groups(self) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
        key, members = None, {}
        while True:
            try:
                m = self.tf.next()
            except _TAR_ERRORS as e:
                self.cut = _why(e)
                break
            if m is None:
                if not self._ends_well():
                    self.cut = "no end-of-archive marker"
                break
            self.tf.members = []  # tarfile keeps every header: 10k-sample tars, flat memory
            match = _KEY_SUFFIX.match(m.name) if m.isreg() else None
            if match is None:  # a folder, a link, a name without a suffix: not a sample's
                continue
            k, suffix = match.group(1), match.group(2).lower()
            if members and (k != key or suffix in members):
                yield key, members
                members = {}
            key, members[suffix] = k, m
        if members:
            yield key, members

    def _ends_well(self) -> bool:
        try:  # where the last member ended, two zero blocks (POSIX; every writer adds them)
            self.tf.fileobj.seek(self.tf.offset)
            return self.tf.fileobj.read(2 * tarfile.BLOCKSIZE) == bytes(2 * tarfile.BLOCKSIZE)
        except _TAR_ERRORS:
            return False


def _why(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _tar_fault(tar: Tar, pos: int, error: str) -> Record:
    """The record that says a tar could not be read (further): one row, under the tar's name."""
    return Record(tar.index * TAR_STRIDE + pos, os.path.basename(tar.path), tar.path, None,
                  error=error)


def tar_samples(tar: Tar, skip: set[int] = frozenset()) -> Iterator[Record | None]:
    """Every sample of one tar, in order, as a Record; None for a position in `skip` (written
    already: its members are not read). A tar that cannot be opened is one error record; a
    tar cut short ends with one more, under the tar's name, after its samples (the one it
    cut is an error record too). How many records a tar gives depends on its headers only,
    never on reading member data, so a resume that skips data sees the same positions."""
    name = os.path.basename(tar.path)
    try:
        tf = tarfile.open(tar.path, "r:*")
    except _TAR_ERRORS as e:
        if 0 not in skip:
            yield _tar_fault(tar, 0, f"unreadable tar: {name} ({_why(e)})")
        return
    with tf:
        members, seen, pos = _Members(tf), {}, 0
        for key, group in members.groups():
            if pos >= TAR_STRIDE:
                raise SourceError(f"{tar.path} holds more than {TAR_STRIDE} samples")
            first = seen.setdefault(key, pos)
            if pos in skip:
                yield None
            else:
                try:
                    rec = _sample(tar, tf, pos, key, group, first)
                except _TAR_ERRORS as e:  # its data is cut short (or corrupt, compressed)
                    rec = Record(tar.index * TAR_STRIDE + pos, key, f"{tar.path}#{key}", None,
                                 error=f"truncated tar: {name} is cut short inside this "
                                       f"sample ({_why(e)})")
                yield rec
            pos += 1
        if members.cut and pos not in skip:
            yield _tar_fault(tar, pos, f"truncated tar: {name} is cut short "
                                       f"({members.cut}) after {pos} samples"
                                       f"{_expected(tar)}; fetch the tar again")


def _expected(tar: Tar) -> str:
    n = _stats_count(tar)
    return f" (its img2dataset stats say {n})" if n is not None else ""


def _sample(tar: Tar, tf: tarfile.TarFile, pos: int, key: str,
            group: dict[str, tarfile.TarInfo], first: int) -> Record:
    seq = tar.index * TAR_STRIDE + pos
    image = next((group[s] for s in WDS_IMAGE_SUFFIXES if s in group), None)
    ref = f"{tar.path}#{image.name if image is not None else key}"
    if first != pos:  # ids must name one row each: the first sample with the key is captioned
        return Record(seq, key, ref, None, error=f"duplicate key: {key} is also sample "
                      f"{first} of {os.path.basename(tar.path)}; only that one is captioned")
    refs = _wds_references(tf, group)
    if image is None:
        return Record(seq, key, ref, None, refs, error="no image in sample: it has "
                      f"{', '.join('.' + s for s in group)}; a sample needs "
                      f"{', '.join('.' + s for s in WDS_IMAGE_SUFFIXES)}")
    if image.size > MAX_IMAGE_BYTES:
        return Record(seq, key, ref, None, refs, error=f"too large: {image.name} is "
                      f"{image.size} bytes (limit {MAX_IMAGE_BYTES})")
    return Record(seq, key, ref, tf.extractfile(image).read(), refs)


def _wds_references(tf: tarfile.TarFile, group: dict[str, tarfile.TarInfo]) -> tuple[str, ...]:
    """KEY.txt, then KEY.json's caption(s) (img2dataset repeats the .txt there): each once."""
    refs: list[str] = []
    if "txt" in group:
        refs.append(tf.extractfile(group["txt"]).read(MAX_TEXT_BYTES)
                    .decode("utf-8", "replace").strip())
    if "json" in group:
        try:
            doc = json.loads(tf.extractfile(group["json"]).read(MAX_TEXT_BYTES))
        except ValueError:  # metadata that is not JSON costs its references, not the image
            doc = None
        if isinstance(doc, dict):
            refs += [c.strip() for c in _captions_of(doc)]
    return tuple(dict.fromkeys(r for r in refs if r))


def _stats_count(tar: Tar) -> int | None:
    """The samples img2dataset wrote to `tar`: "successes" in the NNNNN_stats.json beside it,
    else the rows of NNNNN.parquet whose status is "success"; None without either."""
    stem = os.path.splitext(tar.path)[0]
    try:
        with open(stem + "_stats.json", encoding="utf-8") as f:
            n = json.load(f).get("successes")
        if isinstance(n, int) and n >= 0:
            return n
    except (OSError, ValueError, AttributeError):
        pass
    if not os.path.isfile(stem + ".parquet"):
        return None
    try:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        status = pq.read_table(stem + ".parquet", columns=["status"]).column("status")
        return int(pc.sum(pc.equal(status, "success")).as_py() or 0)
    except Exception:  # not img2dataset's file after all: count the headers instead
        return None


def _header_count(tar: Tar) -> int:
    """Records `tar` gives, from its headers alone (member data is not read)."""
    try:
        with tarfile.open(tar.path, "r:*") as tf:
            members = _Members(tf)
            return sum(1 for _ in members.groups()) + (1 if members.cut else 0)
    except _TAR_ERRORS:
        return 1  # its error record


# Counting samples from headers took 0.46 s for 235 MB of tars on the 2-core dev machine
# (benchmarks/wds_read.py, README), ~8 s for 4 GiB: past that many bytes of tars without
# img2dataset's stats the start would wait on it, and the progress bar goes without a total.
COUNT_HEADERS_BYTES = 4 << 30


def shard_total(tars: list[Tar]) -> int | None:
    """Records the shard's tars give, for the progress bar (a tar cut short may give fewer
    than its stats say): img2dataset's stats where they are, else counted from headers."""
    counts = [_stats_count(t) for t in tars]
    unknown = [t for t, n in zip(tars, counts) if n is None]
    if sum(t.size for t in unknown) > COUNT_HEADERS_BYTES:
        return None
    return sum(n for n in counts if n is not None) + sum(_header_count(t) for t in unknown)
