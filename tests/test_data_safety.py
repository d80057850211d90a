"""Rows neither lost nor mixed, bad input as one line: the holes a read-through found.
Each test reproduces one: a resume that skipped every row of a repeated id, a
rerun on another dataset that published the first one's captions as its own, a file name
that is not UTF-8 failing every rerun at the same chunk, merge joining shards of two
prompts, a writer that kept writing after losing its lock, tracebacks for a glob that
matches a non-Parquet file, signals before the batches' handler, chunk numbers past
999,999, a full disk. No vLLM: the fake engine of test_sinks_stats."""
from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from internvl_batch import fingerprint, outlock, sinks
from internvl_batch.config import EngineSpec, PromptSpec, RunConfig
from internvl_batch.fingerprint import SettingsChanged
from internvl_batch.merge import merge_output
from internvl_batch.outlock import OutputBusy, ShardLock
from internvl_batch.outputs import OutputError, open_output
from internvl_batch.sinks import ShardWriter
from internvl_batch.sources import SourceError, SourceSpec, open_source
from tests.test_sinks_stats import FakeEngine, fake_engine, row  # noqa: F401

NAME = "part-00000-of-00001"
ROOT = Path(__file__).resolve().parents[1]


def _png(shade: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def _cfg(tmp_path, dataset: str, out: Path, batch_size: int = 2, **src) -> RunConfig:
    return RunConfig(source=SourceSpec.parse(dataset, **src), engine=EngineSpec(model="m"),
                     output=out, cache_dir=tmp_path / "cache", progress=False, workers=0,
                     batch_size=batch_size, max_error_rate=1.0)


class DyingEngine(FakeEngine):
    """Serves `batches` batches, then dies as a crashed vLLM engine would."""

    def __init__(self, batches: int):
        super().__init__()
        self.left = batches

    def imap(self, work, sampling):
        from internvl_batch.engine import EngineDead

        for tag, reqs in work:
            if self.left == 0:
                raise EngineDead("fake engine death")
            self.left -= 1
            yield tag, self.generate(reqs, sampling)


def _run(cfg: RunConfig, engine=None) -> int:
    from internvl_batch import pipeline

    entry = types.SimpleNamespace(hit=True, key="k", fields={"model_config_hash": "h"})
    return pipeline.run(cfg, log=lambda m: None, started=(engine or FakeEngine(), entry))


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / f"{NAME}.parquet").to_pylist()


# -- resume by position and id --------------------------------------------------------------------

def test_resume_keeps_every_row_of_a_repeated_id(tmp_path):
    """One row per caption, `--id-column image_id`: ids repeat. A resume that skipped by id
    alone dropped every row whose id had one row written (5 of 6 rows came back)."""
    ids = [1, 1, 2, 2, 3, 3]
    pq.write_table(pa.table({"image": [_png(40 * i) for i in ids], "image_id": ids,
                             "text": [f"caption {k}" for k in range(6)]}),
                   tmp_path / "caps.parquet")
    spec = dict(id_column="image_id", caption_column="text")
    out = tmp_path / "out"
    src = f"parquet:{tmp_path}/caps.parquet"
    assert _run(_cfg(tmp_path, src, out, batch_size=3, **spec), DyingEngine(1)) == 4
    assert _run(_cfg(tmp_path, src, out, batch_size=2, **spec)) == 0
    rows = _rows(out)
    assert [(r["seq"], r["id"], r["references"]) for r in rows] == [
        (k, str(i), [f"caption {k}"]) for k, i in enumerate(ids)]


def test_chunks_past_999999_keep_their_order(tmp_path):
    """chunk-1000000 sorts before chunk-999999 as a string: the next chunk took the number
    1000000 again and replaced it, losing its row."""
    w = ShardWriter(tmp_path, 0, 1).open()
    for n, seq in ((999999, 0), (1000000, 1)):
        w._next = n
        w.write([row(seq)])
    again = ShardWriter(tmp_path, 0, 1).open()
    assert again._next == 1000001
    again.write([row(2)])
    assert again.done_ids() == {"id0", "id1", "id2"}
    again.finalize({})
    again.commit()
    assert [r["seq"] for r in pq.read_table(again.final).to_pylist()] == [0, 1, 2]


