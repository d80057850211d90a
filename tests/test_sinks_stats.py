"""Parquet sink (chunks, finalize, resume), stats arithmetic and `merge`. No engine."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from internvl_batch import merge as merge_mod
from internvl_batch import sinks
from internvl_batch import stats as stats_mod
from internvl_batch.sinks import SCHEMA, ShardWriter


def row(seq: int, error: str | None = None) -> dict:
    return {"id": f"id{seq}", "seq": seq, "image_ref": f"img{seq}.jpg",
            "references": [f"ref {seq}"], "prompt": "p", "caption": None if error else f"cap {seq}",
            "prompt_tokens": 300, "image_tokens": 256, "tiles": 1, "output_tokens": 10,
            "finish_reason": "stop", "error": error}


COLUMNS = ["id", "seq", "image_ref", "references", "prompt", "caption", "prompt_tokens",
           "image_tokens", "tiles", "output_tokens", "finish_reason", "error"]


# -- ShardWriter ---------------------------------------------------------------------------------

def test_shard_name():
    assert sinks.shard_name(3, 16) == "part-00003-of-00016"


def test_write_finalize(tmp_path):
    w = ShardWriter(tmp_path / "out", 1, 4).open()
    w.write([row(1), row(5)])
    w.write([])  # nothing to write: no chunk
    w.write([row(9, error="missing file: x")])
    assert sorted(p.name for p in w.parts.iterdir()) == ["chunk-000000.parquet",
                                                         "chunk-000001.parquet"]
    assert w.rows_written == 3 and not w.is_complete()
    n = w.finalize({"hello": "world", "n": 3})
    assert n == 3
    final = tmp_path / "out" / "part-00001-of-00004.parquet"
    # finalize alone publishes nothing: the shard only looks complete after commit()
    assert not final.exists() and not w.is_complete()
    assert len(w._chunks()) == 2
    w.commit()
    assert w.final == final and final.is_file() and w.is_complete()
    assert not (tmp_path / "out" / "_parts").exists()
    t = pq.read_table(final)
    assert t.schema.names == COLUMNS == SCHEMA.names
    assert t.schema.field("seq").type == pa.int64()
    assert t.column("seq").to_pylist() == [1, 5, 9]
    assert t.column("error").to_pylist() == [None, None, "missing file: x"]
    assert t.column("references").to_pylist() == [["ref 1"], ["ref 5"], ["ref 9"]]
    assert sinks.read_metadata(final) == {"hello": "world", "n": 3}
    assert sinks.read_rows([final], columns=["id"]).column("id").to_pylist() == \
        ["id1", "id5", "id9"]


def test_finalize_empty_shard(tmp_path):
    w = ShardWriter(tmp_path, 0, 1).open()
    assert w.finalize({"empty": True}) == 0
    w.commit()
    assert pq.read_table(w.final).num_rows == 0
    assert sinks.read_metadata(w.final) == {"empty": True}


def test_read_metadata_without_ours(tmp_path):
    pq.write_table(pa.table({"a": [1]}), tmp_path / "x.parquet")
    assert sinks.read_metadata(tmp_path / "x.parquet") == {}


def test_resume_done_ids(tmp_path):
    w = ShardWriter(tmp_path, 0, 2).open()
    w.write([row(0), row(2)])
    w.write([row(4)])
    # a new writer (a rerun) sees the committed chunks
    again = ShardWriter(tmp_path, 0, 2)
    assert again.done_ids() == {"id0", "id2", "id4"} and not again.is_complete()
    again.open()
    again.write([row(6)])
    assert sorted(p.name for p in again.parts.glob("chunk-*")) == [
        "chunk-000000.parquet", "chunk-000001.parquet", "chunk-000002.parquet"]
    assert again.finalize({}) == 4
    again.commit()
    # after finalize + commit: from the final file
    third = ShardWriter(tmp_path, 0, 2)
    assert third.is_complete() and third.done_ids() == {"id0", "id2", "id4", "id6"}
    assert ShardWriter(tmp_path, 1, 2).done_ids() == set()


def test_open_removes_leftover_tmp(tmp_path):
    w = ShardWriter(tmp_path, 0, 1).open()
    w.write([row(0)])
    stale = w.parts / ".chunk-000001.parquet.tmp4242"
    stale.write_bytes(b"half a parquet file")
    again = ShardWriter(tmp_path, 0, 1)
    assert again.done_ids() == {"id0"}  # the stale temp file is not a chunk
    again.open()
    assert not stale.exists()
    again.write([row(1)])
    assert (w.parts / "chunk-000001.parquet").is_file()
    assert again.finalize({}) == 2
    again.commit()
    assert pq.read_table(again.final).column("seq").to_pylist() == [0, 1]


def test_finalize_sorts_out_of_order_chunks(tmp_path):
    w = ShardWriter(tmp_path, 0, 1).open()
    w.write([row(10), row(11), row(12)])
    w.write([row(0), row(1)])            # an odd resume: earlier seqs in a later chunk
    w.write([row(21), row(20)])          # unsorted within a chunk
    assert w.finalize({"k": 1}) == 7
    w.commit()
    t = pq.read_table(w.final)
    assert t.column("seq").to_pylist() == [0, 1, 10, 11, 12, 20, 21]
    assert t.column("id").to_pylist() == ["id0", "id1", "id10", "id11", "id12", "id20", "id21"]
    assert sinks.read_metadata(w.final) == {"k": 1}
    assert t.schema.names == SCHEMA.names


def test_finalize_streams_many_chunks_in_order(tmp_path):
    w = ShardWriter(tmp_path, 0, 1).open()
    for start in range(0, 100, 7):
        w.write([row(s) for s in range(start, min(start + 7, 100))])
    assert w.finalize({}) == 100
    w.commit()
    assert pq.read_table(w.final).column("seq").to_pylist() == list(range(100))


def test_partial_stats_roundtrip(tmp_path):
    w = ShardWriter(tmp_path, 0, 1).open()
    assert w.previous_stats() == []
    w.save_partial_stats([{"rows": 3}, {"rows": 4}])
    assert ShardWriter(tmp_path, 0, 1).previous_stats() == [{"rows": 3}, {"rows": 4}]


# -- stats ---------------------------------------------------------------------------------------

RUN_A = {"rows": 10, "images": 8, "requests": 8, "errors": 2, "input_tokens": 2400,
         "image_tokens": 2048, "output_tokens": 160, "load_s": 1.5, "compile_s": None,
         "cudagraph_s": 2.0, "warmup_s": 0.25, "init_s": 5.0, "generate_s": 2.0, "total_s": 8.0,
         "peak_rss_gb": 3.5, "gpu_name": "NVIDIA H100", "gpu_peak_mem_gb": 60.0,
         "cache_hit": False, "cache_key": "k1"}
RUN_B = {"rows": 5, "images": 5, "requests": 5, "errors": 0, "input_tokens": 1500,
         "image_tokens": 1280, "output_tokens": 90, "load_s": 1.0, "compile_s": None,
         "cudagraph_s": None, "warmup_s": 0.0, "init_s": 2.0, "generate_s": 0.5, "total_s": 3.0,
         "peak_rss_gb": 4.0, "gpu_name": "NVIDIA H100", "gpu_peak_mem_gb": 55.0,
         "cache_hit": True, "cache_key": "k1"}


def test_summarize_sums_and_rates():
    s = stats_mod.summarize([RUN_A, RUN_B])
    assert set(s) == set(stats_mod.KEYS)
    assert (s["rows"], s["images"], s["requests"], s["errors"]) == (15, 13, 13, 2)
    assert (s["input_tokens"], s["image_tokens"], s["output_tokens"]) == (3900, 3328, 250)
    assert s["total_tokens"] == 4150
    assert (s["load_s"], s["compile_s"], s["cudagraph_s"]) == (2.5, None, 2.0)
    assert (s["warmup_s"], s["init_s"], s["generate_s"], s["total_s"]) == (0.25, 7.0, 2.5, 11.0)
    assert s["images_per_s"] == 5.2            # 13 / 2.5
    assert s["requests_per_s"] == 5.2
    assert s["output_tokens_per_s"] == 100.0   # 250 / 2.5
    assert s["total_tokens_per_s"] == 1660.0   # 4150 / 2.5
    assert (s["peak_rss_gb"], s["gpu_peak_mem_gb"]) == (4.0, 60.0)
    assert s["gpu_name"] == "NVIDIA H100"
    assert s["cache_hit"] is False             # one miss: not a hit overall
    assert s["cache_key"] == "k1"


def test_summarize_empty_and_zero_time():
    s = stats_mod.summarize([])
    assert s["rows"] == 0 and s["images_per_s"] == 0.0 and s["load_s"] is None
    assert s["cache_hit"] is None and s["gpu_name"] is None and s["peak_rss_gb"] is None
    s = stats_mod.summarize([{"images": 3, "generate_s": 0}])
    assert s["images"] == 3 and s["images_per_s"] == 0.0


def test_merge_parallel_adds_rates():
    a = stats_mod.summarize([RUN_A])   # 8 img / 2 s = 4.0 img/s
    b = stats_mod.summarize([RUN_B])   # 5 img / 0.5 s = 10.0 img/s
    assert (a["images_per_s"], b["images_per_s"]) == (4.0, 10.0)
    m = stats_mod.merge_parallel([a, b])
    assert m["images_per_s"] == 14.0
    assert m["requests_per_s"] == 14.0
    assert m["output_tokens_per_s"] == 80.0 + 180.0
    assert m["total_tokens_per_s"] == 1280.0 + 3180.0
    assert m["images"] == 13 and m["generate_s"] == 2.5
    assert stats_mod.merge_parallel([])["images_per_s"] == 0.0


def test_run_stats_add_row():
    st = stats_mod.RunStats()
    st.add_row(error=None, prompt_tokens=300, image_tokens=256, output_tokens=12, answered=True)
    st.add_row(error="missing file: x")
    st.add_row(error="engine: ValueError: too long", answered=False)
    assert (st.rows, st.images, st.requests, st.errors) == (3, 1, 1, 2)
    assert (st.input_tokens, st.image_tokens, st.output_tokens) == (300, 256, 12)
    d = st.to_dict()
    assert d["peak_rss_gb"] > 0 and set(stats_mod.KEYS) - set(d) == {
        "total_tokens", "images_per_s", "requests_per_s", "output_tokens_per_s",
        "total_tokens_per_s", "cost_unknown"}  # a summary's: over the runs


def test_table_labels():
    s = stats_mod.summarize([RUN_A, RUN_B])
    text = stats_mod.table(s, "my title")
    lines = text.splitlines()
    assert lines[0] == "my title" and set(lines[1]) == {"-"}
    labels = ["images captioned", "error rows", "input / output tokens", "images/s",
              "images per GPU-hour", "requests/s", "output tok/s", "total tok/s", "load / compile / cudagraph s",
              "init / warm-up / generate / total s", "peak host RSS",
              "host memory, all processes", "device",
              "peak GPU memory", "compile cache", "first row after / shutdown s"]
    assert [ln.split("  ")[0].strip() for ln in lines[2:]] == labels
    assert "input / output tokens" in text and "3,900 / 250" in text
    assert "2.50 / - / 2.00" in text      # load / compile / cudagraph
    assert "5.20" in text and "4.00 GB" in text and "miss (k1)" in text
    empty = stats_mod.table(stats_mod.summarize([]))
    assert empty.splitlines()[0] == "internvl-batch" and "compile cache" in empty


def test_run_stats_start_stop_and_gpu_hours():
    """Time to the first row counts from the command's start, shutdown from the last row
    written to the engines closed; images per GPU-hour over the whole wall time, from the
    command's start to its recorded end (after the close: final file, stats, reaping)."""
    st = stats_mod.RunStats(started_at=1000.0)
    for _ in range(36):
        st.add_row(error=None, answered=True)
    st.first_batch_at, st.last_batch_at, st.closed_at = 1030.0, 1100.0, 1103.25
    st.ended_at = 1105.0
    d = st.to_dict()
    assert d["time_to_first_row_s"] == 30.0 and d["shutdown_s"] == 3.25
    assert d["wall_s"] == 105.0 and d["gpu_hours"] == round(105.0 / 3600, 6)
    assert d["images_per_gpu_hour"] == round(36 / round(105.0 / 3600, 6), 3)  # ~1234
    assert "closed_at" in d and "started_at" in d  # kept for lining up with monitoring
    # saved mid-run (after a batch, engines still open): no shutdown yet, the time so far
    st.closed_at = st.ended_at = None
    mid = st.to_dict()
    assert mid["shutdown_s"] is None and mid["wall_s"] > 1e6  # started_at is in 1970
    assert mid["saved_at"] - mid["wall_s"] == pytest.approx(1000.0, abs=1e-3)
    # before any row: none of the rates divide by zero
    empty = stats_mod.RunStats().to_dict()
    assert empty["time_to_first_row_s"] is None and empty["images_per_gpu_hour"] == 0.0


