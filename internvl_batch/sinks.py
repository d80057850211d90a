"""Sinks: one Parquet file per shard, crash-safe and resumable.

A Parquet file is unreadable until its footer is written, so a single file written
incrementally loses everything on `kill -9`. Instead each committed batch becomes a small
chunk file (written to a temp name, then renamed: a chunk either exists whole or not at all)
under `_parts/<shard>/`. When the shard is done the chunks are streamed, in order, into the
final `part-XXXXX-of-YYYYY.parquet` (again temp + rename) and removed.

Resume reads the (seq, id) keys of the chunks and skips those records, so a rerun neither
duplicates nor loses rows; every INDEX_EVERY chunks the writer also writes their keys as one
index segment, so that a resume opens a few files, not thousands. Not the id alone:
datasets repeat ids (one row per caption, an `image_id` column), and every row with an id
must not count as done because one of them is.
Chunks and the final file record the settings fingerprint (`fingerprint.py`), the dataset
included (so a seq names the same record in every run), and a rerun with other settings is
refused instead of mixing captions; one writer at a time is `outlock.py`'s job, and as a
last guard `finalize`/`commit` refuse to replace a final file by one with fewer rows,
whatever the cause.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .config import ConfigError

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("seq", pa.int64()),
    ("image_ref", pa.string()),
    ("references", pa.list_(pa.string())),
    ("prompt", pa.string()),
    ("caption", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("image_tokens", pa.int32()),
    ("tiles", pa.int32()),
    ("output_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("error", pa.string()),
])
META_KEY = b"internvl_batch"
ROW_GROUP = 8192
# chunks per index segment: a resume at a million rows (~3,900 chunks of 256) opens ~16
# segments and the chunks after the last one instead of every chunk (docs/performance.md)
INDEX_EVERY = 256


class WriteFailed(Exception):
    """The output could not be written (disk full, quota, permissions, a lost mount). What
    was committed before is intact: chunks are renamed into place whole or not at all."""


def _writes(fn):
    """OSError from writing `fn`'s files becomes WriteFailed naming the folder."""
    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        try:
            return fn(self, *a, **kw)
        except OSError as e:
            raise WriteFailed(f"cannot write {self.output}: "
                              f"{e.strerror or str(e).splitlines()[0]}") from e
    return wrapper


class FewerRows(ConfigError):
    """Publishing would replace a final file by one with fewer rows (exit 2, nothing changed)."""


class Unreadable(ConfigError):
    """A chunk or final file that is not whole Parquet. Ours never are (temp + rename), so
    something else cut or replaced it: a copy, a sync, a full disk outside this tool. One
    line, exit 2, nothing changed: which file, and what to do."""


@contextlib.contextmanager
def reading(path: Path):
    """pyarrow's errors reading `path` (no footer, cut, not Parquet) as Unreadable; a file
    that is not there stays FileNotFoundError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as e:
        chunk = path.parent.parent.name == "_parts"
        todo = ("move it away and rerun: its rows are captioned again" if chunk else
                "rerun this shard with --overwrite")
        raise Unreadable(f"cannot read {path} ({first_line(e)}): it is not a whole Parquet "
                         f"file; {todo}") from None


def first_line(e: BaseException) -> str:
    """An exception's first line of text for a one-line message (pyarrow's run to many)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def shard_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


SHARD_RE = re.compile(r"part-(\d{5})-of-(\d{5})")  # matches shard_name(): index, count


def _atomic_write_table(table: pa.Table, path: Path, metadata: dict | None = None, **kw):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if metadata:
        table = table.replace_schema_metadata({META_KEY: json.dumps(metadata).encode()})
    pq.write_table(table, tmp, row_group_size=ROW_GROUP, **kw)
    _fsync_rename(tmp, path)