# -- the dataset is part of the settings ------------------------------------------------------------

def _folder(path: Path, shade: int, n: int = 4) -> Path:
    path.mkdir(parents=True)
    for k in range(n):
        (path / f"img{k}.png").write_bytes(_png(shade))
    return path


def test_another_dataset_into_the_same_output_is_refused(tmp_path):
    """Same file names in two folders: the second run skipped the second folder's images by
    the first one's ids and published those captions (exit 0)."""
    a, b = _folder(tmp_path / "red", 200), _folder(tmp_path / "blue", 20)
    out = tmp_path / "out"
    assert _run(_cfg(tmp_path, f"folder:{a}", out), DyingEngine(1)) == 4
    with pytest.raises(SettingsChanged, match=r"--dataset 'folder:.*red' -> 'folder:.*blue'"):
        _run(_cfg(tmp_path, f"folder:{b}", out))
    assert _run(_cfg(tmp_path, f"folder:{a}", out)) == 0  # the same one resumes
    # finished: a larger --limit is not "nothing to do" but a change, named
    with pytest.raises(SettingsChanged, match=r"--limit None -> 2"):
        _run(_cfg(tmp_path, f"folder:{a}", out, limit=2))


def test_a_dataset_changed_under_a_resume_is_refused_not_captioned_twice(tmp_path):
    """A file added before the ones written shifted every position: the resume skipped by
    (seq, id), captioned img0..img3 again under new positions and exited 0 with 9 rows of 5
    images. Now: exit 2 naming the position, the rows written untouched;
    a file added after them is captioned as new."""
    from internvl_batch.pipeline import DatasetChanged

    d = _folder(tmp_path / "imgs", 90)
    out = tmp_path / "out"
    assert _run(_cfg(tmp_path, f"folder:{d}", out), DyingEngine(1)) == 4  # 2 rows written
    w = ShardWriter(out, 0, 1)
    before = sorted(w.done_keys())
    assert [i for _, i in before] == ["img0.png", "img1.png"]
    (d / "a-first.png").write_bytes(_png(10))
    with pytest.raises(DatasetChanged, match=r"record 0 is now 'a-first.png', the row written "
                                             r"for it is 'img0.png'; rerun with --overwrite"):
        _run(_cfg(tmp_path, f"folder:{d}", out))
    assert sorted(w.done_keys()) == before and not w.is_complete()
    (d / "a-first.png").unlink()
    (d / "z-last.png").write_bytes(_png(10))
    assert _run(_cfg(tmp_path, f"folder:{d}", out)) == 0
    assert [(r["seq"], r["id"]) for r in _rows(out)] == [
        (k, f"img{k}.png") for k in range(4)] + [(4, "z-last.png")]


