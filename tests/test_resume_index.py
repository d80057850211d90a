"""A resume skips what is written by an index of (seq, id), not by building every record
before its place: the source lists ids (Parquet: the id column only) and the records from
the first one not written."""
from __future__ import annotations

import io
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from internvl_batch import sources
from internvl_batch.pipeline import DatasetChanged, resume
from internvl_batch.sinks import ShardWriter, Written
from internvl_batch.sources import SourceSpec, open_source


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _parquet(tmp_path, n: int = 1000, files: int = 2, group: int = 100, ids=True):
    img = _jpeg()
    per = n // files
    for f in range(files):
        seqs = range(f * per, (f + 1) * per)
        cols = {"image": [img] * per, "text": [f"cap {s}" for s in seqs]}
        if ids == "int":
            cols["key"] = [10_000 + s for s in seqs]
        elif ids:
            cols["key"] = [f"k{s:05d}" for s in seqs]
        pq.write_table(pa.table(cols), tmp_path / f"p{f}.parquet", row_group_size=group)
    opts = {"caption_column": "text"} | ({"id_column": "key"} if ids else {})
    return f"parquet:{tmp_path}/p*.parquet", opts


@pytest.mark.parametrize("ids", [True, "int", False])
@pytest.mark.parametrize("shard", [(0, 1), (1, 3)])
@pytest.mark.parametrize("limit", [None, 700])
@pytest.mark.parametrize("start", [0, 1, 450, 500, 777, 1000, 5000])
def test_parquet_split_matches_reading_through(tmp_path, ids, shard, limit, start):
    dataset, opts = _parquet(tmp_path, ids=ids)
    spec = SourceSpec.parse(dataset, limit=limit, **opts)
    every = list(open_source(spec, *shard))
    fast_ids, fast_rest = open_source(spec, *shard).split_at(start)
    fast_ids = fast_ids.to_pylist()  # an Arrow array: no Python string per row
    assert fast_ids == [r.id for r in every if r.seq < start]
    rest = list(fast_rest)
    assert [(r.seq, r.id, r.references) for r in rest] == [
        (r.seq, r.id, r.references) for r in every if r.seq >= start]
    assert all(r.payload == every[0].payload for r in rest)
    # the generic way (a reader that cannot list ids) agrees
    slow = sources.Records(iter(open_source(spec, *shard)), None)
    slow_ids, slow_rest = slow.split_at(start)
    assert slow_ids == fast_ids and [r.seq for r in slow_rest] == [r.seq for r in rest]


def test_a_resume_builds_no_record_of_the_written_prefix(tmp_path, monkeypatch):
    """900 of 1,000 rows written: the 900 records before are neither read (their image
    bytes) nor built; one batch of the row group holding the first one not written is."""
    dataset, opts = _parquet(tmp_path)
    spec = SourceSpec.parse(dataset, **opts)
    every = list(open_source(spec))
    w = ShardWriter(tmp_path / "out", 0, 1).open()
    for lo in range(0, 900, 256):
        w.write([{"id": r.id, "seq": r.seq} for r in every[lo:min(900, lo + 256)]])
    built = []
    real = sources._payload_of
    monkeypatch.setattr(sources, "_payload_of", lambda v, b: built.append(1) or real(v, b))
    mine = list(resume(open_source(spec), ShardWriter(tmp_path / "out", 0, 1).written(), 0, 1,
                       tmp_path / "out"))
    assert [r.seq for r in mine] == list(range(900, 1000))
    assert len(built) == 100


def test_a_changed_dataset_is_found_in_the_prefix_before_any_row(tmp_path):
    """An id changed at a written position: found by the index check, up front (before
    the engines start), naming the position."""
    dataset, opts = _parquet(tmp_path, files=1)
    spec = SourceSpec.parse(dataset, **opts)
    every = list(open_source(spec))
    w = ShardWriter(tmp_path / "out", 0, 1).open()
    w.write([{"id": r.id if r.seq != 123 else "someone else", "seq": r.seq}
             for r in every[:300]])
    with pytest.raises(DatasetChanged, match="record 123 is now 'k00123', the row written for "
                                             "it is 'someone else'"):
        resume(open_source(spec), ShardWriter(tmp_path / "out", 0, 1).written(), 0, 1,
               tmp_path / "out")


def test_rows_past_the_prefix_are_skipped_one_by_one(tmp_path):
    """Written out of order (a gap at seq 5): the prefix ends there, and the rows after
    the gap are still skipped, and checked, by position."""
    dataset, opts = _parquet(tmp_path, n=20, files=1, group=4)
    spec = SourceSpec.parse(dataset, **opts)
    every = list(open_source(spec))
    written = Written(pa.table({"seq": pa.array([0, 1, 2, 3, 4, 6, 9], pa.int64()),
                                "id": [every[s].id for s in (0, 1, 2, 3, 4, 6, 9)]}))
    assert written.prefix(0, 1) == 5 and written.after(5) == {6: "k00006", 9: "k00009"}
    mine = resume(open_source(spec), written, 0, 1, tmp_path)
    assert [r.seq for r in mine] == [5, 7, 8] + list(range(10, 20))
    # a shard of three: its records are seqs 1, 4, 7, ...
    assert Written(pa.table({"seq": pa.array([1, 4, 10], pa.int64()),
                             "id": ["a", "b", "c"]})).prefix(1, 3) == 2
    bad = Written(pa.table({"seq": pa.array([0, 1, 6], pa.int64()), "id": ["k00000", "k00001",
                                                                            "x"]}))
    with pytest.raises(DatasetChanged, match="record 6 is now 'k00006'"):
        list(islice(resume(open_source(spec), bad, 0, 1, tmp_path), 20))