def test_gpu_hours_add_up_over_resumes_and_shards():
    a = dict(RUN_A, wall_s=720.0, gpu_hours=0.2, time_to_first_row_s=90.0, shutdown_s=4.0)
    b = dict(RUN_B, wall_s=360.0, gpu_hours=0.1, time_to_first_row_s=40.0, shutdown_s=2.5)
    s = stats_mod.summarize([a, b])
    assert (s["wall_s"], s["gpu_hours"]) == (1080.0, 0.3)
    assert s["images_per_gpu_hour"] == round(13 / 0.3, 3)
    assert (s["time_to_first_row_s"], s["shutdown_s"]) == (90.0, 4.0)  # the slowest
    # recounted from the shard's rows: the rows' images over the runs' GPU-hours
    counts = {k: 0 for k in stats_mod.COUNT_KEYS} | {"rows": 15, "images": 12}
    assert stats_mod.whole_shard([a, b], counts)["images_per_gpu_hour"] == 40.0
    # merge: shards' GPU-hours add up (two shards on two GPUs cost both)
    m = stats_mod.merge_parallel([stats_mod.summarize([a]), stats_mod.summarize([b])])
    assert m["gpu_hours"] == 0.3 and m["images_per_gpu_hour"] == s["images_per_gpu_hour"]
    # stats written before these keys existed
    old = stats_mod.summarize([RUN_A])
    assert old["wall_s"] is None and old["images_per_gpu_hour"] is None
    assert "images per GPU-hour" in stats_mod.table(old)


