"""Nothing lost, nothing mixed: the shard lock, the settings fingerprint, "never
fewer rows", the error-rate rule with counts by kind, COCO validation, stats over resumes and
merge's wall-clock rate. No vLLM: real files, real processes where the lock is about process
boundaries, and the fake engine of test_sinks_stats where a run is needed."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from internvl_batch import fingerprint, outlock
from internvl_batch import merge as merge_mod
from internvl_batch import stats as stats_mod
from internvl_batch.config import ConfigError
from internvl_batch.outlock import OutputBusy, ShardLock
from internvl_batch.sinks import FewerRows, ShardWriter
from internvl_batch.sources import SourceError, SourceSpec, open_source
from tests.test_sinks_stats import FakeEngine, _run_cfg, fake_engine, row  # noqa: F401

NAME = "part-00000-of-00001"


def sample_row(seq: int, error: str | None = None) -> dict:
    """row(seq) with the id the sample source gives record `seq` (what a rerun skips)."""
    rec = next(r for r in open_source(SourceSpec.parse("sample")) if r.seq == seq)
    return {**row(seq, error), "id": rec.id}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(out: Path, **fields) -> Path:
    """A lock file as another run would have left it."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"pid": 1, "host": socket.gethostname(), "boot_id": outlock._boot_id(),
           "proc_start": None, "started_at": time.time() - 100, "heartbeat_s": 30.0,
           "stale_beats": 4, "slurm": {}, "token": "theirs"}
    doc.update(fields)
    path = out / f"{NAME}.lock"
    path.write_text(json.dumps(doc))
    return path


# -- the lock ------------------------------------------------------------------------------------

def test_second_writer_is_refused_naming_the_holder(tmp_path):
    a = ShardLock(tmp_path, NAME).acquire()
    try:
        with pytest.raises(OutputBusy) as e:
            ShardLock(tmp_path, NAME).acquire()
        msg = str(e.value)
        assert isinstance(e.value, ConfigError)  # the CLI's one line, exit 2
        assert msg.startswith(f"another internvl-batch (pid {os.getpid()} on host "
                              f"{socket.gethostname()}, since ")
        assert msg.endswith(f") is writing {NAME} in {tmp_path}; wait for it, or pass --wait")
        assert "\n" not in msg
    finally:
        a.release()
    assert not a.path.exists()
    ShardLock(tmp_path, NAME).acquire().release()  # free again


def test_lock_records_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = ShardLock(tmp_path, NAME).acquire()
    doc = json.loads(lock.path.read_text())
    lock.release()
    assert doc["pid"] == os.getpid() and doc["host"] == socket.gethostname()
    assert doc["slurm"]["SLURM_JOB_ID"] == "4242" and doc["started_at"] <= time.time()
    assert doc["heartbeat_s"] == outlock.HEARTBEAT_S and doc["token"] == lock.token


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead)
    logs = []
    lock = ShardLock(tmp_path, NAME).acquire(log=logs.append)
    try:
        assert lock.holds()
        host = socket.gethostname()
        assert len(logs) == 1
        assert logs[0].startswith(f"{NAME}: took over the lock of pid {dead} on host {host}, "
                                  "since ")
        assert logs[0].endswith(f": pid {dead} on {host} is gone")
    finally:
        lock.release()
    assert not list(tmp_path.glob(".*"))  # no temp or graveyard file left


def test_reused_pid_is_stale_but_a_live_holder_is_not(tmp_path):
    # our own pid, recorded with another start time: the pid was reused
    _write_lock(tmp_path, pid=os.getpid(), proc_start="1")
    ShardLock(tmp_path, NAME).acquire().release()
    # a live process on this host (its real start time): held
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_lock(tmp_path, pid=p.pid, proc_start=outlock._proc_start(p.pid))
        with pytest.raises(OutputBusy, match=f"pid {p.pid} on host"):
            ShardLock(tmp_path, NAME).acquire()
    finally:
        p.kill()
        p.wait()
    ShardLock(tmp_path, NAME).acquire().release()  # and once it is dead: taken over


