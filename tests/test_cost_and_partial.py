"""The cost figure covers a command from its start to its exit, or says what it cannot count;
outputs with shards missing or unfinished are read, but never as if they were whole. A fake
engine throughout (no vLLM): these are about the bookkeeping around it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from internvl_batch import merge as merge_mod
from internvl_batch import pipeline
from internvl_batch import stats as stats_mod
from internvl_batch.sinks import ShardWriter
from tests.test_sinks_stats import (RUN_A, RUN_B, FakeEngine, _run_cfg,  # noqa: F401
                                    complete_shard, fake_engine, row)

NAME = "part-00000-of-00001"
ROOT = Path(__file__).resolve().parents[1]


def _stats(out: Path) -> dict:
    return json.loads((out / f"{NAME}.stats.json").read_text())


def _partial(out: Path) -> list[dict]:
    return json.loads((out / "_parts" / NAME / "stats.partial.json").read_text())["runs"]


class StoppingEngine(FakeEngine):
    """Serves `batches` batches, then signals its own process as Slurm's preemption would:
    the run finishes that batch and exits 75 with its rows kept."""

    def __init__(self, batches: int):
        super().__init__()
        self.left = batches

    def imap(self, work, sampling):
        for tag, reqs in work:
            results = self.generate(reqs, sampling)
            self.left -= 1
            if self.left == 0:  # seen once this batch is written
                os.kill(os.getpid(), signal.SIGUSR1)
            yield tag, results


def _entry():
    return types.SimpleNamespace(hit=True, key="k", fields={"model_config_hash": "h"})


# -- the end: final file, stats and reaping are inside the cost ---------------------------------

def test_the_cost_runs_to_the_end_of_the_command(tmp_path, fake_engine, monkeypatch):
    """wall_s used to stop when the engines closed: finalize, the stats write and the
    reaping of the run's processes were left out. Now the end is recorded after all of them
    (the command line reaps in `Terminal.ending`), and the summary is shown after that."""
    events = []
    real_finalize = ShardWriter.finalize

    def slow_finalize(self, metadata):
        time.sleep(0.4)
        return real_finalize(self, metadata)

    def ending():
        time.sleep(0.6)  # a vLLM engine core that takes its time to go
        events.append(("ended", time.time()))

    monkeypatch.setattr(ShardWriter, "finalize", slow_finalize)
    out = tmp_path / "out"
    term = pipeline.Terminal(info=lambda m: None, ending=ending,
                             summary=lambda doc, table: events.append(("summary", doc)))
    t0 = time.time()
    assert pipeline.run(_run_cfg(tmp_path, out), term=term, started_at=t0) == 0
    t1 = time.time()
    assert [e[0] for e in events] == ["ended", "summary"]
    st = _stats(out)
    run = st["runs"][-1]
    assert events[0][1] <= run["ended_at"] <= t1
    # the wall time holds the close, the slow finalize and the slow reaping
    assert run["ended_at"] - run["closed_at"] >= 1.0
    assert t1 - t0 - 0.1 <= run["wall_s"] == st["wall_s"] <= t1 - t0
    assert st["gpu_hours"] == round(run["wall_s"] / 3600, 6)
    assert st["cost_unknown"] is None and st["images_per_gpu_hour"] == round(5 / st["gpu_hours"], 3)
    assert events[1][1]["wall_s"] == st["wall_s"]  # the summary shown is the file's


def test_a_failed_start_is_recorded_and_counted(tmp_path, monkeypatch):
    """The run's entry is saved before the engines start: a start that fails still costs,
    and the next run's stats count it."""
    from internvl_batch.cache import CompileCache

    out = tmp_path / "out"
    seen = []

    def failing_start(self, spec, log=print):
        seen.append(_partial(out))  # saved already, before any engine
        time.sleep(0.3)
        raise RuntimeError("no such model")

    monkeypatch.setattr(CompileCache, "start_engine", failing_start)
    t0 = time.time()
    with pytest.raises(RuntimeError):
        pipeline.run(_run_cfg(tmp_path, out), log=lambda m: None, started_at=t0)
    assert len(seen) == 1 and len(seen[0]) == 1
    assert seen[0][0]["started_at"] == t0 and seen[0][0]["ended_at"] is None
    assert seen[0][0]["rows"] == 0 and seen[0][0]["lock_token"]
    failed = _partial(out)[0]
    assert failed["ended_at"] >= t0 + 0.3 and failed["wall_s"] >= 0.3  # its end, recorded

    monkeypatch.undo()
    assert pipeline.run(_run_cfg(tmp_path, out), log=lambda m: None,
                        started=(FakeEngine(), _entry())) == 0
    st = _stats(out)
    assert [r["rows"] for r in st["runs"]] == [0, 5]
    assert st["cost_unknown"] is None
    assert st["wall_s"] == pytest.approx(sum(r["wall_s"] for r in st["runs"]), abs=1e-3)
    assert st["images_per_gpu_hour"] == round(5 / st["gpu_hours"], 3)