def test_a_cut_chunk_or_final_file_is_one_line_naming_it(tmp_path):
    """A chunk or final file that is not whole Parquet (cut by a copy, edited) raised
    pyarrow's ArrowInvalid from the settings check, a traceback."""
    d = _folder(tmp_path / "imgs", 90)
    out = tmp_path / "out"
    assert _run(_cfg(tmp_path, f"folder:{d}", out), DyingEngine(1)) == 4
    chunk = next((out / "_parts" / NAME).glob("chunk-*.parquet"))
    good = chunk.read_bytes()
    chunk.write_bytes(good[:100])
    with pytest.raises(sinks.Unreadable, match=rf"cannot read {chunk} .*not a whole Parquet "
                                               r"file; move it away and rerun"):
        _run(_cfg(tmp_path, f"folder:{d}", out))
    chunk.write_bytes(good)
    assert _run(_cfg(tmp_path, f"folder:{d}", out)) == 0
    final = out / f"{NAME}.parquet"
    final.write_bytes(b"garbage")
    with pytest.raises(sinks.Unreadable, match=r"rerun this shard with --overwrite"):
        _run(_cfg(tmp_path, f"folder:{d}", out))
    # from the command line: one line, exit 2, before any engine starts
    res = subprocess.run([sys.executable, "-m", "internvl_batch", "run", "--dataset",
                          f"folder:{d}", "--output", str(out), "--model", "preset:tiny"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT),
                              "INTERNVL_BATCH_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and f"cannot read {final}" in res.stderr


def test_dataset_identity_is_absolute_and_per_kind(tmp_path, monkeypatch):
    d = _folder(tmp_path / "imgs", 1, n=1)
    monkeypatch.chdir(tmp_path)
    rel, absolute = SourceSpec.parse("folder:imgs"), SourceSpec.parse(f"folder:{d}")
    assert rel.identity() == absolute.identity() == {"dataset": f"folder:{d}", "limit": None}
    assert SourceSpec.parse("parquet:x/*.parquet", id_column="k").identity() == {
        "dataset": f"parquet:{tmp_path}/x/*.parquet", "image_column": "image",
        "caption_column": None, "id_column": "k", "limit": None}
    # a hub name stays a name; a coco source names its files
    assert SourceSpec.parse("hf:org/set", split="val").identity()["dataset"] == "hf:org/set"
    coco = SourceSpec.parse("coco", data_dir="imgs", annotations="a.json").identity()
    assert coco["data_dir"] == str(d) and coco["annotations"] == f"{tmp_path}/a.json"
    # rows written before the dataset was recorded say nothing about it: accepted
    new = {"prompt": "p", **absolute.identity()}
    assert fingerprint.diff({"prompt": "p"}, new) == []
    changed = fingerprint.diff({**new, "dataset": "folder:/else"}, new)
    assert len(changed) == 1 and changed[0].startswith("--dataset 'folder:/else' -> 'folder:")
    assert changed[0].endswith("/imgs'")  # a long path keeps its end, where paths differ


# -- file names that are not UTF-8 ------------------------------------------------------------------

def test_a_file_name_that_is_not_utf8_is_captioned(tmp_path):
    """Python keeps such a name's bytes as lone surrogates, which Parquet cannot store: every
    run failed at the same chunk, so the shard could never finish."""
    d = tmp_path / "latin1"
    d.mkdir()
    for name in (b"a.png", b"caf\xe9.png", b"z.png"):
        with open(os.path.join(os.fsencode(d), name), "wb") as f:
            f.write(_png(9))
    out = tmp_path / "out"
    assert _run(_cfg(tmp_path, f"folder:{d}", out, batch_size=1)) == 0
    rows = _rows(out)
    assert [(r["id"], r["error"]) for r in rows] == [
        ("a.png", None), ("caf\\xe9.png", None), ("z.png", None)]
    rec = next(r for r in open_source(SourceSpec.parse(f"folder:{d}")) if r.seq == 1)
    assert os.path.isfile(rec.payload)  # the real path is kept for decoding
    assert _run(_cfg(tmp_path, f"folder:{d}", out)) == 0  # and a rerun finds it done


# -- merge, show and score ----------------------------------------------------------------------

def test_merge_refuses_shards_captioned_with_other_settings(tmp_path):
    out = tmp_path / "out"
    for shard, prompt in ((0, "Describe this image."), (1, "Write a poem about this image.")):
        cfg = dataclasses.replace(_cfg(tmp_path, "sample", out), num_shards=2,
                                  shard_index=shard, prompt=PromptSpec(prompt))
        assert _run(cfg) == 0
    ok, report = merge_output(out, compact=tmp_path / "all.parquet")
    assert not ok and not (tmp_path / "all.parquet").exists()
    assert "part-00001-of-00002 was captioned with other settings than part-00000-of-00002 " \
           "(--prompt 'Describe this image.' -> 'Write a poem about this image.')" in report
    # --compact into a folder that does not exist: said before stats.json is written
    cfg = dataclasses.replace(_cfg(tmp_path, "sample", out), num_shards=2, shard_index=1,
                              prompt=PromptSpec("Describe this image."), overwrite=True)
    assert _run(cfg) == 0
    ok, report = merge_output(out, compact=tmp_path / "nowhere" / "all.parquet")
    assert not ok and "does not exist" in report and not (out / "stats.json").exists()
    ok, report = merge_output(out, compact=tmp_path / "all.parquet")
    assert ok and pq.read_metadata(tmp_path / "all.parquet").num_rows == 17


def _two_shards(tmp_path, out: Path) -> None:
    for shard in (0, 1):
        assert _run(dataclasses.replace(_cfg(tmp_path, "sample", out), num_shards=2,
                                        shard_index=shard)) == 0


def test_merge_never_publishes_rows_twice_or_a_cut_file(tmp_path):
    """`--compact` onto a shard's own file replaced it by every row and the
    next merge published 9 rows of 6 (exit 0 both times); a shard file that no longer holds
    the rows its stats count merged anyway; a cut stats or Parquet file was a traceback."""
    from internvl_batch.config import ConfigError

    out = tmp_path / "out"
    _two_shards(tmp_path, out)
    s0, s1 = out / "part-00000-of-00002.parquet", out / "part-00001-of-00002.parquet"
    before = s0.read_bytes()
    for dest in (s0, out / "part-00001-of-00002.stats.json", out / "stats.json",
                 out / "_parts" / "x.parquet"):
        with pytest.raises(ConfigError, match=r"is one of .*'s own files; name a new file"):
            merge_output(out, compact=dest)
    assert s0.read_bytes() == before and not (out / "stats.json").exists()
    # a shard file replaced after its run (by every row): named, not merged
    pq.write_table(pa.concat_tables([pq.read_table(s0), pq.read_table(s1)]), s0)
    ok, report = merge_output(out, compact=out / "all.parquet")
    assert not ok and not (out / "all.parquet").exists()
    assert "merge: part-00000-of-00002: part-00000-of-00002.parquet holds 17 rows, its stats " \
           "count 9 (changed after its run finished); rerun it with --overwrite" in report
    s0.write_bytes(before[:200])
    ok, report = merge_output(out)
    assert not ok and "part-00000-of-00002.parquet (" in report and \
        "not a whole Parquet file; rerun it with --overwrite" in report
    s0.write_bytes(before)
    st1 = out / "part-00001-of-00002.stats.json"
    good = st1.read_text()
    st1.write_text("")
    ok, report = merge_output(out)
    assert not ok and "merge: part-00001-of-00002: cannot read part-00001-of-00002.stats.json" \
        in report
    # stats without the rates (an older writer): merged, the rates shown as 0
    st1.write_text(json.dumps({k: v for k, v in json.loads(good).items()
                               if not k.endswith("_per_s")}))
    ok, report = merge_output(out, compact=out / "all.parquet")
    assert ok, report
    assert pq.read_metadata(out / "all.parquet").num_rows == 17


def test_merge_on_a_full_disk_keeps_what_was_there_and_exits_5(tmp_path, monkeypatch):
    """stats.json was written in place: a full disk left it empty (and a traceback), and a
    cut `.all.parquet.tmp` stayed behind."""
    from click.testing import CliRunner

    from internvl_batch.cli import cli
    from internvl_batch.sinks import WriteFailed

    out = tmp_path / "out"
    _two_shards(tmp_path, out)
    assert merge_output(out)[0]
    merged = (out / "stats.json").read_text()
    real = Path.write_text

    def full(self, data, *a, **kw):
        if self.name.startswith(".stats.json.tmp"):
            real(self, data[:10], *a, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteFailed, match=r"merge: cannot write .*stats.json: No space left"):
        merge_output(out)
    assert (out / "stats.json").read_text() == merged
    res = CliRunner().invoke(cli, ["merge", str(out)])
    assert res.exit_code == 5 and "No space left on device; make room and merge again" in \
        res.output and "Traceback" not in res.output
    monkeypatch.undo()
    import pyarrow.parquet as pq_mod

    class Full(pq_mod.ParquetWriter):
        def write_batch(self, *a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq_mod, "ParquetWriter", Full)
    with pytest.raises(WriteFailed, match="all.parquet: No space left"):
        merge_output(out, compact=tmp_path / "all.parquet")
    assert not list(tmp_path.glob(".all.parquet*")) and not (tmp_path / "all.parquet").exists()


def test_merge_fails_a_shard_above_the_error_rate_it_was_run_with(tmp_path):
    """A shard whose run failed on the error rate (exit 3) is complete, rows kept; merging it
    fails too (a Slurm merge job must not turn that into exit 0), naming the shard, unless
    --max-error-rate says otherwise. A shard run with a higher rate merges by default."""
    d = tmp_path / "photos"
    d.mkdir()
    (d / "a.png").write_bytes(_png(9))
    for name in ("b.png", "c.png", "d.png"):
        (d / name).write_bytes(b"not an image")
    out = tmp_path / "out"
    cfg = dataclasses.replace(_cfg(tmp_path, f"folder:{d}", out), max_error_rate=0.5)
    assert _run(cfg) == 3
    assert len(_rows(out)) == 4
    ok, report = merge_output(out, compact=tmp_path / "all.parquet")
    assert not ok and not (out / "stats.json").exists() and not (tmp_path / "all.parquet").exists()
    assert report.splitlines()[-1].startswith(
        f"merge: {NAME}: 3/4 rows failed, above --max-error-rate 0.5 (")
    assert report.splitlines()[-1].endswith(
        "); see its error column, fix the input and rerun it with --overwrite, or merge "
        "with a higher --max-error-rate")
    ok, report = merge_output(out, max_error_rate=0.8)
    assert ok and json.loads((out / "stats.json").read_text())["rows_in_output"] == 4
    (out / "stats.json").unlink()
    assert _run(dataclasses.replace(cfg, max_error_rate=0.9, overwrite=True)) == 0
    ok, report = merge_output(out)
    assert ok, report
    ok, report = merge_output(out, max_error_rate=0.5)
    assert not ok and "3/4 rows failed, above --max-error-rate 0.5" in report


def test_show_and_score_refuse_mixed_shard_counts_and_unreadable_files(tmp_path):
    out = tmp_path / "out"
    assert _run(_cfg(tmp_path, "sample", out)) == 0
    assert len(open_output(out).files) == 1
    for shard in (0, 1):  # a rerun with --num-shards 2 beside the first run's file
        assert _run(dataclasses.replace(_cfg(tmp_path, "sample", out), num_shards=2,
                                        shard_index=shard)) == 0
    with pytest.raises(OutputError, match=r"mixes runs with different shard counts \[1, 2\]"):
        open_output(out)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(OutputError, match="bad.parquet is not a readable Parquet file"):
        open_output(bad)


# -- the lock ------------------------------------------------------------------------------------

def test_a_writer_stops_at_the_first_chunk_after_a_takeover(tmp_path):
    """Between heartbeats the flag said nothing: chunks of ours went on under the numbers of
    the run that had taken over."""
    w = ShardWriter(tmp_path, 0, 1).open()
    w.lock = ShardLock(tmp_path, NAME, heartbeat_s=3600).acquire()
    w.write([row(0)])
    doc = json.loads(w.lock.path.read_text())
    w.lock.path.write_text(json.dumps({**doc, "token": "theirs"}))  # taken over just now
    with pytest.raises(OutputBusy, match="lost the lock"):
        w.write([row(1)])
    assert [c.name for c in w._chunks()] == ["chunk-000000.parquet"]
    w.lock.release()


def test_a_heartbeat_that_cannot_refresh_gives_the_lock_up_in_time(tmp_path, monkeypatch):
    """utime failing (a flaky mount) was ignored: another node takes a lock over after
    STALE_BEATS silent heartbeats, while this writer went on."""
    lock = ShardLock(tmp_path, NAME, heartbeat_s=0.05, stale_beats=4).acquire()
    real = os.utime

    def utime(path, *a, **kw):
        if Path(path) == lock.path:
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *a, **kw)

    monkeypatch.setattr(outlock.os, "utime", utime)
    deadline = time.time() + 5
    while not lock.lost and time.time() < deadline:
        time.sleep(0.02)
    assert lock.lost  # after 3 failures, before the 4 that make it stale elsewhere
    with pytest.raises(OutputBusy):
        lock.check()
    lock.release()


