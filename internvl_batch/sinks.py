"""Sinks: one Parquet file per shard, crash-safe and resumable.

A Parquet file is unreadable until its footer is written, so a single file written
incrementally loses everything on `kill -9`. Instead each committed batch becomes a small
chunk file (written to a temp name, then renamed: a chunk either exists whole or not at all)
under `_parts/<shard>/`. When the shard is done the chunks are streamed, in order, into the
final `part-XXXXX-of-YYYYY.parquet` (again temp + rename) and removed.

Resume reads the ids of the final file (the shard is complete: nothing to do) or of the
chunks (skip them), so a rerun neither duplicates nor loses rows.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

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


def shard_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


SHARD_RE = re.compile(r"part-(\d{5})-of-(\d{5})")  # matches shard_name(): index, count


def _atomic_write_table(table: pa.Table, path: Path, metadata: dict | None = None):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if metadata:
        table = table.replace_schema_metadata({META_KEY: json.dumps(metadata).encode()})
    pq.write_table(table, tmp, row_group_size=ROW_GROUP)
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

    # -- resume -------------------------------------------------------------------------
    def is_complete(self) -> bool:
        return self.final.is_file()

    def _chunks(self) -> list[Path]:
        if not self.parts.is_dir():
            return []
        return sorted(self.parts.glob("chunk-*.parquet"))

    def done_ids(self) -> set[str]:
        if self.is_complete():
            return set(pq.read_table(self.final, columns=["id"]).column("id").to_pylist())
        ids: set[str] = set()
        for c in self._chunks():
            ids.update(pq.read_table(c, columns=["id"]).column("id").to_pylist())
        return ids

    def previous_stats(self) -> list[dict]:
        if self.partial_stats.is_file():
            return json.loads(self.partial_stats.read_text()).get("runs", [])
        return []

    # -- writing ------------------------------------------------------------------------
    def open(self):
        self.output.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(parents=True, exist_ok=True)
        # a writer killed mid-chunk, or between finalize() and commit()
        for stale in [*self.parts.glob(".*.tmp*"), *self.output.glob(f".{self.name}.parquet.tmp*")]:
            stale.unlink(missing_ok=True)
        chunks = self._chunks()
        self._next = int(chunks[-1].stem.split("-")[1]) + 1 if chunks else 0
        return self

    def write(self, rows: list[dict]):
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        _atomic_write_table(table, self.parts / f"chunk-{self._next:06d}.parquet")
        self._next += 1
        self.rows_written += len(rows)

    def save_partial_stats(self, runs: list[dict]):
        tmp = self.partial_stats.with_suffix(".tmp")
        tmp.write_text(json.dumps({"runs": runs}, indent=2))
        os.replace(tmp, self.partial_stats)

    def finalize(self, metadata: dict) -> int:
        """Stream chunks into the final file (under a temp name) in seq order; return its row
        count. `commit()` makes it visible: the caller writes stats.json in between, so a
        complete-looking shard always has its stats."""
        chunks = self._chunks()
        tmp = self.final.with_name(f".{self.final.name}.tmp{os.getpid()}")
        schema = SCHEMA.with_metadata({META_KEY: json.dumps(metadata).encode()})
        total, last_seq, ordered = 0, -1, True
        with pq.ParquetWriter(tmp, schema) as w:
            for c in chunks:
                t = pq.read_table(c, schema=SCHEMA)
                seqs = t.column("seq").to_pylist()
                if seqs and (seqs[0] <= last_seq or seqs != sorted(seqs)):
                    ordered = False
                    break
                last_seq = seqs[-1] if seqs else last_seq
                w.write_table(t, row_group_size=ROW_GROUP)
                total += t.num_rows
        if not ordered:  # only after odd resumes: fall back to an in-memory sort
            t = pa.concat_tables([pq.read_table(c, schema=SCHEMA) for c in chunks])
            t = t.sort_by("seq")
            pq.write_table(t.replace_schema_metadata(schema.metadata), tmp,
                           row_group_size=ROW_GROUP)
            total = t.num_rows
        self._pending = tmp
        return total

    def commit(self):
        _fsync_rename(self._pending, self.final)
        shutil.rmtree(self.parts, ignore_errors=True)
        try:
            (self.output / "_parts").rmdir()
        except OSError:
            pass


def read_metadata(path: Path) -> dict:
    md = pq.read_schema(path).metadata or {}
    return json.loads(md.get(META_KEY, b"{}"))


def read_rows(paths: Iterable[Path], columns: list[str] | None = None) -> pa.Table:
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])