def test_process_started_at_is_the_process_start(tmp_path):
    import subprocess
    import sys
    import time

    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", "import time; t = time.time(); "
                          "from internvl_batch.stats import process_started_at as p; "
                          "print(p(), t)"], capture_output=True, text=True, check=True)
    started, first_line = map(float, out.stdout.split())
    # /proc counts clock ticks (10 ms); the interpreter's start lies between
    assert t0 - 0.05 <= started <= first_line + 0.05, (t0, started, first_line)
    assert stats_mod.process_started_at(2**30) is None  # no such process
    # one reference per process: two calls agree exactly (an engine's timeline is compared)
    mine = stats_mod.process_started_at()
    assert mine == stats_mod.process_started_at() == stats_mod.process_started_at("self")
    assert time.time() - 24 * 3600 < mine <= time.time()


def test_stats_write(tmp_path):
    p = tmp_path / "s.json"
    stats_mod.write(p, {"rows": 1}, [{"rows": 1}], {"shard": "x"})
    assert json.loads(p.read_text()) == {"rows": 1, "runs": [{"rows": 1}], "shard": "x"}
    assert not (tmp_path / "s.json.tmp").exists()


# -- merge ---------------------------------------------------------------------------------------

def complete_shard(out: Path, index: int, count: int, seqs: list[int], run: dict = RUN_A):
    w = ShardWriter(out, index, count).open()
    w.write([row(s) for s in seqs])
    n = w.finalize({"shard": index})
    runs = [dict(run, rows=n, errors=0)]  # as its rows: none failed (merge checks the rate)
    stats_mod.write(w.stats_path, stats_mod.summarize(runs), runs,
                    {"shard": w.name, "rows_in_shard": n, "complete": True})
    w.commit()  # as pipeline.run: stats first, then the shard becomes visible
    return w