# -- sources: one line, exit 2 ---------------------------------------------------------------------

def test_parquet_globs_and_columns_that_cannot_work_are_one_line(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"image": [_png(1)], "score": [0.5], "k": ["a"]}), d / "a.parquet")
    with pytest.raises(SourceError, match=r"a folder: use parquet:.*/pq/\*\.parquet"):
        open_source(SourceSpec.parse(f"parquet:{d}"))
    with pytest.raises(SourceError, match="holds double, not text"):
        open_source(SourceSpec.parse(f"parquet:{d}/*", caption_column="score"))
    with pytest.raises(SourceError, match="no column 'nope'.*fix --id-column"):
        open_source(SourceSpec.parse(f"parquet:{d}/*", id_column="nope"))
    # every file is checked, not the first only (a later file without the
    # id column switched to name:seq ids, one without the image column gave error rows)
    pq.write_table(pa.table({"image": [_png(2)], "score": ["x"]}), d / "b.parquet")
    with pytest.raises(SourceError, match=r"b.parquet has no column 'k' .*fix --id-column"):
        open_source(SourceSpec.parse(f"parquet:{d}/*", id_column="k"))
    assert open_source(SourceSpec.parse(f"parquet:{d}/b*", caption_column="score")).total == 1
    with pytest.raises(SourceError, match=r"a.parquet: --caption-column 'score' holds double"):
        open_source(SourceSpec.parse(f"parquet:{d}/*", caption_column="score"))
    pq.write_table(pa.table({"picture": [_png(3)]}), d / "c.parquet")
    with pytest.raises(SourceError, match=r"c.parquet has no column 'image'.*narrow the glob"):
        open_source(SourceSpec.parse(f"parquet:{d}/*"))
    (d / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match=r"notes.txt is not a readable Parquet file"):
        open_source(SourceSpec.parse(f"parquet:{d}/*"))