def test_other_host_fresh_heartbeat_holds_old_heartbeat_is_stale(tmp_path):
    path = _write_lock(tmp_path, host="node-b", pid=os.getpid(), heartbeat_s=2.0,
                       stale_beats=3)
    with pytest.raises(OutputBusy) as e:  # refreshed just now (written): alive
        ShardLock(tmp_path, NAME).acquire()
    assert "pid" in str(e.value) and "host node-b" in str(e.value)
    assert "its lock is taken over 6 s after its last heartbeat" in str(e.value)
    old = time.time() - 7  # 3 beats of 2 s missed
    os.utime(path, (old, old))
    logs = []
    lock = ShardLock(tmp_path, NAME).acquire(log=logs.append)
    lock.release()
    assert len(logs) == 1 and "host node-b" in logs[0] and "no heartbeat for 7 s" in logs[0]


def test_a_lock_file_with_words_for_numbers_uses_our_limits(tmp_path):
    """An edited or foreign lock file whose heartbeat was not a number: a ValueError
    traceback. Now our own limits (30 s x 4) decide."""
    path = _write_lock(tmp_path, host="node-b", pid=os.getpid(), heartbeat_s="abc",
                       stale_beats=[3])
    with pytest.raises(OutputBusy, match="taken over 120 s after its last heartbeat"):
        ShardLock(tmp_path, NAME).acquire()
    old = time.time() - 121
    os.utime(path, (old, old))
    ShardLock(tmp_path, NAME).acquire().release()


def test_heartbeat_refreshes_mtime(tmp_path):
    lock = ShardLock(tmp_path, NAME, heartbeat_s=0.2).acquire()
    try:
        old = time.time() - 100
        os.utime(lock.path, (old, old))
        time.sleep(0.6)
        assert time.time() - lock.path.stat().st_mtime < 1
        assert not lock.lost
    finally:
        lock.release()