KILLED_RUN = textwrap.dedent("""
    import sys, time, types
    from pathlib import Path
    from internvl_batch import outlock, pipeline
    from internvl_batch.cache import CompileCache
    from internvl_batch.config import EngineSpec, RunConfig
    from internvl_batch.sources import SourceSpec

    outlock.ShardLock.__init__.__defaults__ = (0.2, 4)  # a heartbeat every 0.2 s

    def start(self, spec, log=print):
        print("starting", flush=True)
        time.sleep(600)  # an engine start that never ends: killed with -9 here

    CompileCache.start_engine = start
    tmp = Path(sys.argv[1])
    cfg = RunConfig(source=SourceSpec.parse("sample", limit=5), engine=EngineSpec(model="m"),
                    output=tmp / "out", cache_dir=tmp / "cache", progress=False, workers=0,
                    batch_size=2)
    pipeline.run(cfg, log=lambda m: None)
""")


def test_a_kill_before_the_first_batch_is_counted_and_marked(tmp_path):
    """kill -9 during the engine start: no batch was ever saved, so the run's time used to
    be lost. Its start record survives; the next run counts it up to its last sign of life
    (the lock's last heartbeat), and says the cost is a lower bound instead of giving a
    rate."""
    p = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path)],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline() == "starting\n"
    time.sleep(1.5)  # heartbeats keep coming while the "engine" starts
    t_kill = time.time()
    p.kill()
    p.wait()
    out = tmp_path / "out"
    dead = _partial(out)[0]
    assert dead["ended_at"] is None and dead["wall_s"] < 1.0  # as saved at its start

    shown = []
    term = pipeline.Terminal(info=lambda m: None, summary=lambda doc, t: shown.append(t))
    assert pipeline.run(_run_cfg(tmp_path, out), term=term,
                        started=(FakeEngine(), _entry())) == 0
    st = _stats(out)
    first, second = st["runs"]
    assert first["end_lost"] is True and first["ended_at"] is None
    # counted up to the last heartbeat (every 0.2 s): more than its one save showed, not
    # beyond the kill
    assert t_kill - 0.6 <= first["last_alive_at"] <= t_kill
    assert first["last_alive_at"] >= dead["saved_at"] + 1.0
    assert first["wall_s"] == round(first["last_alive_at"] - first["started_at"], 3)
    assert st["gpu_hours"] == pytest.approx((first["wall_s"] + second["wall_s"]) / 3600,
                                            abs=2e-6)
    assert "1 run ended without recording the end" in st["cost_unknown"]
    assert st["images_per_gpu_hour"] is None  # not a rate over hours known to be short
    line = next(ln for ln in shown[0].splitlines() if ln.startswith("images per"))
    assert "unknown: 1 run ended without recording the end" in line and "at least" in line