# -- a full disk -----------------------------------------------------------------------------------

def test_a_full_disk_is_one_line_and_exit_5_and_the_rerun_resumes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = sinks._atomic_write_table
    calls = []

    def full(table, path, *a, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, path, *a, **kw)

    monkeypatch.setattr(sinks, "_atomic_write_table", full)
    lines = []
    from internvl_batch import pipeline

    entry = types.SimpleNamespace(hit=True, key="k", fields={})
    assert pipeline.run(_cfg(tmp_path, "sample", out), log=lines.append,
                        started=(FakeEngine(), entry)) == pipeline.EXIT_WRITE_FAILED
    w = ShardWriter(out, 0, 1)
    assert len(w.done_keys()) == 4 and not w.is_complete()  # the two chunks before are intact
    # the final file fails half way: nothing of it is left behind
    monkeypatch.setattr(sinks, "_atomic_write_table", real)
    monkeypatch.setattr(ShardWriter, "_stream", lambda self, c, tmp, s: (
        tmp.write_bytes(b"half"), (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))[1])
    assert _run(_cfg(tmp_path, "sample", out)) == 5
    assert not list(out.glob(".*tmp*"))
    monkeypatch.undo()
    assert _run(_cfg(tmp_path, "sample", out)) == 0
    assert [r["seq"] for r in _rows(out)] == list(range(17))