def test_slurm_requeue_takes_over_its_previous_incarnation(tmp_path, monkeypatch):
    _write_lock(tmp_path, host="node-a", pid=os.getpid(),
                slurm={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"})
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    logs = []
    ShardLock(tmp_path, NAME).acquire(log=logs.append).release()
    assert "Slurm requeued job 77" in logs[0]


def test_racing_takers_one_wins(tmp_path):
    """Eight takers race for one stale lock: exactly one holds it afterwards."""
    _write_lock(tmp_path, pid=_dead_pid())
    won, refused = [], []
    start = threading.Barrier(8)

    def take():
        lock = ShardLock(tmp_path, NAME, heartbeat_s=60)
        start.wait()
        try:
            lock.acquire(log=lambda m: None)
            won.append(lock)
        except OutputBusy:
            refused.append(lock)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    holders = [lk for lk in won if lk.holds()]
    # a taker can win and then lose to a racer that moved its fresh lock (it notices: lost)
    assert len(holders) == 1
    assert len(won) + len(refused) == 8
    for lk in won:
        lk.release()


def test_lost_lock_is_noticed_and_nothing_is_published(tmp_path):
    w = ShardWriter(tmp_path, 0, 1).open()
    w.lock = ShardLock(tmp_path, NAME, heartbeat_s=0.1).acquire()
    w.write([row(0)])
    _write_lock(tmp_path, token="someone-else")  # another run took it over
    time.sleep(0.4)
    assert w.lock.lost
    with pytest.raises(OutputBusy, match="lost the lock"):
        w.write([row(1)])
    with pytest.raises(OutputBusy, match="nothing was published"):
        w.finalize({})
    w.lock.release()
    assert (tmp_path / f"{NAME}.lock").is_file()  # theirs stays
    assert not w.final.exists()


def test_wait_waits_for_the_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(outlock, "WAIT_POLL_S", 0.05)
    a = ShardLock(tmp_path, NAME).acquire()
    threading.Timer(0.5, a.release).start()
    logs = []
    t0 = time.time()
    b = ShardLock(tmp_path, NAME).acquire(wait=True, log=logs.append)
    assert time.time() - t0 >= 0.4 and b.holds()
    b.release()
    assert len(logs) == 1 and logs[0].startswith("waiting for another internvl-batch (pid ")


# -- never fewer rows ----------------------------------------------------------------------------

def test_finalize_refuses_to_replace_a_final_file_by_fewer_rows(tmp_path):
    """What two unlocked runs did: the first published 3 rows, the second (whose chunks the
    first had removed) would publish 0 over them."""
    first = ShardWriter(tmp_path, 0, 1).open()
    second = ShardWriter(tmp_path, 0, 1).open()
    first.write([row(0), row(1), row(2)])
    first.finalize({})
    first.commit()
    with pytest.raises(FewerRows) as e:
        second.finalize({})
    assert str(e.value) == (f"refusing to replace {first.final} (3 rows) by 0 rows (another "
                            "run finished this shard?); nothing was changed")
    assert pq.read_table(first.final).num_rows == 3
    assert not list(tmp_path.glob(".*tmp*"))


def test_commit_rechecks(tmp_path):
    a = ShardWriter(tmp_path / "o", 0, 1).open()
    a.write([row(0)])
    a.finalize({})
    a._pending = a._pending.rename(a._pending.with_name(".a-pending"))  # one pid: two names
    b = ShardWriter(tmp_path / "o", 0, 1)  # published 2 rows between a's finalize and commit
    b.parts = tmp_path / "other-parts"
    b.open()
    b.write([row(0), row(1)])
    b.finalize({})
    b.commit()
    with pytest.raises(FewerRows):
        a.commit()
    assert pq.read_table(a.final).num_rows == 2
    assert not a._pending.exists()


# -- the settings fingerprint --------------------------------------------------------------------

def test_fingerprint_names_what_changes_captions(tmp_path):
    cfg = _run_cfg(tmp_path, tmp_path / "out")
    fp = fingerprint.of(cfg)
    assert set(fp) == {"model", "model_config_hash", "weights", "prompt", "system_prompt",
                       "max_tokens", "temperature", "top_p", "seed", "ignore_eos",
                       "max_dynamic_patch", "dtype", "load_format", "quantization",
                       "dataset", "limit"}  # the sample source: no options of its own
    assert set(fingerprint.CAPTION_KEYS) | {"dataset", "limit"} == set(fp)
    # FP8 captions differ from bf16's; rows from before the setting existed (no key) are bf16
    fp8 = fingerprint.of(dataclasses.replace(
        cfg, engine=dataclasses.replace(cfg.engine, quantization="fp8")))
    assert fingerprint.diff(fp, fp8) == ["--quantization None -> 'fp8'"]
    assert fingerprint.diff({k: v for k, v in fp.items() if k != "quantization"}, fp) == []
    tiny = fingerprint.of(dataclasses.replace(
        cfg, engine=dataclasses.replace(cfg.engine, model="preset:tiny")))
    assert tiny["model_config_hash"] and tiny["weights"] == "random, seeded (synthesized)"
    # the two kinds of a synthesized preset caption differently: the fingerprint tells them apart
    for spec, kind in (("preset:internvl3-1b", "dummy"), ("preset:internvl3-1b+weights",
                                                          "random, seeded")):
        got = fingerprint.of(dataclasses.replace(cfg, engine=dataclasses.replace(
            cfg.engine, model=spec)))
        assert got["weights"] == f"{kind} (synthesized)"
    # a checkpoint dir: config.json hashed, weights by name and size
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text('{"model_type": "internvl_chat", "a": 1}')
    (ck / "model.safetensors").write_bytes(b"x" * 10)
    spec = dataclasses.replace(cfg.engine, model=str(ck))
    one = fingerprint.of(dataclasses.replace(cfg, engine=spec))
    (ck / "config.json").write_text('{"model_type": "internvl_chat", "a": 2}')
    (ck / "model.safetensors").write_bytes(b"x" * 11)
    two = fingerprint.of(dataclasses.replace(cfg, engine=spec))
    assert fingerprint.diff(one, two) == [
        f"model config.json {one['model_config_hash']!r} -> {two['model_config_hash']!r}",
        f"model weights {one['weights']!r} -> {two['weights']!r}"]


def _prompted(tmp_path, out, prompt):
    from internvl_batch.config import PromptSpec

    return dataclasses.replace(_run_cfg(tmp_path, out), prompt=PromptSpec(prompt))


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if not p.name.endswith(".lock")}


def test_resume_with_a_changed_prompt_is_refused_and_nothing_is_written(tmp_path,
                                                                        fake_engine):
    from internvl_batch import pipeline

    out = tmp_path / "out"
    w = ShardWriter(out, 0, 1).open()  # an interrupted run: 2 rows with prompt A
    w.fingerprint = fingerprint.of(_prompted(tmp_path, out, "A"))
    w.write([sample_row(0), sample_row(1)])
    before = _snapshot(out)
    with pytest.raises(fingerprint.SettingsChanged) as e:
        pipeline.run(_prompted(tmp_path, out, "B"), log=lambda m: None)
    assert str(e.value) == (f"{out} ({NAME}, unfinished) holds rows written with other "
                            "settings (--prompt 'A' -> 'B'); pass --output DIR to write "
                            "elsewhere, or --overwrite to replace them")
    assert fake_engine == []  # refused before any engine started
    assert _snapshot(out) == before and not (out / f"{NAME}.lock").exists()
    # the same prompt resumes
    assert pipeline.run(_prompted(tmp_path, out, "A"), log=lambda m: None) == 0
    assert pq.read_table(w.final).num_rows == 5
    md = json.loads(pq.read_schema(w.final).metadata[b"internvl_batch"])
    assert md["fingerprint"]["prompt"] == "A"


def test_finished_output_with_a_new_prompt_is_refused_then_overwritten(tmp_path, fake_engine):
    from internvl_batch import pipeline

    out = tmp_path / "out"
    logs = []
    assert pipeline.run(_prompted(tmp_path, out, "A"), log=logs.append) == 0
    final = out / f"{NAME}.parquet"
    before = _snapshot(out)
    with pytest.raises(fingerprint.SettingsChanged, match=r"--prompt 'A' -> 'B'"):
        pipeline.run(_prompted(tmp_path, out, "B"), log=logs.append)
    assert _snapshot(out) == before and len(fake_engine) == 1
    # same settings: nothing to do
    logs.clear()
    assert pipeline.run(_prompted(tmp_path, out, "A"), log=logs.append) == 0
    assert logs == [f"{final} is complete: nothing to do (delete it to caption again)"]
    # --overwrite: the old rows go (under the lock), the new ones come
    cfg = dataclasses.replace(_prompted(tmp_path, out, "B"), overwrite=True)
    logs.clear()
    assert pipeline.run(cfg, log=logs.append) == 0
    said = [x for x in logs if x.startswith("--overwrite: removed ")]
    assert len(said) == 1 and str(final) in said[0]
    md = json.loads(pq.read_schema(final).metadata[b"internvl_batch"])
    assert md["fingerprint"]["prompt"] == "B" and pq.read_table(final).num_rows == 5


def test_chunks_record_the_fingerprint(tmp_path):
    w = ShardWriter(tmp_path, 0, 1).open()
    w.fingerprint = {"prompt": "A"}
    w.write([row(0)])
    from internvl_batch.sinks import read_metadata

    assert read_metadata(w._chunks()[0]) == {"fingerprint": {"prompt": "A"}}
    assert w.recorded_fingerprints() == [(w._chunks()[0], {"prompt": "A"})]


def test_rows_without_a_fingerprint_are_accepted(tmp_path):
    """Shards written before fingerprints existed: nothing to compare, resume as before."""
    w = ShardWriter(tmp_path, 0, 1).open()
    w.write([row(0)])
    w.check_settings({"prompt": "anything"})


def test_run_refused_by_a_live_holder_writes_nothing(tmp_path, fake_engine):
    from internvl_batch import pipeline

    out = tmp_path / "out"
    holder = ShardLock(out, NAME).acquire()
    try:
        with pytest.raises(OutputBusy, match=f"is writing {NAME} in {out}"):
            pipeline.run(_run_cfg(tmp_path, out), log=lambda m: None)
    finally:
        holder.release()
    assert fake_engine == [] and not (out / "_parts").exists()


# -- the error-rate rule -------------------------------------------------------------------------

def _coco_missing(tmp_path, n=10):
    ann = tmp_path / "captions_x.json"
    ann.write_text(json.dumps({"images": [{"id": i, "file_name": f"gone{i}.jpg"}
                                          for i in range(n)], "annotations": []}))
    (tmp_path / "imgs").mkdir()
    return SourceSpec.parse("coco", data_dir=str(tmp_path / "imgs"), annotations=str(ann))


def test_every_row_failed_exits_3_with_counts(tmp_path, fake_engine):
    from internvl_batch import pipeline

    out = tmp_path / "out"
    cfg = dataclasses.replace(_run_cfg(tmp_path, out), source=_coco_missing(tmp_path))
    logs = []
    assert pipeline.run(cfg, log=logs.append) == pipeline.EXIT_ERROR_RATE
    assert logs[-1] == (f"failed: 10/10 rows failed, above --max-error-rate 0.5 (missing "
                        f"file: 10); see the error column in {out / NAME}.parquet")
    st = json.loads((out / f"{NAME}.stats.json").read_text())
    assert st["errors"] == 10 and st["error_kinds"] == {"missing file": 10}
    assert "errors by kind" in logs[-2] and "missing file: 10" in logs[-2]
    # a rerun does not turn the failure into "nothing to do", exit 0
    logs.clear()
    assert pipeline.run(cfg, log=logs.append) == pipeline.EXIT_ERROR_RATE
    assert logs == [f"{out / NAME}.parquet is complete but 10/10 rows failed, above "
                    "--max-error-rate 0.5 (missing file: 10)"]
    # accepted explicitly
    assert pipeline.run(dataclasses.replace(cfg, max_error_rate=1.0), log=logs.append) == 0


def test_error_rate_mid_run_names_kinds(tmp_path, fake_engine):
    from internvl_batch import pipeline

    cfg = dataclasses.replace(_run_cfg(tmp_path, tmp_path / "out"),
                              source=_coco_missing(tmp_path, 30), min_rows_for_error_rate=4)
    logs = []
    assert pipeline.run(cfg, log=logs.append) == pipeline.EXIT_ERROR_RATE
    assert logs[-1].startswith("stopped: 4/4 rows failed, above --max-error-rate 0.5 "
                               "(missing file: 4); see the error column")


def test_error_kind():
    k = stats_mod.error_kind
    assert k("missing file: /x/y.jpg") == "missing file"
    assert k("corrupt image: OSError: image file is truncated") == "corrupt image"
    assert k("empty file (0 bytes)") == "empty file"
    assert k("aspect ratio 4000x10 exceeds 200:1") == "aspect ratio"
    assert k("too large: 9000x9000 pixels (limit 64000000)") == "too large"
    assert k("engine: ValueError: prompt too long") == "engine"
    assert k("no image in this record") == "no image in this record"
    assert stats_mod.format_kinds({"corrupt image": 2, "missing file": 10}) == \
        "missing file: 10, corrupt image: 2"


# -- COCO validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("doc,msg", [
    ({"images": [{"id": 1}], "annotations": []}, "images[0] has no file_name"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": ""}]},
     "images[1] has no file_name"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": {"x": 1}},
     "annotations is a dict, not a list"),
    ({"images": {"a": 1}}, "images is a dict, not a list"),
    ({"annotations": []}, "images is missing"),
    ([1, 2], "top level is a list"),
    ({"images": ["a.jpg"]}, "images[0] has no file_name"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": ["x"]},
     "annotations[0] is a str, not an object"),
    ({"images": [{"id": [1], "file_name": "a.jpg"}]}, "images[0] has an id that is not"),
])
def test_malformed_coco_is_one_line_before_any_record(tmp_path, doc, msg):
    ann = tmp_path / "captions_x.json"
    ann.write_text(json.dumps(doc))
    with pytest.raises(SourceError) as e:
        open_source(SourceSpec.parse("coco", annotations=str(ann)))
    assert msg in str(e.value) and str(ann) in str(e.value) and "\n" not in str(e.value)