def test_lost_partial_stats_make_the_cost_unknown(tmp_path):
    """A deleted stats.partial.json used to leave the finished shard dividing all of its rows
    by the hours of the runs whose entries survived."""
    out = tmp_path / "out"
    cfg = _run_cfg(tmp_path, out)
    assert pipeline.run(cfg, log=lambda m: None,
                        started=(StoppingEngine(1), _entry())) == pipeline.EXIT_PREEMPTED
    assert [r["rows"] for r in _partial(out)] == [2]
    (out / "_parts" / NAME / "stats.partial.json").unlink()
    assert pipeline.run(cfg, log=lambda m: None, started=(FakeEngine(), _entry())) == 0
    st = _stats(out)
    assert st["rows"] == 5 and [r["rows"] for r in st["runs"]] == [3]
    assert st["cost_unknown"] == ("2 rows were written by runs whose stats are lost (a deleted "
                                  "or cut stats.partial.json)")
    assert st["images_per_gpu_hour"] is None
    # merge carries it on, naming the shard
    ok, report = merge_mod.merge_output(out)
    assert ok, report
    merged = json.loads((out / "stats.json").read_text())
    assert merged["cost_unknown"].startswith(f"{NAME}: 2 rows were written by runs whose")
    assert merged["images_per_gpu_hour"] is None


def test_a_resume_after_a_stop_keeps_the_cost_whole(tmp_path):
    """The common case stays a rate: a run stopped by a signal records its end, and the
    resumed shard's cost is the sum of both runs, each from its start to its end."""
    out = tmp_path / "out"
    cfg = _run_cfg(tmp_path, out)
    assert pipeline.run(cfg, log=lambda m: None,
                        started=(StoppingEngine(1), _entry())) == pipeline.EXIT_PREEMPTED
    stopped = _partial(out)[0]
    assert stopped["ended_at"] is not None and stopped["ended_at"] >= stopped["closed_at"]
    assert pipeline.run(cfg, log=lambda m: None, started=(FakeEngine(), _entry())) == 0
    st = _stats(out)
    assert [r["rows"] for r in st["runs"]] == [2, 3] and st["cost_unknown"] is None
    assert st["images_per_gpu_hour"] == round(5 / st["gpu_hours"], 3)


def test_summarize_counts_images_only_with_their_hours():
    """summarize added every entry's images but only the hours of entries that had some:
    the rate divided images by hours that did not pay for them all."""
    a = dict(RUN_A, wall_s=720.0, gpu_hours=0.2)
    b = dict(RUN_B)  # written before hours were recorded
    s = stats_mod.summarize([a, b])
    assert s["images"] == 13 and s["gpu_hours"] == 0.2
    assert s["images_per_gpu_hour"] is None
    assert s["cost_unknown"] == "1 of 2 entries have no hours recorded"
    assert stats_mod.summarize([a])["images_per_gpu_hour"] == 40.0
    # merge over shards: one shard's unknown part makes the whole a lower bound
    m = stats_mod.merge_parallel([dict(stats_mod.summarize([a]), shard="part-00000-of-00002"),
                                  dict(s, shard="part-00001-of-00002")])
    assert m["cost_unknown"] == ("part-00001-of-00002: 1 of 2 entries have no hours "
                                 "recorded")
    assert m["images_per_gpu_hour"] is None and m["gpu_hours"] == 0.4


def test_cpu_summary_speaks_of_device_hours():
    s = stats_mod.summarize([dict(RUN_A, wall_s=36.0, gpu_hours=0.01, ended_at=1.0)])
    gpu = stats_mod.table(s)
    assert "images per GPU-hour" in gpu and "over 0.01 GPU-hours" in gpu
    cpu = stats_mod.table(dict(s, gpu_name=None))
    assert "GPU-hour" not in cpu and "images per device-hour" in cpu and "0.01 device-hours" in cpu


# -- partial outputs: show, score, merge ----------------------------------------------------------

def _two_shards(out: Path, second: str) -> None:
    """Shard 0 of 2 complete; shard 1 `unfinished` (rows under _parts), `missing`, or
    `deleted` (finished, then its Parquet file removed)."""
    complete_shard(out, 0, 2, [0, 2, 4])
    if second == "unfinished":
        ShardWriter(out, 1, 2).open().write([row(1), row(3)])
    elif second == "deleted":
        complete_shard(out, 1, 2, [1, 3])
        (out / "part-00001-of-00002.parquet").unlink()