def test_merge_complete(tmp_path):
    out = tmp_path / "out"
    complete_shard(out, 0, 3, [0, 3, 6])
    complete_shard(out, 1, 3, [1, 4], RUN_B)
    complete_shard(out, 2, 3, [2, 5])
    ok, report = merge_mod.merge_output(out)
    assert ok, report
    doc = json.loads((out / "stats.json").read_text())
    assert doc["rows_in_output"] == 7 and doc["shards"] == 3
    assert doc["rows"] == 7  # per-shard rows summed
    assert sorted(doc["per_shard"]) == ["part-00000-of-00003", "part-00001-of-00003",
                                        "part-00002-of-00003"]
    assert doc["images_per_s"] == 4.0 + 10.0 + 4.0
    for name in doc["per_shard"]:
        assert f"\n{name} " in "\n" + report
    assert "merged 3 shards: 7 rows" in report
    assert "images captioned" in report


def test_merge_missing_and_incomplete(tmp_path):
    out = tmp_path / "out"
    complete_shard(out, 0, 4, [0, 4])
    w = ShardWriter(out, 1, 4).open()       # started, never finished: _parts only
    w.write([row(1)])
    complete_shard(out, 3, 4, [3])
    ok, report = merge_mod.merge_output(out)
    assert not ok
    assert "merge: incomplete shards (failed or still running): part-00001-of-00004" in report
    assert "merge: missing shards (never started): part-00002-of-00004" in report
    assert "part-00000-of-00004" in report and "part-00003-of-00004" in report  # table rows
    assert not (out / "stats.json").exists()