# -- stats over resumes, merge's wall clock ------------------------------------------------------

def test_stats_count_the_whole_shard_after_a_run_lost_its_stats(tmp_path, fake_engine):
    """kill -9 before stats were saved: the next run's stats.json still counts every row."""
    from internvl_batch import pipeline

    out = tmp_path / "out"
    w = ShardWriter(out, 0, 1).open()
    # the killed run's rows, no stats
    w.write([sample_row(0), sample_row(1, error="missing file: /x")])
    assert pipeline.run(_run_cfg(tmp_path, out), log=lambda m: None) == 0
    st = json.loads((out / f"{NAME}.stats.json").read_text())
    assert (st["rows"], st["rows_in_shard"], st["errors"]) == (5, 5, 1)
    assert st["images"] == st["requests"] == 4 and st["error_kinds"] == {"missing file": 1}
    # row(0): 10 tokens (the killed run), 3 fake captions of 3 tokens (this run)
    assert st["output_tokens"] == 10 + 3 * 3
    run = st["runs"][-1]
    assert run["time_to_first_row_s"] is not None and run["time_to_first_row_s"] >= 0
    assert run["shutdown_s"] is not None and run["shutdown_s"] >= 0
    assert st["shutdown_s"] == run["shutdown_s"]


def test_partial_stats_saved_after_every_batch(tmp_path, fake_engine, monkeypatch):
    from internvl_batch import pipeline

    out = tmp_path / "out"
    seen = []
    real = ShardWriter.save_partial_stats

    def spy(self, runs):
        seen.append(runs[-1]["rows"])
        real(self, runs)

    monkeypatch.setattr(ShardWriter, "save_partial_stats", spy)
    assert pipeline.run(_run_cfg(tmp_path, out), log=lambda m: None) == 0
    assert seen == [0, 2, 4, 5]  # the start, then batches of 2 over 5 rows