@pytest.mark.parametrize("second", ["unfinished", "missing"])
def test_show_and_score_say_when_shards_are_absent(tmp_path, second):
    from internvl_batch.cli import cli
    from internvl_batch.outputs import open_output
    from internvl_batch.scores import score_output

    out = tmp_path / "out"
    _two_shards(out, second)
    # missing: nothing names shard 1 but the count in shard 0's file name
    note = (f"note: {out} is partial: 1 of 2 shards have no Parquet file "
            f"(part-00001-of-00002 {second}); using the 3 rows of the other 1")
    o = open_output(out)
    assert o.note == note
    res = CliRunner().invoke(cli, ["show", str(out), "--out", str(tmp_path / "g.html")])
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[0] == note
    res = CliRunner().invoke(cli, ["score", str(out), "--no-spice"])
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[0] == note
    assert json.loads((out / "scores.json").read_text())["extra"]["partial"] == note
    assert score_output(o, use_java=False).rows == 3
    if second == "missing":  # once whole: no note
        complete_shard(out, 1, 2, [1, 3])
        assert open_output(out).note is None


def test_merge_names_a_deleted_shard_and_drops_stale_stats(tmp_path):
    """A shard whose Parquet file was deleted after it finished was reported as "never
    started"; and a failed merge left the stats.json of an earlier merge, which still
    counted the rows now gone."""
    out = tmp_path / "out"
    complete_shard(out, 0, 2, [0, 2, 4])
    complete_shard(out, 1, 2, [1, 3])
    ok, report = merge_mod.merge_output(out)
    assert ok and json.loads((out / "stats.json").read_text())["rows_in_output"] == 5
    (out / "part-00001-of-00002.parquet").unlink()
    ok, report = merge_mod.merge_output(out)
    assert not ok
    assert report.splitlines()[-2:] == [
        "merge: finished shards whose Parquet file is gone (deleted or moved after they "
        "finished): part-00001-of-00002; put the files back, or rerun those shards",
        f"merge: removed {out / 'stats.json'} (an earlier merge's figures, which no longer "
        "describe these shards)"]
    assert "never started" not in report
    assert not (out / "stats.json").exists()
    # the stats file gone instead: named as such too
    complete_shard(out, 1, 2, [1, 3])
    (out / "part-00001-of-00002.stats.json").unlink()
    ok, report = merge_mod.merge_output(out)
    assert not ok and report.splitlines()[-1] == (
        "merge: part-00001-of-00002: part-00001-of-00002.stats.json is gone (deleted or moved "
        "after the shard finished); put it back, or rerun the shard with --overwrite")


# -- the clock starts when the run does -----------------------------------------------------------

FAKE_CLI = textwrap.dedent("""
    import sys, types
    sys.path.insert(0, {root!r})
    from internvl_batch.cache import CompileCache
    from tests.test_sinks_stats import FakeEngine

    CompileCache.start_engine = lambda self, spec, log=print: (
        FakeEngine(), types.SimpleNamespace(hit=True, key="k", fields={{}}))
    from internvl_batch.cli import main
    main()
""")


def test_a_shell_before_the_run_is_not_the_runs_time(tmp_path):
    """`bash -c "sleep 5 && internvl-batch run …"`: bash forks once and execs the last
    command, and the run's start was read from /proc (the fork), so the sleep (an install,
    in a Docker CMD) counted as the run's time to its first row and its GPU-hours. The
    command line here is the real one; only the engine is a fake."""
    cli = f"{sys.executable} -c {_quote(FAKE_CLI.format(root=str(ROOT)))}"
    out = tmp_path / "out"
    t0 = time.time()
    p = subprocess.run(["bash", "-c", f"sleep 5 && {cli} run --dataset sample --limit 5 "
                        f"--output {out} --cache-dir {tmp_path / 'cache'} --workers 0 "
                        "--batch-size 2 --json -q"],
                       capture_output=True, text=True, timeout=120)
    took = time.time() - t0
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    run = _stats(out)["runs"][-1]
    assert run["started_at"] >= t0 + 5.0  # after the sleep: when our code began
    assert doc["time_to_first_row_s"] < took - 5.0
    # the run's wall time is the command's, less the sleep and what no process can measure
    # of itself (the interpreter's start before our import, its exit)
    assert took - 5.0 - 2.0 < doc["wall_s"] < took - 5.0


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)