def test_merge_several_missing_named(tmp_path):
    out = tmp_path / "out"
    complete_shard(out, 2, 3, [2])
    ok, report = merge_mod.merge_output(out)
    assert not ok
    assert report.splitlines()[-1] == (
        "merge: missing shards (never started): part-00000-of-00003, part-00001-of-00003")


def test_merge_nothing(tmp_path):
    assert merge_mod.merge_output(tmp_path / "nope") == (False, f"merge: {tmp_path / 'nope'} "
                                                                "does not exist")
    (tmp_path / "empty").mkdir()
    assert merge_mod.merge_output(tmp_path / "empty") == (
        False, f"merge: no shards in {tmp_path / 'empty'}")


def test_merge_mixed_shard_counts(tmp_path):
    complete_shard(tmp_path, 0, 2, [0])
    complete_shard(tmp_path, 0, 3, [0])
    ok, report = merge_mod.merge_output(tmp_path)
    assert not ok and report == f"merge: {tmp_path} mixes runs with different shard counts [2, 3]"


def test_merge_compact(tmp_path):
    out = tmp_path / "out"
    complete_shard(out, 0, 2, [0, 2, 4])
    complete_shard(out, 1, 2, [1, 3])
    dest = tmp_path / "all.parquet"
    ok, report = merge_mod.merge_output(out, compact=dest)
    assert ok, report
    assert f"compacted 5 rows into {dest}" in report
    t = pq.read_table(dest)
    assert t.num_rows == 5 and t.schema.names == SCHEMA.names
    assert t.column("seq").to_pylist() == [0, 2, 4, 1, 3]  # shard order, each shard in seq order
    assert list(tmp_path.glob(".all.parquet.tmp*")) == []


# -- pipeline.run: finalize -> stats.json -> commit (no vLLM: a fake engine) ---------------------

class FakeEngine:
    """What pipeline.run uses of engine.Engine, without vLLM."""

    def __init__(self):
        from internvl_batch.engine import InitTimings

        self.timings = InitTimings(total_s=0.5, warmup_s=0.1)
        self.llm = None
        self.requests = 0
        self.batches: list[int] = []
        self.closed = False
        self.started_at = time.time()

    def info(self):
        return {"vllm": "fake", "torch": "fake", "device": "cpu (fake)", "cuda": False}

    def generate(self, reqs, sampling):
        from internvl_batch.engine import GenResult

        self.requests += len(reqs)
        return [GenResult("a fake caption", 300, 256, 3, "stop") for _ in reqs]

    def gpu_memory_used_gb(self):
        return None

    def start_timelines(self):
        return [{"engine": "engine", "started_at": self.started_at, "ready_s": 0.5,
                 "phases": [{"phase": "load weights", "s": 0.25, "n": 1, "at_s": 0.3}]}]

    tokens_per_tile = 256
    replicas = 1

    def imap(self, work, sampling):
        for tag, reqs in work:
            self.batches.append(len(reqs))
            yield tag, self.generate(reqs, sampling)

    def close(self):
        self.closed = True


@pytest.fixture
def fake_engine(monkeypatch):
    """CompileCache.start_engine returns a FakeEngine: a test that reached vLLM would take
    a minute on CPU (and is not what these tests are about)."""
    import types

    from internvl_batch.cache import CompileCache

    started = []

    def start(self, spec, log=print):
        started.append(FakeEngine())
        return started[-1], types.SimpleNamespace(hit=True, key="fake-key",
                                                  fields={"model_config_hash": "h"})

    monkeypatch.setattr(CompileCache, "start_engine", start)
    return started