# -- signals before the batches' handler -------------------------------------------------------------

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_a_signal_while_waiting_for_the_lock_stops_with_the_stop_code(tmp_path, sig, code):
    """`run --wait` behind another run's lock: SIGTERM killed it by the signal (no exit 75
    for a requeue to see), Ctrl-C printed click's 'Aborted!' and exit 1."""
    out = tmp_path / "out"
    out.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": outlock._boot_id(),
              "proc_start": outlock._proc_start(os.getpid()), "started_at": time.time(),
              "heartbeat_s": 30.0, "stale_beats": 4, "slurm": {}, "token": "theirs"}
    (out / f"{NAME}.lock").write_text(json.dumps(holder))
    p = subprocess.Popen([sys.executable, "-m", "internvl_batch", "run", "--dataset", "sample",
                          "--output", str(out), "--wait", "--no-progress"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 60
        while not any("waiting for another" in x for x in lines) and time.time() < deadline:
            time.sleep(0.1)
        assert any("waiting for another" in x for x in lines), lines
        p.send_signal(sig)
        p.wait(timeout=30)
        reader.join(timeout=5)
    finally:
        p.kill()
    err = "".join(lines)
    assert p.returncode == code, err
    assert f"stopped by signal {sig.name}" in err and "Traceback" not in err
    assert json.loads((out / f"{NAME}.lock").read_text())["token"] == "theirs"


def test_a_cut_partial_stats_file_does_not_stop_the_rerun(tmp_path):
    """stats.partial.json is rewritten after every batch without fsync: a power loss may
    leave it empty, and every rerun then died reading it."""
    out = tmp_path / "out"
    assert _run(_cfg(tmp_path, "sample", out), DyingEngine(1)) == 4
    w = ShardWriter(out, 0, 1)
    assert w.previous_stats()
    w.partial_stats.write_text("")
    assert w.previous_stats() == []
    assert _run(_cfg(tmp_path, "sample", out)) == 0
    st = json.loads((out / f"{NAME}.stats.json").read_text())
    assert st["rows"] == 17  # counted from the rows, whatever the timings lost


def test_overwrite_keeps_the_old_rows_until_the_engines_are_up(tmp_path, monkeypatch):
    """--overwrite removed the shard's rows before the engine started: a run that then
    failed to start (a wrong --model, a signal) left nothing of either."""
    from internvl_batch import pipeline
    from internvl_batch.cache import CompileCache

    out = tmp_path / "out"
    assert _run(_cfg(tmp_path, "sample", out)) == 0
    final = out / f"{NAME}.parquet"
    before = final.stat().st_mtime_ns

    def broken(self, spec, log=print):
        raise RuntimeError("engine start failed")

    monkeypatch.setattr(CompileCache, "start_engine", broken)
    cfg = dataclasses.replace(_cfg(tmp_path, "sample", out), prompt=PromptSpec("Other."),
                              overwrite=True)
    with pytest.raises(RuntimeError, match="engine start failed"):
        pipeline.run(cfg, log=lambda m: None)
    assert final.stat().st_mtime_ns == before and len(_rows(out)) == 17
    # with the engines up, the rows are replaced: every one, with the new prompt's fingerprint
    logs = []
    assert pipeline.run(cfg, log=logs.append, started=(FakeEngine(), types.SimpleNamespace(
        hit=True, key="k", fields={}))) == 0
    assert any(x.startswith("--overwrite: removed ") for x in logs)
    assert len(_rows(out)) == 17
    assert json.loads(pq.read_schema(final).metadata[b"internvl_batch"])["fingerprint"][
        "prompt"] == "Other."