def _shard_stats(out: Path, i: int, n: int, rows: int, images: int, gen_s: float,
                 start: float, end: float):
    w = ShardWriter(out, i, n).open()
    w.write([row(k * n + i) for k in range(rows)])
    total = w.finalize({})
    runs = [{"rows": rows, "images": images, "requests": images, "errors": rows - images,
             "output_tokens": 10 * images, "generate_s": gen_s, "generate_started_at": start,
             "first_batch_at": start + 1, "last_batch_at": end}]
    stats_mod.write(w.stats_path, stats_mod.summarize(runs), runs,
                    {"shard": w.name, "rows_in_shard": total, "complete": True})
    w.commit()


def test_merge_reports_wall_clock_and_sum_of_rates(tmp_path):
    """Two shards that ran one after the other (one GPU, an array of 2): each did 10 img/s,
    the sum of rates says 20, the wall clock says 20 images over 4 s = 5 img/s."""
    out = tmp_path / "out"
    t = 1_700_000_000.0
    _shard_stats(out, 0, 2, 10, 10, 1.0, t, t + 1.0)
    _shard_stats(out, 1, 2, 10, 10, 1.0, t + 3.0, t + 4.0)
    ok, report = merge_mod.merge_output(out)
    assert ok, report
    doc = json.loads((out / "stats.json").read_text())
    assert doc["images_per_s"] == 20.0
    assert doc["wall_span_s"] == 4.0 and doc["wall_images_per_s"] == 5.0
    assert doc["wall_output_tokens_per_s"] == 50.0
    lines = report.splitlines()
    assert any(ln.startswith("images/s (sum of shard rates)") and ln.endswith("20.00")
               for ln in lines), report
    assert any(ln.startswith("images/s (wall clock)") and
               "5.00 over 4.00 s from the first batch of any shard to the last" in ln
               for ln in lines), report