def _fsync_rename(tmp: Path, path: Path):
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class ShardWriter:
    def __init__(self, output: Path, index: int, count: int):
        self.output = Path(output)
        self.name = shard_name(index, count)
        self.final = self.output / f"{self.name}.parquet"
        self.parts = self.output / "_parts" / self.name
        self.stats_path = self.output / f"{self.name}.stats.json"
        self.partial_stats = self.parts / "stats.partial.json"
        self.rows_written = 0
        self.fingerprint: dict | None = None  # recorded in every chunk and the final file
        self.lock = None  # an outlock.ShardLock: nothing is written once it is lost
        self.counts: dict | None = None  # the whole shard's row counts, set by finalize()
        self._pending: Path | None = None  # finalize()'s file, until commit() publishes it
        self._scanned = None  # _scan()'s result, until this writer changes the files
        self._recent: dict[int, tuple] = {}  # chunk number -> ((seq, id), fingerprint)

    # -- resume -------------------------------------------------------------------------
    def is_complete(self) -> bool:
        return self.final.is_file()

    def _numbered_chunks(self) -> list[tuple[int, Path]]:
        """(number, file) of the chunks in the order written: by number (past chunk-999999
        the names have 7 digits, and a string sort would put them first)."""
        if not self.parts.is_dir():
            return []
        found = []
        for c in self.parts.glob("chunk-*.parquet"):
            num = c.stem.split("-", 1)[1]
            if num.isdigit():
                found.append((int(num), c))
        return sorted(found)

    def _chunks(self) -> list[Path]:
        return [c for _, c in self._numbered_chunks()]

    def _scan(self) -> tuple[pa.Table, list[tuple[Path, dict | None]]]:
        """(seq and id of every row written, sorted by seq; (file, fingerprint) for each
        distinct fingerprint) of the final file, else of the chunks, through the index
        segments where they are whole (`_segments`). Only the two key columns are read, and
        kept as Arrow columns, not a million Python tuples. Cached until this writer writes
        or removes files."""
        if self._scanned is None:
            if self.is_complete():
                keys, fps = _keys_of([self.final])
            else:
                chunks = self._numbered_chunks()
                segs = self._segments({n for n, _ in chunks})
                covered = {n for a, b, _ in segs for n in range(a, b + 1)}
                keys, fps = _keys_of([c for n, c in chunks if n not in covered],
                                     [seg for _, _, seg in segs])
            self._scanned = (keys, fps)
        return self._scanned

    def _segments(self, present: set[int]) -> list[tuple[int, int, tuple]]:
        """The index segments (first chunk, last chunk, (file, keys, fingerprints)) that read and
        whose every chunk is still here: a chunk moved away (an unreadable one, as its error
        says to) voids its segment, and so does a segment that does not read; those chunks
        are read one by one instead."""
        out = []
        for f in sorted(self.parts.glob("index-*.parquet")) if self.parts.is_dir() else ():
            m = re.fullmatch(r"index-(\d+)-(\d+)", f.stem)
            if not m or not all(n in present for n in range(int(m[1]), int(m[2]) + 1)):
                continue
            try:
                with pq.ParquetFile(f) as pf:
                    md = json.loads((pf.schema_arrow.metadata or {}).get(META_KEY, b"{}"))
                    out.append((int(m[1]), int(m[2]),
                                (f, pf.read(columns=["seq", "id"]), md["fingerprints"])))
            except (pa.ArrowException, OSError, ValueError, KeyError):
                continue
        return out

    def _index_segment(self, last: int) -> None:
        """Chunks last-INDEX_EVERY+1 .. last, as one index segment: their (seq, id) and
        distinct fingerprints in one small file, so that a resume opens one file where it
        would open INDEX_EVERY. Derived data: a segment that cannot be written or read is
        only slower, never wrong (`_segments`, `_keys_of`)."""
        first = last - INDEX_EVERY + 1
        mine = {n: self._recent.pop(n) for n in range(first, last + 1) if n in self._recent}
        others = [c for n, c in self._numbered_chunks() if first <= n <= last and n not in mine]
        if len(mine) + len(others) != INDEX_EVERY:
            return  # a chunk missing from the range: no segment, its chunks are read instead
        keys, fps = _keys_of(others, [(None, k, [fp]) for k, fp in mine.values()])
        meta = {"fingerprints": [fp for _, fp in fps]}
        try:
            # ids are unique: a dictionary would only cost memory while writing
            _atomic_write_table(keys, self.parts / f"index-{first:06d}-{last:06d}.parquet",
                                meta, use_dictionary=False)
        except OSError:
            pass

    def forget_index(self) -> None:
        """Drop the cached keys, and give back to the OS what reading them left in Arrow's
        memory pool (mimalloc keeps freed pages otherwise, and the whole run would carry
        them: ~100 MB after indexing a million rows)."""
        self._scanned = None
        pa.default_memory_pool().release_unused()

    def written(self) -> "Written":
        """The (seq, id) of every row written, as an index a resume skips by."""
        return Written(self._scan()[0])

    def done_keys(self) -> set[tuple[int, str]]:
        """(seq, id) of every row written: of the final file, else of the chunks."""
        t = self._scan()[0]
        return set(zip(t.column("seq").to_pylist(), t.column("id").to_pylist()))

    def done_ids(self) -> set[str]:
        return {i for _, i in self.done_keys()}

    def recorded_fingerprints(self) -> list[tuple[Path, dict | None]]:
        """(file, its fingerprint) for the final file, or each chunk with a distinct one."""
        return self._scan()[1]

    def check_settings(self, fp: dict) -> None:
        """Raise fingerprint.SettingsChanged if rows already written used other settings."""
        from .fingerprint import check

        for f, old in self.recorded_fingerprints():
            where = f"{self.output} ({self.name}{'' if f == self.final else ', unfinished'})"
            check(old, fp, where)

    def clear(self) -> list[Path]:
        """--overwrite: remove this shard's rows, chunks and stats (the caller holds the lock)."""
        self._scanned = None
        gone = [p for p in (self.final, self.stats_path, self.parts) if p.exists()]
        self.final.unlink(missing_ok=True)
        self.stats_path.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)
        return gone

    def final_counts(self) -> dict:
        """Row, error and token counts of the final file (stats.count_rows)."""
        from .stats import count_rows

        with reading(self.final):
            t = pq.read_table(self.final, columns=[
                "error", "prompt_tokens", "image_tokens", "output_tokens"])
        return count_rows(t)

    def final_rows(self) -> int:
        try:
            with reading(self.final):
                return pq.read_metadata(self.final).num_rows
        except FileNotFoundError:
            return 0

    def _guard(self, rows: int):
        if self.lock is not None:
            self.lock.check()
        have = self.final_rows()
        if rows < have:
            raise FewerRows(f"refusing to replace {self.final} ({have} rows) by {rows} rows "
                            "(another run finished this shard?); nothing was changed")

    def previous_stats(self) -> list[dict]:
        """Earlier runs' timings. Not fsynced (rewritten after every batch): after a power
        loss it may be empty or cut; then the timings are lost, never the rerun. Row, error
        and token counts come from the rows themselves."""
        try:
            runs = json.loads(self.partial_stats.read_text()).get("runs", [])
        except (OSError, ValueError, AttributeError):
            return []
        return runs if isinstance(runs, list) else []

    # -- writing ------------------------------------------------------------------------
    def open(self):
        self._scanned = None
        self.output.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(parents=True, exist_ok=True)
        # a writer killed mid-chunk, or between finalize() and commit()
        for stale in [*self.parts.glob(".*.tmp*"), *self.output.glob(f".{self.name}.parquet.tmp*")]:
            stale.unlink(missing_ok=True)
        chunks = self._numbered_chunks()
        self._next = chunks[-1][0] + 1 if chunks else 0
        return self

    @_writes
    def write(self, rows: list[dict]):
        if not rows:
            return
        self._scanned = None
        if self.lock is not None:
            # re-read the lock file, not only the heartbeat's flag: a run that took the lock
            # over between heartbeats would otherwise get chunks of ours under its numbers
            self.lock.check()  # raises: another run owns this shard now
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        _atomic_write_table(table, self.parts / f"chunk-{self._next:06d}.parquet",
                            {"fingerprint": self.fingerprint} if self.fingerprint else None)
        # the keys of this writer's chunks until their segment is written: one re-read less
        self._recent[self._next] = (table.select(["seq", "id"]), self.fingerprint)
        if (self._next + 1) % INDEX_EVERY == 0:
            self._index_segment(self._next)
        self._next += 1
        self.rows_written += len(rows)

    @_writes
    def save_partial_stats(self, runs: list[dict]):
        self.parts.mkdir(parents=True, exist_ok=True)  # a run's start is saved before open()
        tmp = self.partial_stats.with_suffix(".tmp")
        tmp.write_text(json.dumps({"runs": runs}, indent=2))
        os.replace(tmp, self.partial_stats)

    @_writes
    def finalize(self, metadata: dict) -> int:
        """Stream chunks into the final file (under a temp name) in seq order; return its row
        count. `commit()` makes it visible: the caller writes stats.json in between, so a
        complete-looking shard always has its stats. Sets `counts` (the whole shard's rows,
        errors and tokens, however many runs wrote them). Raises FewerRows, before anything
        is written, if a final file with more rows exists."""
        self._guard(0)  # a lost lock: stop before reading anything
        if self.fingerprint is not None:
            metadata = {**metadata, "fingerprint": self.fingerprint}
        chunks = self._chunks()
        tmp = self.final.with_name(f".{self.final.name}.tmp{os.getpid()}")
        schema = SCHEMA.with_metadata({META_KEY: json.dumps(metadata).encode()})
        try:
            total = self._stream(chunks, tmp, schema)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a half file the size of the shard, on a full disk
            raise
        self._pending = tmp
        try:
            self._guard(total)
        except Exception:
            tmp.unlink(missing_ok=True)
            raise
        return total

    def _stream(self, chunks: list[Path], tmp: Path, schema) -> int:
        from .stats import count_rows

        total, last_seq, ordered, counts = 0, -1, True, None
        group: list[pa.Table] = []  # chunks of one row group: a group per chunk made a
        with pq.ParquetWriter(tmp, schema) as w:  # million-row file's footer 6 MB
            for c in chunks:
                with reading(c):
                    t = pq.read_table(c, schema=SCHEMA)
                seqs = t.column("seq").to_pylist()
                if seqs and (seqs[0] <= last_seq or seqs != sorted(seqs)):
                    ordered = False
                    break
                last_seq = seqs[-1] if seqs else last_seq
                group.append(t)
                if sum(g.num_rows for g in group) >= ROW_GROUP:
                    w.write_table(pa.concat_tables(group), row_group_size=ROW_GROUP)
                    group = []
                total += t.num_rows
                counts = count_rows(t, counts)
            if group and ordered:
                w.write_table(pa.concat_tables(group), row_group_size=ROW_GROUP)
        if not ordered:  # only after odd resumes: fall back to an in-memory sort
            t = pa.concat_tables([pq.read_table(c, schema=SCHEMA) for c in chunks])
            t = t.sort_by("seq")
            pq.write_table(t.replace_schema_metadata(schema.metadata), tmp,
                           row_group_size=ROW_GROUP)
            total = t.num_rows
            counts = count_rows(t)
        self.counts = counts if total else count_rows(None)
        return total

    def abandon(self):
        """Drop the file `finalize()` made, unpublished (the stats could not be written)."""
        if self._pending is not None:
            self._pending.unlink(missing_ok=True)
            self._pending = None

    @_writes
    def commit(self):
        self._scanned = None
        n = pq.read_metadata(self._pending).num_rows
        try:
            self._guard(n)  # again: finalize() and commit() are apart by the stats write
        except Exception:
            self._pending.unlink(missing_ok=True)
            raise
        _fsync_rename(self._pending, self.final)
        shutil.rmtree(self.parts, ignore_errors=True)
        try:
            (self.output / "_parts").rmdir()
        except OSError:
            pass