# -- index segments: a resume opens one file per INDEX_EVERY chunks --------------------------------

def _rows(lo: int, hi: int) -> list[dict]:
    return [{"id": f"id{s}", "seq": s} for s in range(lo, hi)]


def _opened(monkeypatch) -> list[str]:
    from internvl_batch import sinks

    names, real = [], sinks.pq.ParquetFile

    def spy(path, *a, **k):
        names.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(sinks.pq, "ParquetFile", spy)
    return names


def test_index_segments_stand_for_their_chunks(tmp_path, monkeypatch):
    from internvl_batch import sinks

    monkeypatch.setattr(sinks, "INDEX_EVERY", 4)
    w = ShardWriter(tmp_path, 0, 1)
    w.fingerprint = {"prompt": "a"}
    w.open()
    for c in range(10):
        w.write(_rows(3 * c, 3 * c + 3))
    parts = tmp_path / "_parts" / "part-00000-of-00001"
    assert sorted(p.name for p in parts.glob("index-*")) == [
        "index-000000-000003.parquet", "index-000004-000007.parquet"]
    opened = _opened(monkeypatch)
    again = ShardWriter(tmp_path, 0, 1)
    assert again.done_keys() == {(s, f"id{s}") for s in range(30)}
    assert sorted(opened) == ["chunk-000008.parquet", "chunk-000009.parquet",
                              "index-000000-000003.parquet", "index-000004-000007.parquet"]
    # a resumed writer completes the next segment from chunks 8-9 on disk and its own 10-11
    again.open().write(_rows(30, 33))
    again.write(_rows(33, 36))
    assert (parts / "index-000008-000011.parquet").is_file()
    assert ShardWriter(tmp_path, 0, 1).done_keys() == {(s, f"id{s}") for s in range(36)}


def test_a_segment_without_all_its_chunks_is_not_used(tmp_path, monkeypatch):
    """A chunk moved away (what an unreadable chunk's error says to do) must come back as
    rows to caption, not stay 'written' through its segment; a segment that does not read
    is only slower."""
    from internvl_batch import sinks

    monkeypatch.setattr(sinks, "INDEX_EVERY", 4)
    w = ShardWriter(tmp_path, 0, 1).open()
    for c in range(8):
        w.write(_rows(2 * c, 2 * c + 2))
    parts = tmp_path / "_parts" / "part-00000-of-00001"
    (parts / "chunk-000002.parquet").rename(tmp_path / "moved.parquet")
    (parts / "index-000004-000007.parquet").write_bytes(b"not parquet")
    keys = ShardWriter(tmp_path, 0, 1).done_keys()
    assert keys == {(s, f"id{s}") for s in range(16) if s not in (4, 5)}


def test_settings_of_a_chunk_inside_a_segment_are_still_checked(tmp_path, monkeypatch):
    from internvl_batch import sinks
    from internvl_batch.fingerprint import SettingsChanged

    monkeypatch.setattr(sinks, "INDEX_EVERY", 2)
    w = ShardWriter(tmp_path, 0, 1)
    w.fingerprint = {"prompt": "a"}
    w.open().write(_rows(0, 2))
    w.fingerprint = {"prompt": "b"}  # as a run with another prompt would write
    w.write(_rows(2, 4))
    assert (tmp_path / "_parts" / "part-00000-of-00001" / "index-000000-000001.parquet").is_file()
    again = ShardWriter(tmp_path, 0, 1)
    assert [fp for _, fp in again.recorded_fingerprints()] == [{"prompt": "a"}, {"prompt": "b"}]
    with pytest.raises(SettingsChanged):
        again.check_settings({"prompt": "a"})


def test_the_final_file_has_whole_row_groups(tmp_path):
    """One row group per chunk (per batch) made a million-row file's footer 6 MB, a tenth
    of the file; chunks are now gathered into row groups of sinks.ROW_GROUP rows."""
    from internvl_batch.sinks import ROW_GROUP

    w = ShardWriter(tmp_path, 0, 1).open()
    for c in range(40):
        w.write(_rows(256 * c, 256 * c + 256))
    assert w.finalize({}) == 10_240
    w.commit()
    md = pq.read_metadata(w.final)
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [ROW_GROUP, 2_048]
    assert pq.read_table(w.final).column("seq").to_pylist() == list(range(10_240))