def test_merge_wall_clock_of_old_stats_without_runs(tmp_path):
    assert stats_mod.merge_parallel([{"images": 3}])["wall_span_s"] is None


# -- the real entry point: one line, exit 2, before any engine -------------------------------

def _cli_run(tmp_path, *args):
    from tests.test_cli_unit import ROOT, _env, _heavy_imports

    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "internvl_batch", "run",
                          *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=_env(tmp_path))
    err = [ln for ln in res.stderr.splitlines() if not ln.startswith("import time:")]
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert _heavy_imports(res.stderr) == set()  # refused before vLLM/torch were imported
    return res.returncode, err


def test_cli_second_writer_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    holder = ShardLock(out, NAME).acquire()
    try:
        code, err = _cli_run(tmp_path, "--dataset", "sample", "-o", str(out),
                             "--model", "/nonexistent-model")
    finally:
        holder.release()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"Error: another internvl-batch (pid {os.getpid()} on host ")
    assert err[0].endswith(f"is writing {NAME} in {out}; wait for it, or pass --wait")


def test_cli_changed_prompt_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    w = ShardWriter(out, 0, 1).open()
    cfg = _prompted(tmp_path, out, "Describe this image in one sentence.")
    w.fingerprint = fingerprint.of(dataclasses.replace(
        cfg, engine=dataclasses.replace(cfg.engine, model="/nonexistent-model")))
    w.write([sample_row(0)])
    before = _snapshot(out)
    code, err = _cli_run(tmp_path, "--dataset", "sample", "-o", str(out), "--model",
                         "/nonexistent-model", "--prompt", "Name the animal.",
                         "--max-tokens", "9", "--limit", "5")
    assert code == 2 and err == [
        f"Error: {out} ({NAME}, unfinished) holds rows written with other settings (--prompt "
        "'Describe this image in one sentence.' -> 'Name the animal.'; --max-tokens 64 -> 9); "
        "pass --output DIR to write elsewhere, or --overwrite to replace them"]
    assert _snapshot(out) == before