def _run_cfg(tmp_path, out):
    from internvl_batch.config import EngineSpec, RunConfig
    from internvl_batch.sources import SourceSpec

    return RunConfig(source=SourceSpec.parse("sample", limit=5), engine=EngineSpec(model="m"),
                     output=out, cache_dir=tmp_path / "cache", progress=False, workers=0,
                     batch_size=2)


def test_pipeline_writes_stats_between_finalize_and_commit(tmp_path, fake_engine, monkeypatch):
    from internvl_batch import pipeline

    out = tmp_path / "out"
    events = []
    final = out / "part-00000-of-00001.parquet"
    stats_path = out / "part-00000-of-00001.stats.json"
    real_finalize, real_commit, real_write = (ShardWriter.finalize, ShardWriter.commit,
                                              stats_mod.write)

    def finalize(self, metadata):
        events.append(("finalize", final.exists(), stats_path.exists()))
        n = real_finalize(self, metadata)
        events.append(("finalized", final.exists(), stats_path.exists()))
        return n

    def write(path, *a, **k):
        events.append(("stats", final.exists(), stats_path.exists()))
        return real_write(path, *a, **k)

    def commit(self):
        events.append(("commit", final.exists(), stats_path.exists()))
        real_commit(self)
        events.append(("committed", final.exists(), stats_path.exists()))

    monkeypatch.setattr(ShardWriter, "finalize", finalize)
    monkeypatch.setattr(ShardWriter, "commit", commit)
    monkeypatch.setattr(stats_mod, "write", write)
    assert pipeline.run(_run_cfg(tmp_path, out), log=lambda m: None) == 0
    # (event, final parquet visible?, stats.json present?)
    # ... and once more at the run's end, the time up to it included
    assert events == [("finalize", False, False), ("finalized", False, False),
                      ("stats", False, False), ("commit", False, True),
                      ("committed", True, True), ("stats", True, True)]
    assert len(fake_engine) == 1 and fake_engine[0].requests == 5 and fake_engine[0].closed
    assert pq.read_table(final).num_rows == 5
    doc = json.loads(stats_path.read_text())
    assert doc["rows_in_shard"] == 5 and doc["complete"] is True
    assert not (out / "_parts").exists()
    assert list(out.glob(".*")) == []  # no temp file left
    ok, report = merge_mod.merge_output(out)
    assert ok, report


def test_pipeline_times_start_and_stop(tmp_path, fake_engine, monkeypatch):
    """time_to_first_row_s counts from the `started_at` the command passes; the final
    stats.json is written after the engine closed, so shutdown_s covers the close; the
    summary shows both and images per GPU-hour."""
    import time

    from internvl_batch import pipeline

    events = []

    def slow_close(self):
        time.sleep(0.3)
        events.append("closed")
        self.closed = True

    real_write = stats_mod.write

    def write(path, *a, **k):
        events.append("stats")
        return real_write(path, *a, **k)

    monkeypatch.setattr(FakeEngine, "close", slow_close)
    monkeypatch.setattr(stats_mod, "write", write)
    out, shown = tmp_path / "out", []
    term = pipeline.Terminal(info=lambda m: None, summary=lambda doc, table: shown.append(table))
    t_cmd = time.time() - 2.0  # the process started 2 s before pipeline.run
    assert pipeline.run(_run_cfg(tmp_path, out), term=term, started_at=t_cmd) == 0
    assert events == ["closed", "stats", "stats"]  # before the commit, then at the end
    st = json.loads((out / "part-00000-of-00001.stats.json").read_text())
    run = st["runs"][-1]
    assert run["started_at"] == t_cmd
    assert 2.0 <= st["time_to_first_row_s"] == run["time_to_first_row_s"] < 30
    assert 0.3 <= st["shutdown_s"] == run["shutdown_s"] < 5
    assert run["wall_s"] >= 2.3 and run["wall_s"] == st["wall_s"]
    assert run["closed_at"] - run["last_batch_at"] == pytest.approx(run["shutdown_s"], abs=1e-3)
    assert st["images_per_gpu_hour"] == round(5 / st["gpu_hours"], 3)
    # the fake engine's device is a CPU: no GPU-hours on a run without a GPU
    assert "first row after / shutdown s" in shown[0] and "images per device-hour" in shown[0]
    assert "GPU-hour" not in shown[0]
    assert f"{st['shutdown_s']:,.2f}" in shown[0]
    # where the start went: from the command's start until the engines were asked for,
    # until they were ready, and each engine's phases
    tl = st["start_timeline"]
    assert run["start_timeline"] == tl
    assert 2.0 <= tl["engines_asked_s"] <= tl["engines_ready_s"] <= st["time_to_first_row_s"]
    assert [e["engine"] for e in tl["engines"]] == ["engine"]
    assert tl["engines"][0]["phases"][0]["phase"] == "load weights"
    assert 2.0 <= tl["engines"][0]["start_offset_s"] <= tl["engines_ready_s"]