def _keys_of(files: list[Path], segments: list[tuple] = ()) -> tuple[pa.Table, list]:
    """(seq and id of every row of `files` and of the index segments already read
    ((file, keys, fingerprints) each), (file, fingerprint) for each distinct fingerprint).
    One open per file."""
    tables, fps, seen = [], [], set()

    def note(f: Path, fp) -> None:
        key = json.dumps(fp, sort_keys=True)
        if key not in seen:
            seen.add(key)
            fps.append((f, fp))

    for seg, keys, seg_fps in segments:
        tables.append(keys)
        for fp in seg_fps:
            note(seg, fp)
    for f in files:
        with reading(f):
            with pq.ParquetFile(f) as pf:
                md = json.loads((pf.schema_arrow.metadata or {}).get(META_KEY, b"{}"))
                tables.append(pf.read(columns=["seq", "id"]))
        note(f, md.get("fingerprint"))
    keys = pa.concat_tables(tables) if tables else pa.table(
        {"seq": pa.array([], pa.int64()), "id": pa.array([], pa.string())})
    return keys, fps


class Written:
    """The (seq, id) of a shard's rows, sorted by seq: what a resume skips.

    Rows are written in seq order, so most of what a resume skips is a prefix of the shard's
    records (seq = shard_index, shard_index + num_shards, ...); `prefix_end` finds where it
    ends, sources skip that prefix without building its records (sources.Records.split_at),
    and only the few rows past it (batches written out of order) are looked up one by one."""

    def __init__(self, table: pa.Table | None = None):
        import numpy as np

        if table is None:
            table = pa.table({"seq": pa.array([], pa.int64()), "id": pa.array([], pa.string())})
        chunks = table.column("seq").chunks
        self.seqs = np.concatenate([c.to_numpy() for c in chunks]) if chunks else \
            np.zeros(0, np.int64)
        self.ids = table.column("id")  # chunked as read: no copy of a million ids
        if len(self.seqs) > 1 and not (self.seqs[1:] > self.seqs[:-1]).all():  # odd resumes
            order = np.argsort(self.seqs, kind="stable")
            self.seqs, self.ids = self.seqs[order], self.ids.take(pa.array(order))

    def __len__(self) -> int:
        return len(self.seqs)

    def prefix(self, shard_index: int, num_shards: int) -> int:
        """How many of the shard's first records (in seq order) are all written. The shard's
        seqs are shard_index + num_shards * j, written ones unique and sorted, so seqs[j]
        equals that exactly up to the first gap and exceeds it from there on: a binary
        search, with no array the size of the index."""
        lo, hi = 0, len(self.seqs)
        while lo < hi:
            mid = (lo + hi) // 2
            if int(self.seqs[mid]) == shard_index + num_shards * mid:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def after(self, k: int) -> dict[int, str]:
        """{seq: id} of the rows past the first `k` (the prefix)."""
        return dict(zip(self.seqs[k:].tolist(), self.ids.slice(k).to_pylist()))


def read_metadata(path: Path) -> dict:
    with reading(path):
        md = pq.read_schema(path).metadata or {}
    return json.loads(md.get(META_KEY, b"{}"))


def read_rows(paths: Iterable[Path], columns: list[str] | None = None) -> pa.Table:
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])