def test_cli_malformed_coco_exits_2_with_one_line(tmp_path):
    ann = tmp_path / "captions_x.json"
    ann.write_text(json.dumps({"images": [{"id": 1}], "annotations": "nope"}))
    code, err = _cli_run(tmp_path, "--dataset", "coco", "--annotations", str(ann),
                         "-o", str(tmp_path / "out"))
    assert code == 2 and err == [
        f"Error: {ann} is not a COCO captions file (need images[] of {{id, file_name}} and "
        "annotations[] of {image_id, caption}): annotations is a str, not a list"]
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_one_line(tmp_path):
    """Found when the lock is taken: before any engine starts."""
    with pytest.raises(ConfigError, match="^--output /proc/ivb is not writable: "):
        ShardLock(Path("/proc/ivb"), NAME).acquire()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            return  # root: permissions are not enforced; /proc above stands for them
        with pytest.raises(ConfigError, match=f"^--output {ro}/out is not writable: "):
            ShardLock(ro / "out", NAME).acquire()
    finally:
        ro.chmod(0o700)


def test_cli_output_under_proc_exits_2_before_the_engine(tmp_path):
    code, err = _cli_run(tmp_path, "--dataset", "sample", "-o", "/proc/ivb-out",
                         "--model", "/nonexistent-model")
    assert code == 2 and len(err) == 1
    assert err[0].startswith("Error: --output /proc/ivb-out is not writable: ")