def test_fit_batches_reaches_every_replica():
    from internvl_batch.pipeline import fit_batches

    cases = [  # (records, batch size, engines) -> batch size used
        (192, 256, 4, 48), (7, 256, 4, 2), (1023, 256, 4, 256), (1024, 256, 4, 256),
        (3072, 256, 4, 256), (192, 256, 1, 256), (0, 256, 4, 1)]
    for n, batch, engines, want in cases:
        recs, got = fit_batches(iter(range(n)), batch, engines)
        assert got == want, (n, batch, engines)
        assert list(recs) == list(range(n))  # the look-ahead loses and reorders nothing


def test_pipeline_splits_a_small_input_across_replicas(tmp_path, fake_engine, monkeypatch):
    from internvl_batch import pipeline

    monkeypatch.setattr(FakeEngine, "replicas", 4)
    cfg = dataclasses.replace(_run_cfg(tmp_path, tmp_path / "out"), batch_size=256)
    assert pipeline.run(cfg, log=lambda m: None) == 0
    assert fake_engine[0].batches == [2, 2, 1]  # 5 images, 4 replicas: none gets all 5


def test_pipeline_crash_before_commit_is_not_complete(tmp_path, fake_engine, monkeypatch):
    """Killed after finalize (stats.json written or not): the shard does not look complete,
    its rows stay in _parts, merge calls it incomplete and a rerun completes it."""
    from internvl_batch import pipeline

    out = tmp_path / "out"

    class Killed(BaseException):
        pass

    def die(self):
        raise Killed()

    with monkeypatch.context() as m:
        m.setattr(ShardWriter, "commit", die)
        with pytest.raises(Killed):
            pipeline.run(_run_cfg(tmp_path, out), log=lambda m: None)
    w = ShardWriter(out, 0, 1)
    assert not w.is_complete() and not w.final.exists()
    assert w.stats_path.is_file()  # written before the (failed) commit
    assert len(w.done_ids()) == 5  # every row kept in its chunks
    ok, report = merge_mod.merge_output(out)
    assert not ok
    assert report == "merge: incomplete shards (failed or still running): part-00000-of-00001"
    # the rerun resumes: nothing left to caption, finalize + stats + commit
    assert pipeline.run(_run_cfg(tmp_path, out), log=lambda m: None) == 0
    assert len(fake_engine) == 2 and fake_engine[1].requests == 0
    assert w.is_complete() and pq.read_table(w.final).num_rows == 5
    assert pq.read_table(w.final).column("seq").to_pylist() == [0, 1, 2, 3, 4]
    ok, report = merge_mod.merge_output(out)
    assert ok, report


def sample_row(seq: int) -> dict:
    """row(seq) under the id the embedded sample has at `seq`: a resume refuses rows whose
    ids do not match the dataset's records (pipeline.DatasetChanged)."""
    from internvl_batch.sources import SourceSpec, open_source

    rec = next(r for r in open_source(SourceSpec.parse("sample"), 0, 1) if r.seq == seq)
    return dict(row(seq), id=rec.id)


def test_rerun_after_crash_between_finalize_and_stats(tmp_path, fake_engine):
    from internvl_batch import pipeline
    from internvl_batch.config import EngineSpec, RunConfig
    from internvl_batch.sources import SourceSpec

    out = tmp_path / "out"
    w = ShardWriter(out, 0, 1).open()
    w.write([sample_row(0), sample_row(1)])
    w.finalize({})                       # ... and the process dies here: no stats.json
    assert not w.is_complete()           # nothing published before stats.json and commit()
    cfg = RunConfig(source=SourceSpec.parse("sample"), engine=EngineSpec(model="preset:tiny"),
                    output=out, cache_dir=tmp_path / "cache", progress=False, workers=0)
    assert pipeline.run(cfg, log=lambda m: None) == 0   # resumes (a fake engine here)
    ok, report = merge_mod.merge_output(out)
    assert ok, report
    seqs = pq.read_table(w.final, columns=["seq"]).column("seq").to_pylist()
    assert seqs == list(range(17))  # the sample's 17 records, the 2 written once each


def test_rerun_removes_final_temp_of_a_killed_writer(tmp_path, fake_engine):
    from internvl_batch import pipeline

    out = tmp_path / "out"
    w = ShardWriter(out, 0, 1).open()
    w.write([sample_row(0)])
    w.finalize({})
    stale = w.final.with_name(f".{w.final.name}.tmp999999")  # another (dead) pid's
    w._pending.rename(stale)
    assert pipeline.run(_run_cfg(tmp_path, out), log=lambda m: None) == 0
    assert w.is_complete()
    assert not stale.exists()


def test_host_memory_counts_every_process_below_the_run():
    """host_memory walks the process tree (children and theirs), names what it knows, and
    sums PSS: a grandchild holding 64 MB shows up under a child named as a replica."""
    import subprocess
    import sys

    grandchild = "import time; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(60)"
    child = ("import subprocess, sys, time; "
             f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
             "open('/proc/self/comm', 'w').write('ivb-replica-0'); time.sleep(60)")  # as ours
    proc = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.time() + 20
        while True:
            m = stats_mod.host_memory(1000)
            # this test process may have others (the session's engine): look below ours
            below = {pid for pid, _ in stats_mod._process_tree(proc.pid)} - {proc.pid}
            big = [p for p in m["by_process"] if p["rss_gb"] >= 0.06 and p["pid"] in below]
            named = any(p["pid"] == proc.pid and p["role"] == "replica" for p in m["by_process"])
            if (big and named) or time.time() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p, _ in stats_mod._process_tree(proc.pid)[::-1]:
            os.kill(p, 9)
        proc.wait()
    role = {p["pid"]: p["role"] for p in m["by_process"]}
    assert role[os.getpid()] == "main" and role[proc.pid] == "replica"
    assert m["processes"] >= 3 and len(big) == 1
    assert m["images"] == 1000 and m["end"] is False
    assert m["total_pss_gb"] >= big[0]["pss_gb"] >= 0.06
    assert m["total_rss_gb"] >= m["total_pss_gb"]
    # OS threads per process: this one runs at least the main thread; the child one
    assert role and all(p["threads"] >= 1 for p in m["by_process"])
    assert next(p["threads"] for p in m["by_process"] if p["pid"] == proc.pid) == 1


def test_pipeline_samples_host_memory(tmp_path, fake_engine, monkeypatch):
    """At RSS_AT images (here 3) and at the end, into the run's stats and the summary."""
    from internvl_batch import pipeline

    monkeypatch.setattr(stats_mod, "RSS_AT", (3, 4))
    out, shown = tmp_path / "out", []
    term = pipeline.Terminal(info=lambda m: None, summary=lambda doc, table: shown.append(table))
    assert pipeline.run(_run_cfg(tmp_path, out), term=term) == 0
    st = json.loads((out / "part-00000-of-00001.stats.json").read_text())
    # batches of 2: 3 and 4 are crossed by the same batch (4 images), sampled once
    assert [(m["images"], m["end"]) for m in st["runs"][-1]["host_rss"]] == [(4, False), (5, True)]
    assert st["host_rss"] == st["runs"][-1]["host_rss"]
    for m in st["host_rss"]:  # this process; any others it has (an earlier test's) too
        assert [p["role"] for p in m["by_process"]].count("main") == 1
        assert m["total_rss_gb"] > 0 and m["processes"] == len(m["by_process"])
    line = next(l for l in shown[0].splitlines() if l.startswith("host memory, all processes"))
    assert " at 4 images, " in line and " at the end (" in line and "processes)" in line
